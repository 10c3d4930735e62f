"""The on-disk layout: header encoding, corruption detection, region allocation."""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.image import layout
from qsnap.image.errors import ImageTooSmall, NotAnImage
from qsnap.image.layout import BlockEntry, Header, ImageState, Pass, Region

MiB = 1 << 20

block_lists = st.lists(
    st.tuples(
        st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60),
        st.integers(1, 1 << 16).map(lambda pages: pages * 4096),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda t: t[0],
)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    raw = draw(block_lists)
    blocks = [
        BlockEntry(
            idstr=name,
            used_length=length,
            page_size=draw(st.sampled_from([0, 4096, 2 * MiB])),
            mr_addr=draw(st.none() | st.integers(0, 2**64 - 1)),
            data_pages=draw(st.integers(0, length // 4096)),
        )
        for name, length in raw
    ]
    placed, digests, end = layout.ram_layout(blocks, 4096, layout.HEADER_SIZE)
    ds_len = draw(st.integers(0, 1 << 40))
    return Header(
        state=draw(st.sampled_from(ImageState)),
        passes=Pass(draw(st.integers(0, 3))),
        page_size=4096,
        machine_type=draw(st.text(max_size=40)),
        prologue=draw(st.binary(max_size=200)),
        ram_section_id=draw(st.integers(0, 2**32 - 1)),
        ram_instance_id=draw(st.integers(0, 2**32 - 1)),
        ram_version_id=4,
        ram_setup=draw(st.binary(max_size=500)),
        blocks=placed,
        device_state=Region(end, ds_len),
        device_sections_length=draw(st.integers(0, ds_len)),
        device_state_digest=draw(st.binary(min_size=32, max_size=32)),
        digests=digests,
    )


@given(headers())
def test_header_round_trip(header: Header) -> None:
    data = layout.encode_header(header)
    assert layout.header_length(data[:16]) == len(data)
    assert layout.decode_header(data + bytes(100)) == header


def test_header_byte_table() -> None:
    """Fixed fields at the offsets docs/image-format.md gives."""
    header = Header(
        state=ImageState.COMPLETE,
        passes=Pass.RAM | Pass.VMSTATE,
        page_size=4096,
        machine_type="pc-i440fx-10.0",
        prologue=b"QEVM",
        ram_section_id=2,
        ram_setup=b"\x01setup",
        blocks=(BlockEntry("pc.ram", 8 * MiB, MiB, data_pages=3, zero_pages=2045),),
        device_state=Region(10 * MiB, 5000),
        device_sections_length=4000,
        digests=Region(9 * MiB, 2048 * 8),
    )
    data = layout.encode_header(header)
    assert data[:8] == b"QSNAPIMG"
    assert struct.unpack_from(">IIIIII", data, 8) == (1, len(data), 2, 3, 4096, 1)
    assert struct.unpack_from(">QQQQQ", data, 48) == (10 * MiB, 5000, 4000, 9 * MiB, 16384)
    assert data[120:138] == b"\x00\x00\x00\x0epc-i440fx-10.0"
    assert data[-32:] == hashlib.blake2b(data[:-32], digest_size=32).digest()


@given(headers(), st.data())
def test_any_flipped_byte_is_refused(header: Header, data: st.DataObject) -> None:
    encoded = bytearray(layout.encode_header(header))
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(NotAnImage) as info:
        layout.decode_header(bytes(encoded))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(("corrupt qsnap header", "not a qsnap image", "unsupported"))


@given(headers(), st.data())
def test_truncated_header_is_refused(header: Header, data: st.DataObject) -> None:
    encoded = layout.encode_header(header)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(NotAnImage):
        layout.decode_header(encoded[:cut])


def test_empty_and_foreign_disks() -> None:
    with pytest.raises(NotAnImage, match="header is empty"):
        layout.decode_header(bytes(4096))
    with pytest.raises(NotAnImage, match="magic b'QFI"):
        layout.decode_header(b"QFI\xfb" + bytes(4092))


def _resealed(data: bytes) -> bytes:
    body = data[:-32]
    return body + hashlib.blake2b(body, digest_size=32).digest()


def test_checksummed_but_inconsistent_headers_are_refused() -> None:
    blocks, digests, end = layout.ram_layout([BlockEntry("a", 4 * MiB)], 4096, MiB)
    good = Header(blocks=blocks, digests=digests, device_state=Region(end, 10))
    overlapping = good.with_(device_state=Region(blocks[0].image_offset, 10))
    with pytest.raises(NotAnImage, match="device state at 0x100000 overlaps block 'a'"):
        layout.decode_header(layout.encode_header(overlapping))
    bad_table = good.with_(digests=Region(digests.offset, 8))
    with pytest.raises(NotAnImage, match="digest table length"):
        layout.decode_header(layout.encode_header(bad_table))
    data = bytearray(layout.encode_header(good))
    data[24:28] = struct.pack(">I", 3000)
    with pytest.raises(NotAnImage, match="page size 3000"):
        layout.decode_header(_resealed(bytes(data)))
    data = bytearray(layout.encode_header(good))
    data[16:20] = struct.pack(">I", 7)
    with pytest.raises(NotAnImage, match="state 7"):
        layout.decode_header(_resealed(bytes(data)))


@given(block_lists, st.integers(0, 64 * MiB))
def test_allocation_is_aligned_ordered_and_disjoint(raw: list[tuple[str, int]], base: int) -> None:
    blocks = [BlockEntry(name, length) for name, length in raw]
    placed, digests, end = layout.ram_layout(blocks, 4096, base)
    assert [b.idstr for b in placed] == [b.idstr for b in blocks]
    regions = [b.region for b in placed] + [digests]
    assert regions[0].offset >= base
    for prev, cur in itertools.pairwise(regions):
        assert cur.offset % MiB == 0
        assert cur.offset >= prev.end
        assert cur.offset - prev.end < MiB
    assert digests.length == sum(length // 4096 for _, length in raw) * 8
    assert end % MiB == 0 and end >= digests.end


@given(st.integers(1, 1 << 36), st.integers(0, 1 << 30))
def test_fit_check_names_the_needed_size(needed: int, short: int) -> None:
    layout.check_fits(needed, needed, "x")
    if short and short < needed:
        with pytest.raises(ImageTooSmall) as info:
            layout.check_fits(needed, needed - short, "the RAM")
        assert info.value.needed >= needed
        assert f"at least {needed} bytes" in str(info.value)


@given(st.integers(1, 64).map(lambda g: g * 256 * MiB))
def test_create_size_fits_a_pc_guest(ram: int) -> None:
    """RAM + 16 MiB VRAM + ROMs of a pc machine fit what ``qsnap create`` makes."""
    blocks = [
        BlockEntry("pc.ram", ram),
        BlockEntry("0000:00:02.0/vga.vram", 16 * MiB),
        BlockEntry("pc.bios", 256 << 10),
        BlockEntry("pc.rom", 128 << 10),
        BlockEntry("/rom@etc/acpi/tables", 128 << 10),
    ]
    _, _, end = layout.ram_layout(blocks, 4096, layout.HEADER_SIZE)
    assert end + layout.DEFAULT_VMSTATE_SIZE <= layout.create_size(ram)
