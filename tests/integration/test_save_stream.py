"""``qsnap save`` of real background-snapshot streams of the pattern guest.

One paused guest is saved twice, by ``exec:cat > FILE`` and by ``exec:qsnap save``: the
image must hold exactly the pages of the raw stream and of the guest memory (pmemsave),
and the device state byte for byte.  A running guest's image must show memory frozen at
one instant (the sweep rule).  The raw stream is then cut into a vmstate-only and a
RAM-only stream to exercise the two-pass save in both orders.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qsnap.harness.guests import PatternGuest
from qsnap.harness.sweep import check_sweep
from qsnap.harness.vm import VM
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.spec import parse_spec
from qsnap.image.virtqueue import ORDERED_HOST
from qsnap.save import SaveResult, save
from qsnap.save_input import StdinReader
from qsnap.stream import StreamError, StreamReader, encode
from qsnap.stream import records as r

pytestmark = pytest.mark.qemu

MIB = 128
PAGE = 4096
VGA_WINDOW = 0xA0000
QSNAP = str(Path(sys.executable).with_name("qsnap"))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def qsnap(*args: str, stdin: bytes = b"") -> Run:
    done = subprocess.run(
        [QSNAP, *args], input=stdin, capture_output=True, timeout=120, check=False
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def create(path: Path, ram: str = f"{MIB}M") -> Path:
    done = qsnap("create", str(path), "--ram-size", ram)
    assert done.returncode == 0, done.stderr
    return path


def save_into(vm: VM, image: Path, err: Path, tee: Path | None = None) -> str:
    """Background-snapshot ``vm`` into ``qsnap save``; return its stderr once it exited.

    QEMU reports the migration completed before it reaps the exec: command, and ignores
    its exit status: so wait for qsnap's own status.
    """
    q = shlex.quote
    rc = err.with_suffix(".rc")
    cmd = f"{q(QSNAP)} save {q(str(image))} 2>{q(str(err))}"
    if tee is not None:
        cmd = f"tee {q(str(tee))} | {cmd}"
    vm.background_snapshot(f"exec:{cmd}; echo $? >{q(str(rc))}", timeout=120)
    deadline = time.monotonic() + 60
    while not (rc.exists() and rc.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "qsnap save did not exit"
        time.sleep(0.02)
    assert rc.read_text() == "0\n", err.read_text()
    return err.read_text()


@dataclass
class ParsedStream:
    """The raw stream, parsed once with the codec: pages by (block, offset)."""

    data: bytes
    blocks: tuple[r.RamBlockInfo, ...]
    pages: dict[tuple[str, int], bytes]
    zeros: set[tuple[str, int]]
    prologue_end: int
    device_state_at: int
    eof_at: int


def parse(data: bytes) -> ParsedStream:
    reader = StreamReader()
    reader.feed(data)
    pages: dict[tuple[str, int], bytes] = {}
    zeros: set[tuple[str, int]] = set()
    prologue_end = device_state_at = -1
    for rec in reader.records():
        if isinstance(rec, r.RamPage):
            pages[rec.block, rec.offset] = rec.data
        elif isinstance(rec, r.RamZero):
            zeros.add((rec.block, rec.offset))
        elif isinstance(rec, r.Configuration):
            prologue_end = reader.offset
        elif isinstance(rec, r.DeviceStateStart):
            device_state_at = rec.offset
    reader.close()
    assert reader.mem_size is not None and reader.device_state_end is not None
    return ParsedStream(
        data,
        reader.mem_size.blocks,
        pages,
        zeros,
        prologue_end,
        device_state_at,
        reader.device_state_end.eof_offset,
    )


@dataclass
class Saved:
    stream: ParsedStream  # exec:cat > FILE of the paused guest
    teed: bytes  # the very bytes qsnap received (tee): device state may differ per run
    image: Path
    stderr: str
    ram: bytes  # pmemsave of pc.ram
    ramblocks: dict[str, int]  # HMP "info ramblock": idstr -> used length
    vm: VM  # still alive, paused


def hmp_ramblocks(vm: VM) -> dict[str, int]:
    rows = [line.split() for line in vm.hmp("info ramblock").splitlines()[1:] if line.strip()]
    return {row[0]: int(row[4], 16) for row in rows}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """A paused pattern guest, saved by cat and by qsnap (same instant)."""
    tmp = tmp_path_factory.mktemp("save")
    vm = VM(name="pattern", memory_mib=MIB, log_dir=tmp)
    try:
        PatternGuest.build().configure(vm)
        vm.launch()
        vm.wait_console(PatternGuest.MARKER.decode() * 2, timeout=90)
        vm.stop()
        raw = tmp / "raw.bin"
        vm.background_snapshot_to_file(raw, timeout=120)
        image = create(tmp / "snap.qcow2")
        text = save_into(vm, image, tmp / "save.err", tmp / "teed.bin")
        vm.command("pmemsave", val=0, size=MIB << 20, filename=str(tmp / "ram"))
        yield Saved(
            parse(raw.read_bytes()),
            (tmp / "teed.bin").read_bytes(),
            image,
            text,
            (tmp / "ram").read_bytes(),
            hmp_ramblocks(vm),
            vm,
        )
    finally:
        vm.shutdown()


def info(image: Path) -> dict[str, object]:
    done = qsnap("info", "--json", str(image))
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_save_reports_complete_and_image_is_clean(saved: Saved) -> None:
    lines = saved.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qsnap save: saved "), saved.stderr
    assert lines[0].endswith("; image complete")
    check = subprocess.run(
        ["qemu-img", "check", str(saved.image)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    done = qsnap("verify", str(saved.image))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{sum(b.used_length for b in saved.stream.blocks) // PAGE} ")


def test_info_matches_the_vm_blocks(saved: Saved) -> None:
    data = info(saved.image)
    assert data["complete"] is True and data["missing"] == []
    assert str(data["machine_type"]).startswith("pc-i440fx-")
    blocks = data["blocks"]
    assert isinstance(blocks, list)
    assert [(b["idstr"], b["used_length"]) for b in blocks] == [
        (b.idstr, b.used_length) for b in saved.stream.blocks
    ]
    assert blocks[0]["idstr"] == "pc.ram" and blocks[0]["used_length"] == MIB << 20
    assert {b["idstr"]: b["used_length"] for b in blocks} == saved.ramblocks
    for b in blocks:
        name = b["idstr"]
        assert b["data_pages"] == sum(1 for k in saved.stream.pages if k[0] == name)
        assert b["zero_pages"] == b["used_length"] // PAGE - b["data_pages"]
        assert b["image_offset"] % (1 << 20) == 0
    # every page of pc.ram above 1 MiB is swept, hence data
    assert blocks[0]["data_pages"] >= (MIB - 1) * 256


def test_every_stored_page_equals_stream_and_memory(saved: Saved) -> None:
    stream = saved.stream
    with SnapshotImage.open(str(saved.image)) as image:
        header = image.complete_header()
        for block in header.blocks:
            contents = b"".join(
                image.read(block, pos, min(1 << 20, block.used_length - pos))
                for pos in range(0, block.used_length, 1 << 20)
            )
            for (name, offset), page in stream.pages.items():
                if name == block.idstr:
                    assert contents[offset : offset + PAGE] == page, (name, hex(offset))
            for name, offset in stream.zeros:
                if name == block.idstr:
                    assert contents[offset : offset + PAGE] == bytes(PAGE), (name, hex(offset))
            if block.idstr == "pc.ram":  # pmemsave sees VGA/ROM windows in 640K..1M
                assert contents[:VGA_WINDOW] == saved.ram[:VGA_WINDOW]
                assert contents[1 << 20 :] == saved.ram[1 << 20 :]


def test_spans_over_shared_memory_equal_nbd_reads_and_the_stream(saved: Saved) -> None:
    for shared in (True, False):
        with SnapshotImage.open(str(saved.image), shared_reads=shared) as image:
            assert image.shares_memory is (shared and ORDERED_HOST)
            for block in image.complete_header().blocks:
                requests = [
                    (block, pos, min(1 << 20, block.used_length - pos))
                    for pos in range(0, block.used_length, 1 << 20)
                ]
                for (_, pos, n), span in zip(requests, image.read_spans(requests), strict=True):
                    data = span.buffer[span.start : span.start + span.length]
                    assert data == image.read(block, pos, n)
                    for page in range(0, n, PAGE):
                        want = saved.stream.pages.get((block.idstr, pos + page), bytes(PAGE))
                        assert data[page : page + PAGE] == want, (block.idstr, hex(pos + page))


def test_zero_pages_are_not_allocated(saved: Saved) -> None:
    stream = saved.stream
    with SnapshotImage.open(str(saved.image)) as image:
        for block in image.complete_header().blocks:
            data_clusters = {off >> 20 for name, off in stream.pages if name == block.idstr}
            for extent in image.zero_map(block):
                clusters = range(extent.offset >> 20, (extent.offset + extent.length - 1 >> 20) + 1)
                if extent.zero:
                    assert not data_clusters.intersection(clusters), (block.idstr, extent)
                else:
                    assert set(clusters) <= data_clusters, (block.idstr, extent)


def test_device_state_is_stored_verbatim(saved: Saved) -> None:
    stream = parse(saved.teed)
    with SnapshotImage.open(str(saved.image)) as image:
        header = image.complete_header()
        assert header.prologue == stream.data[: stream.prologue_end]
        whole = b"".join(image.device_state(chunk_size=10000))
        sections = b"".join(image.device_state(sections_only=True))
    assert whole == stream.data[stream.device_state_at :]
    assert sections == stream.data[stream.device_state_at : stream.eof_at]
    assert whole[len(sections) : len(sections) + 2] == b"\x00\x06"


def test_running_guest_is_frozen_at_one_instant(saved: Saved, tmp_path: Path) -> None:
    vm = saved.vm
    vm.cont()
    vm.wait_console(PatternGuest.MARKER.decode(), timeout=60, start=vm.console_size())
    image = create(tmp_path / "run.qcow2")
    text = save_into(vm, image, tmp_path / "err")
    assert vm.runstate().value == "running"
    assert text.endswith("; image complete\n")
    swept = PatternGuest.swept_range(MIB)
    with SnapshotImage.open(str(image)) as snap:
        values = b"".join(
            bytes(snap.read("pc.ram", pos, 1 << 20)[::PAGE])
            for pos in range(swept.start, swept.stop, 1 << 20)
        )
    assert len(values) == len(swept)
    report = check_sweep(values, block="pc.ram", start=swept.start)
    assert report.ok, report.violation
    assert qsnap("verify", str(image)).returncode == 0


# -- two passes, cut from the real stream -----------------------------------------------


def test_shared_and_nbd_writes_make_identical_images(saved: Saved, tmp_path: Path) -> None:
    """The bytes qsnap received, saved again with the pages through vhost-user-blk and with
    everything over NBD: both verify, and their virtual disks equal the first save's."""
    images = []
    for shared in (True, False):
        path = create(tmp_path / f"shared-{shared}.qcow2")
        result = save(parse_spec(str(path)), read=io.BytesIO(saved.teed).read, shared_writes=shared)
        assert result.header.complete
        assert result.shared_writes is (shared and ORDERED_HOST)
        assert result.stats.data_pages == len(saved.stream.pages)
        with SnapshotImage.open(str(path)) as image:
            assert image.verify().ok
        images.append(str(path))
    for other in images:
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(saved.image), other],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert compare.returncode == 0, compare.stdout + compare.stderr


