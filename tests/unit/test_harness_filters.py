"""Golden-output filters: what varies is replaced, everything else is left byte for byte."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from qsnap.harness.filters import (
    chain,
    filter_byte_counts,
    filter_common,
    filter_durations,
    filter_extents,
    filter_pids,
    filter_qemu_version,
    filter_rates,
    filter_section_ids,
    filter_stream_offsets,
    filter_test_dir,
    filter_timestamps,
    filter_tmp_paths,
    per_line,
)

# Text with nothing any filter touches: letters, spaces and punctuation, no digits or '/'.
plain = st.text(alphabet=string.ascii_letters + " .,;!?-_=()[]{}'\"\n", max_size=200)
ALL = filter_common("/srv/test dir")


@given(plain)
def test_plain_text_passes_every_filter_unchanged(text: str) -> None:
    assert ALL(text) == text


def test_test_dir_is_replaced_on_path_boundaries_only() -> None:
    f = filter_test_dir("/srv/t1")
    assert f("/srv/t1/image.qcow2 and /srv/t1") == "TEST_DIR/image.qcow2 and TEST_DIR"
    assert f("'/srv/t1', /srv/t10/x") == "'TEST_DIR', /srv/t10/x"


@given(st.text(alphabet=string.ascii_lowercase + "-_.", min_size=1, max_size=12))
def test_test_dir_any_name(name: str) -> None:
    f = filter_test_dir(f"/work/{name}")
    assert f(f"open /work/{name}/a: ok") == "open TEST_DIR/a: ok"


def test_tmp_paths() -> None:
    assert filter_tmp_paths("sock /tmp/qsnap-vm-ab12/qmp.sock, done") == "sock TMP_PATH, done"
    assert filter_tmp_paths("/var/tmp/x.img") == "TMP_PATH"
    assert filter_tmp_paths("/tmpfoo/x stays") == "/tmpfoo/x stays"


def test_timestamps() -> None:
    assert filter_timestamps("at 2026-11-25T17:34:21.123Z ok") == "at TIMESTAMP ok"
    assert filter_timestamps("at 2026-11-25 17:34:21+01:00") == "at TIMESTAMP"
    assert filter_timestamps("[17:34:21.5] started") == "[TIMESTAMP] started"
    event = '{"timestamp": {"seconds": 1795628099, "microseconds": 943679}, "event": "STOP"}'
    assert filter_timestamps(event) == (
        '{"timestamp": {"seconds": SECS, "microseconds": USECS}, "event": "STOP"}'
    )


def test_timestamps_leave_pci_addresses() -> None:
    assert filter_timestamps("0000:00:02.0/vga.vram") == "0000:00:02.0/vga.vram"


@given(
    st.integers(0, 10**6),
    st.integers(0, 999),
    st.sampled_from(["s", " s", "ms", " ms", "us", " seconds", " min"]),
)
def test_durations(whole: int, frac: int, unit: str) -> None:
    assert filter_durations(f"took {whole}.{frac}{unit}.") == "took DURATION."
    assert filter_durations(f"took {whole}{unit}") == "took DURATION"


def test_durations_leave_words_alone() -> None:
    assert filter_durations("5 sections, 3 seeds, 2 mice") == "5 sections, 3 seeds, 2 mice"


@given(
    st.floats(0, 1e6, allow_nan=False).map(lambda x: f"{x:.1f}"),
    st.sampled_from(["MiB/s", "MB/s", " GiB/s", "B/s", " KiB/s"]),
)
def test_rates(number: str, unit: str) -> None:
    assert filter_rates(f"saved at {number}{unit} ok") == "saved at RATE ok"


def test_byte_counts() -> None:
    assert filter_byte_counts("wrote 4096 bytes, 12.5 MiB, 512 B") == "wrote SIZE, SIZE, SIZE"
    assert filter_byte_counts("page 12 of block B") == "page 12 of block B"


def test_qemu_version() -> None:
    text = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
    assert filter_qemu_version(text) == "QEMU emulator version VERSION\nCopyright"
    assert filter_qemu_version("qemu-img version 9.2.0") == "qemu-img version VERSION"
    greeting = (
        '{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
        '"package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}'
    )
    assert filter_qemu_version(greeting) == (
        '{"QMP": {"version": {"qemu": VERSION, "package": "PACKAGE"}, "capabilities": ["oob"]}}'
    )


def test_pids() -> None:
    assert filter_pids("QEMU pid 12345 killed, pid=7") == "QEMU pid PID killed, pid=PID"


def test_chain_applies_in_order() -> None:
    def upper(text: str) -> str:
        return text.upper()

    def mark(text: str) -> str:
        return text.replace("A", "<a>")

    assert chain(upper, mark)("abc") == "<a>BC"
    assert chain(mark, upper)("abc") == "ABC"
    assert chain()("same") == "same"


single_lines = plain.filter(lambda s: "\n" not in s)


@given(st.lists(single_lines, max_size=6), single_lines)
def test_per_line_keeps_line_structure(lines: list[str], last: str) -> None:
    text = "".join(f"{line}\n" for line in lines) + last
    out = per_line(lambda line: f"<{line}>")(text)
    assert out == "".join(f"<{line}>\n" for line in lines) + (f"<{last}>" if last else "")


def test_common_set_on_a_realistic_log() -> None:
    log = (
        "2026-11-25T17:34:21Z qsnap save /srv/test dir/snap.qcow2: 512 MiB in 2.47 s "
        "(207.3 MiB/s), QEMU emulator version 10.0.2 (Debian), socket /tmp/q-1/nbd.sock\n"
    )
    assert ALL(log) == (
        "TIMESTAMP qsnap save TEST_DIR/snap.qcow2: 512 MiB in DURATION "
        "(RATE), QEMU emulator version VERSION, socket TMP_PATH\n"
    )


@given(st.integers(0, 2**64), st.sampled_from(["section 1 (ram)", "the device state"]))
def test_stream_offsets(offset: int, where: str) -> None:
    line = f"qsnap save: error: byte {offset}: stream truncated inside {where}"
    assert (
        filter_stream_offsets(line) == f"qsnap save: error: byte N: stream truncated inside {where}"
    )


def test_stream_offsets_leave_counts_and_other_words_alone() -> None:
    text = "115802 bytes of device state, kilobyte 5, byte0"
    assert filter_stream_offsets(text) == text


@given(st.integers(0, 2**64), st.integers(1, 2**32))
def test_extents(offset: int, length: int) -> None:
    line = f"NBD WRITE at {offset:#x}+{length:#x}: No space left on device"
    assert filter_extents(line) == "NBD WRITE at OFFSET+LENGTH: No space left on device"


def test_extents_leave_single_hex_values_alone() -> None:
    text = "RAM block 'pc.ram' length 0x1000000 exceeds the 0x862000 bytes left, 0x10 + 0x20"
    assert filter_extents(text) == text


@given(st.integers(0, 2**32))
def test_section_ids(section_id: int) -> None:
    line = f"stream truncated inside section {section_id} (ram)"
    assert filter_section_ids(line) == "stream truncated inside section ID (ram)"


def test_section_ids_leave_other_numbers_alone() -> None:
    text = "5 sections, subsection 3, section_id 4"
    assert filter_section_ids(text) == text
