"""encode() and RamEncoder against bytes written out by hand from QEMU's senders."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.stream import RamEncoder, StreamReader, encode, encode_footer
from qsnap.stream import records as r


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


@pytest.mark.parametrize(
    ("record", "wire"),
    [
        (r.StreamHeader(), b"QEVM\x00\x00\x00\x03"),
        (r.Configuration("pc"), b"\x07\x00\x00\x00\x02pc"),
        (
            r.Configuration("m", (r.TargetPageBits(12),)),
            b"\x07\x00\x00\x00\x01m\x05\x1econfiguration/target-page-bits"
            + be32(1) + be32(12),
        ),
        (r.SectionStart(2, "ram", 0, 4), b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)),
        (r.SectionFull(7, "timer", 1, 2), b"\x04" + be32(7) + b"\x05timer" + be32(1) + be32(2)),
        (r.SectionPart(2), b"\x02\x00\x00\x00\x02"),
        (r.SectionEnd(2), b"\x03\x00\x00\x00\x02"),
        (r.SectionFooter(2), b"\x7e\x00\x00\x00\x02"),
        (r.OpenReturnPath(), b"\x08\x00\x01\x00\x00"),
        (r.Ping(5), b"\x08\x00\x02\x00\x04\x00\x00\x00\x05"),
        (r.PostcopyAdvise(4096, 4096), b"\x08\x00\x03\x00\x10" + be64(4096) + be64(4096)),
        (r.PostcopyAdvise(None, None), b"\x08\x00\x03\x00\x00"),
        (r.PostcopyListen(), b"\x08\x00\x04\x00\x00"),
        (r.PostcopyRun(), b"\x08\x00\x05\x00\x00"),
        (
            r.PostcopyRamDiscard("pc.ram", ((0, 4096), (8192, 4096))),
            b"\x08\x00\x06\x00\x29\x00\x06pc.ram\x00" + be64(0) + be64(4096) + be64(8192)
            + be64(4096),
        ),
        (r.Packaged(b"\x08\x00\x05\x00\x00"), b"\x08\x00\x07\x00\x04" + be32(5) + b"\x08\0\5\0\0"),
        (r.EnableColo(), b"\x08\x00\x08\x00\x00"),
        (r.PostcopyResume(), b"\x08\x00\x09\x00\x00"),
        (r.RecvBitmap("pc.ram"), b"\x08\x00\x0a\x00\x07\x06pc.ram"),
        (r.SwitchoverStart(), b"\x08\x00\x0b\x00\x00"),
        (
            r.RamMemSize((r.RamBlockInfo("pc.ram", 0x8000000), r.RamBlockInfo("v", 0x1000, 4096))),
            be64(0x8001000 | 4) + b"\x06pc.ram" + be64(0x8000000) + b"\x01v" + be64(0x1000)
            + be64(4096),
        ),
        (r.RamZero("pc.ram", 0x5000, False), be64(0x5002) + b"\x06pc.ram\x00"),
        (r.RamZero("pc.ram", 0x5000, True), be64(0x5022) + b"\x00"),
        (r.RamPage("a", 0x1000, b"\xaa" * 4096, False), be64(0x1008) + b"\x01a" + b"\xaa" * 4096),
        (r.RamPage("a", 0x1000, b"\xaa" * 4096, True), be64(0x1028) + b"\xaa" * 4096),
        (r.RamEos(), be64(0x10)),
        (r.RamMultifdFlush(), be64(0x200)),
        (r.Eof(), b"\x00"),
        (r.VmDescription(b"{}"), b"\x06\x00\x00\x00\x02{}"),
        (r.DeviceStateStart(9, r.SectionFull(1, "x", 0, 1)), b""),
        (r.DeviceStateChunk(b"abc"), b"abc"),
    ],
)  # fmt: skip
def test_encode(record: r.Record, wire: bytes) -> None:
    assert encode(record) == wire


def test_encode_footer() -> None:
    assert encode_footer(0x01020304) == b"\x7e\x01\x02\x03\x04"


@pytest.mark.parametrize(
    "record",
    [
        r.RamZero("a", 0x1001, False),
        r.RamPage("a", -4096, b"", False),
        r.PostcopyAdvise(1, None),
        r.Configuration("x", (r.Uuid(b"short"),)),
        r.SectionStart(1, "x" * 256, 0, 1),
    ],
)
def test_encode_rejects_unencodable_records(record: r.Record) -> None:
    with pytest.raises(ValueError):
        encode(record)


def test_ram_encoder_sets_continue_and_keeps_it_across_sections() -> None:
    ram = RamEncoder(4096)
    page = bytes(range(256)) * 16
    assert ram.page("pc.ram", 0, page) == be64(0x08) + b"\x06pc.ram" + page
    assert ram.zero("pc.ram", 0x1000) == be64(0x1022) + b"\x00"
    assert ram.eos() == be64(0x10)
    assert ram.page("pc.ram", 0x2000, page) == be64(0x2028) + page
    assert ram.zero("vga", 0) == be64(0x02) + b"\x03vga\x00"
    assert ram.page("pc.ram", 0x3000, page) == be64(0x3008) + b"\x06pc.ram" + page
    ram.reset()
    assert ram.zero("pc.ram", 0) == be64(0x02) + b"\x06pc.ram\x00"


def test_ram_encoder_checks_its_input() -> None:
    ram = RamEncoder(4096)
    with pytest.raises(ValueError):
        ram.page("a", 0, b"x" * 4095)
    with pytest.raises(ValueError):
        ram.zero("a", 0x800)
    with pytest.raises(ValueError):
        RamEncoder(3000)


@given(
    st.sampled_from([1024, 4096, 16384]),
    st.lists(
        st.tuples(st.sampled_from(["a", "bb"]), st.integers(0, 7), st.booleans()), max_size=30
    ),
)
def test_ram_encoder_output_parses_back(page_size: int, ops: list[tuple[str, int, bool]]) -> None:
    ram = RamEncoder(page_size)
    page = b"\x5a" * page_size
    body = b"".join(
        ram.page(block, n * page_size, page) if is_page else ram.zero(block, n * page_size)
        for block, n, is_page in ops
    )
    header = (
        b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x01m"
        + (b"\x05\x1econfiguration/target-page-bits" + be32(1) + be32(page_size.bit_length() - 1))
        + b"\x01" + be32(0) + b"\x03ram" + be32(0) + be32(4)
        + be64(16 * page_size | 4) + b"\x01a" + be64(8 * page_size) + b"\x02bb"
        + be64(8 * page_size) + be64(0x10) + b"\x7e" + be32(0) + b"\x02" + be32(0)
    )  # fmt: skip
    reader = StreamReader()
    reader.feed(header + body + be64(0x10) + b"\x7e" + be32(0) + b"\x00")
    out = [rec for rec in reader.records() if isinstance(rec, r.RamPage | r.RamZero)]
    reader.close()
    assert [(rec.block, rec.offset, isinstance(rec, r.RamPage)) for rec in out] == [
        (block, n * page_size, is_page) for block, n, is_page in ops
    ]
    previous = [None] + [block for block, _, _ in ops]
    assert [rec.continued for rec in out] == [
        block == before for (block, _, _), before in zip(ops, previous, strict=False)
    ]