def test_save_nbd_only_option(saved: Saved, tmp_path: Path) -> None:
    image = create(tmp_path / "nbd-only.qcow2")
    done = qsnap("save", "--json", "--nbd-only", str(image), stdin=saved.teed)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr)["shared_writes"] is False
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(saved.image), str(image)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr


def cut(stream: ParsedStream) -> tuple[bytes, bytes]:
    """(vmstate-only, RAM-only) streams: what QEMU's stream-content-list would send."""
    head = stream.data[: stream.prologue_end]
    vmstate = head + stream.data[stream.device_state_at :]
    ram = stream.data[: stream.device_state_at] + encode(r.Eof())
    return vmstate, ram


@pytest.mark.parametrize("vmstate_first", [True, False], ids=["vmstate-first", "ram-first"])
def test_two_pass_save_in_either_order(saved: Saved, tmp_path: Path, vmstate_first: bool) -> None:
    vmstate, ram = cut(saved.stream)
    image = create(tmp_path / "two.qcow2")
    passes = [(["--save-vmstate"], vmstate), ([], ram)]
    if not vmstate_first:
        passes.reverse()
    (args1, data1), (args2, data2) = passes
    first = qsnap("save", *args1, str(image), stdin=data1)
    assert first.returncode == 0, first.stderr
    missing = "ram" if vmstate_first else "vmstate"
    assert first.stderr.rstrip().endswith(f"incomplete image: (missing: {missing})")
    assert info(image)["missing"] == [missing]
    refused = qsnap("verify", str(image))
    assert refused.returncode == 1
    assert refused.stderr == (
        f"qsnap verify: error: incomplete image: save did not finish (missing: {missing})\n"
    )
    second = qsnap("save", *args2, str(image), stdin=data2)
    assert second.returncode == 0, second.stderr
    assert second.stderr.rstrip().endswith("; image complete")
    assert qsnap("verify", str(image)).returncode == 0
    with SnapshotImage.open(str(image)) as snap:
        header = snap.complete_header()
        assert b"".join(snap.device_state()) == saved.stream.data[saved.stream.device_state_at :]
        for (name, offset), page in list(saved.stream.pages.items())[::97]:
            assert snap.read(name, offset, PAGE) == page
        ds, first_block = header.device_state, header.blocks[0]
        assert (first_block.image_offset > ds.offset) == vmstate_first


