"""Memory references and their comparison, without QEMU.

Expected digests are computed here with hashlib directly, and expected differences are
the pages each test changed itself; streams are written byte by byte with struct.
"""

from __future__ import annotations

import hashlib
import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.harness.memory import (
    MemoryReferenceError,
    PageRef,
    ReferenceBuilder,
    compare,
    reference_from_pages,
    reference_from_stream,
)

PAGE = 4096


def blake8(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def page_of(byte: int) -> bytes:
    return bytes([byte]) * PAGE


# Block layouts: distinct names with 1..6 pages each.
layouts = st.dictionaries(
    st.sampled_from(["pc.ram", "0000:00:02.0/vga.vram", "pc.bios", "pc.rom", "/rom@etc/acpi"]),
    st.integers(1, 6),
    min_size=1,
).map(lambda d: [(name, pages * PAGE) for name, pages in d.items()])


def all_pages(layout: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(name, off) for name, length in layout for off in range(0, length, PAGE)]


@given(layouts, st.data())
def test_compare_names_exactly_the_changed_pages(
    layout: list[tuple[str, int]], data: st.DataObject
) -> None:
    pages = all_pages(layout)
    content = {p: data.draw(st.integers(0, 255)) for p in pages}
    changed = data.draw(st.sets(st.sampled_from(pages)))
    other = {p: (v + 1) % 256 if p in changed else v for p, v in content.items()}

    a = reference_from_pages(layout, [(b, o, page_of(v)) for (b, o), v in content.items()])
    b = reference_from_pages(layout, [(b, o, page_of(v)) for (b, o), v in other.items()])
    diff = compare(a, b)

    expected = [PageRef(name, off) for name, off in pages if (name, off) in changed]
    assert list(diff.mismatches) == expected
    assert diff.matches == (not changed)
    assert (diff.blocks, diff.pages) == (len(layout), len(pages))
    assert compare(a, a).matches


def test_digests_are_blake2b_64_of_each_page() -> None:
    ref = reference_from_pages(
        [("pc.ram", 3 * PAGE)], [("pc.ram", 0, page_of(1)), ("pc.ram", 2 * PAGE, page_of(7))]
    )
    block = ref.block("pc.ram")
    assert (block.length, block.page_size, block.pages) == (3 * PAGE, PAGE, 3)
    assert block.digest(0) == blake8(page_of(1))
    assert block.digest(1) == blake8(bytes(PAGE)), "a missing page counts as zero here"
    assert block.digest(2) == blake8(page_of(7))


def test_last_write_of_a_page_wins() -> None:
    ref = reference_from_pages(
        [("pc.ram", PAGE)], [("pc.ram", 0, page_of(1)), ("pc.ram", 0, page_of(2))]
    )
    assert ref.block("pc.ram").digest(0) == blake8(page_of(2))


def test_missing_pages_are_an_error_when_asked() -> None:
    builder = ReferenceBuilder([("pc.ram", 4 * PAGE), ("pc.rom", PAGE)], PAGE)
    builder.add_page("pc.ram", 0, page_of(1))
    builder.add_zero("pc.ram", PAGE)
    builder.add_zero("pc.rom", 0)
    with pytest.raises(MemoryReferenceError, match=r"pages never sent: pc.ram\+0x2000, "):
        builder.build()
    assert [str(p) for p in builder.missing()] == ["pc.ram+0x2000", "pc.ram+0x3000"]


@pytest.mark.parametrize(
    ("block", "offset", "size", "message"),
    [
        ("nope", 0, PAGE, r"nope\+0x0: unknown RAM block"),
        ("pc.ram", PAGE * 2, PAGE, r"pc.ram\+0x2000: not a page offset"),
        ("pc.ram", 100, PAGE, r"pc.ram\+0x64: not a page offset"),
        ("pc.ram", 0, 10, r"pc.ram\+0x0: 10 bytes, expected 4096"),
    ],
)
def test_bad_pages_are_named(block: str, offset: int, size: int, message: str) -> None:
    builder = ReferenceBuilder([("pc.ram", 2 * PAGE)], PAGE)
    with pytest.raises(MemoryReferenceError, match=message):
        builder.add_page(block, offset, bytes(size))


def test_summary_lines() -> None:
    layout = [("pc.ram", 4 * PAGE), ("pc.rom", PAGE)]
    a = reference_from_pages(layout, [])
    b = reference_from_pages(layout, [("pc.ram", PAGE, page_of(1))])
    c = reference_from_pages(layout, [("pc.ram", p, page_of(1)) for p in (0, PAGE, 3 * PAGE)])
    assert compare(a, a).summary() == "memory matches reference: 2 blocks, 5 pages"
    assert compare(a, b).summary() == "1 page differs: pc.ram+0x1000"
    assert compare(a, c).summary(limit=2) == (
        "3 pages differ: pc.ram+0x0, pc.ram+0x1000 and 1 more"
    )


def test_block_set_and_geometry_differences() -> None:
    a = reference_from_pages([("pc.ram", 2 * PAGE), ("vga", PAGE), ("rom", PAGE)], [])
    b = reference_from_pages([("pc.ram", 4 * PAGE), ("rom", PAGE), ("new", PAGE)], [])
    diff = compare(a, b)
    assert not diff.matches
    assert diff.missing_blocks == ("vga",)
    assert diff.extra_blocks == ("new",)
    assert diff.mismatches == ()
    assert (diff.blocks, diff.pages) == (1, 1)
    assert str(diff) == (
        "block vga missing; extra block new; "
        "pc.ram: 0x2000 bytes in 4096-byte pages vs 0x4000 in 4096-byte pages"
    )


# A background-snapshot-shaped stream, written by hand (see migration-wire-format.md).
RAM_ID = 2


def str8(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


def be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def stream_bytes(
    pages: list[tuple[str, int, bytes | None]], blocks: list[tuple[str, int]]
) -> bytes:
    out = struct.pack(">II", 0x5145564D, 3)
    out += b"\x07" + struct.pack(">I", 14) + b"pc-i440fx-10.0"
    out += b"\x01" + struct.pack(">I", RAM_ID) + str8("ram") + struct.pack(">II", 0, 4)
    out += be64(sum(length for _, length in blocks) | 0x04)
    for name, length in blocks:
        out += str8(name) + be64(length)
    out += be64(0x10) + b"\x7e" + struct.pack(">I", RAM_ID)
    out += b"\x02" + struct.pack(">I", RAM_ID)
    for name, offset, data in pages:
        if data is None:
            out += be64(offset | 0x02) + str8(name) + b"\x00"
        else:
            out += be64(offset | 0x08) + str8(name) + data
    out += be64(0x10) + b"\x7e" + struct.pack(">I", RAM_ID)
    out += b"\x04" + struct.pack(">I", 3) + str8("timer") + struct.pack(">II", 0, 2)
    out += bytes(range(24)) + b"\x7e" + struct.pack(">I", 3)
    vmdesc = b'{"page_size": 4096, "devices": []}'
    return out + b"\x00" + b"\x06" + struct.pack(">I", len(vmdesc)) + vmdesc


BLOCKS = [("pc.ram", 3 * PAGE), ("pc.bios", PAGE)]


def test_reference_from_stream() -> None:
    raw = stream_bytes(
        [
            ("pc.ram", 0, page_of(3)),
            ("pc.bios", 0, page_of(9)),
            ("pc.ram", 2 * PAGE, None),
            ("pc.ram", PAGE, page_of(4)),
        ],
        BLOCKS,
    )
    ref = reference_from_stream(io.BytesIO(raw))
    assert [(b.idstr, b.length) for b in ref.blocks] == BLOCKS
    ram = ref.block("pc.ram")
    assert [ram.digest(i) for i in range(3)] == [
        blake8(page_of(3)),
        blake8(page_of(4)),
        blake8(bytes(PAGE)),
    ]
    assert ref.block("pc.bios").digest(0) == blake8(page_of(9))
    assert str(ref) == "2 blocks, 4 pages"


def test_stream_with_a_missing_page_is_refused() -> None:
    raw = stream_bytes([("pc.ram", 0, page_of(1)), ("pc.bios", 0, None)], BLOCKS)
    with pytest.raises(MemoryReferenceError, match=r"^s.bin: pages never sent: pc.ram\+0x1000"):
        reference_from_stream(io.BytesIO(raw), "s.bin")


@given(st.data())
def test_stream_truncated_before_the_device_state_is_refused(data: st.DataObject) -> None:
    pages: list[tuple[str, int, bytes | None]] = [
        ("pc.ram", o, page_of(1)) for o in (0, PAGE, 2 * PAGE)
    ]
    raw = stream_bytes([*pages, ("pc.bios", 0, None)], BLOCKS)
    device_start = raw.index(b"\x04" + struct.pack(">I", 3) + str8("timer"))
    keep = data.draw(st.integers(0, device_start - 1))
    with pytest.raises(MemoryReferenceError, match=r"^s.bin: byte \d+: "):
        reference_from_stream(io.BytesIO(raw[:keep]), "s.bin")