def test_two_pass_refuses_a_foreign_machine(saved: Saved, tmp_path: Path) -> None:
    vmstate, ram = cut(saved.stream)
    image = create(tmp_path / "mix.qcow2")
    assert qsnap("save", "--save-vmstate", str(image), stdin=vmstate).returncode == 0
    other = encode(r.StreamHeader()) + encode(r.Configuration("pc-q35-10.0"))
    foreign = other + ram[saved.stream.prologue_end :]
    done = qsnap("save", str(image), stdin=foreign)
    assert done.returncode == 1
    assert done.stderr == (
        "qsnap save: error: this pass does not belong to the saved one: stream prologue "
        "differs (machine 'pc-q35-10.0', image has 'pc-i440fx-10.0')\n"
    )
    assert info(image)["missing"] == ["ram"]


def test_save_vmstate_refuses_a_stream_with_ram(saved: Saved, tmp_path: Path) -> None:
    image = create(tmp_path / "v.qcow2")
    done = qsnap("save", "--save-vmstate", str(image), stdin=saved.stream.data)
    assert done.returncode == 1
    assert done.stderr == (
        f"qsnap save: error: byte {saved.stream.prologue_end}: --save-vmstate expects a "
        "vmstate-only stream, but this one carries RAM\n"
    )


def pipe_feeder(data: bytes, seed: int) -> tuple[int, threading.Thread]:
    """The read end of a pipe that a thread fills with ``data`` in uneven pieces, with
    pauses: how QEMU's writes arrive (anywhere inside a page record)."""
    rfd, wfd = os.pipe()
    rng = random.Random(seed)

    def feed() -> None:
        with os.fdopen(wfd, "wb", buffering=0) as out, contextlib.suppress(BrokenPipeError):
            pos = 0
            while pos < len(data):
                n = rng.choice(
                    [rng.randint(1, 64), rng.randint(1, 40_000), rng.randint(1, 600_000)]
                )
                out.write(data[pos : pos + n])
                pos += n
                if rng.random() < 0.02:
                    time.sleep(0.005)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return rfd, thread


def save_from_pipe(data: bytes, image: Path, seed: int) -> SaveResult:
    rfd, thread = pipe_feeder(data, seed)
    try:
        return save(parse_spec(str(image)), read=StdinReader(30.0, fd=rfd))
    finally:
        os.close(rfd)  # a save that stopped early: the writer gets EPIPE
        thread.join(timeout=60)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pages_read_in_place_from_a_pipe_make_the_same_image(
    saved: Saved, tmp_path: Path, seed: int
) -> None:
    """Data pages go from the pipe straight into shared memory (readv past their headers)
    wherever the stream allows; the image is the one the exec: save made."""
    if not ORDERED_HOST:
        pytest.skip("no shared-memory writes on this host")
    image = create(tmp_path / "pipe.qcow2")
    result = save_from_pipe(saved.teed, image, seed)
    assert result.header.complete
    assert result.stats.data_pages == len(saved.stream.pages)
    assert result.stats.in_place_pages > result.stats.data_pages // 2
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(saved.image), str(image)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_a_bad_header_inside_a_page_run_read_in_place(saved: Saved, tmp_path: Path) -> None:
    """A header that breaks a run (an unknown flag) in the middle of the pages read in
    place: the same error at the same byte as a plain read, and no complete image."""
    data = bytearray(saved.teed)
    middle = sorted(saved.stream.pages)[len(saved.stream.pages) // 2]
    at = locate_page_header(bytes(data), middle)
    data[at + 7] |= 0x01  # RAM_SAVE_FLAG_FULL, retired long ago
    expected = ""
    try:
        save(parse_spec(str(create(tmp_path / "plain.qcow2"))), read=io.BytesIO(data).read)
    except StreamError as exc:
        expected = str(exc)
    assert f"byte {at}" in expected
    image = create(tmp_path / "pipe.qcow2")
    with pytest.raises(StreamError) as raised:
        save_from_pipe(bytes(data), image, seed=4)
    assert str(raised.value) == expected
    assert info(image)["complete"] is False


def locate_page_header(data: bytes, page: tuple[str, int]) -> int:
    """Where the record of data page ``page`` starts (a CONTINUE record, mid-block)."""
    reader = StreamReader()
    reader.feed(data)
    at = 0
    for rec in reader.records():
        if isinstance(rec, r.RamPage) and (rec.block, rec.offset) == page:
            return at
        at = reader.offset
    raise AssertionError(f"page {page} not in the stream")
