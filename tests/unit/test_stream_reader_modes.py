"""Reader options and stream shapes: vmstate-only, RAM-only, packaged, page sizes,
block-list fields. Inputs are written by hand from QEMU's layouts."""

from __future__ import annotations

import struct

import pytest

from qsnap.stream import StreamError, StreamOptions, StreamReader, encode
from qsnap.stream import records as r


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


HEADER = b"QEVM\x00\x00\x00\x03"
CONFIG = b"\x07\x00\x00\x00\x0epc-i440fx-10.0"
TIMER = b"\x04" + be32(0) + b"\x05timer" + be32(0) + be32(2)


def parse(data: bytes, options: StreamOptions | None = None) -> tuple[list[r.Record], StreamReader]:
    reader = StreamReader(options)
    reader.feed(data)
    out = list(reader.records())
    reader.close()
    assert b"".join(encode(rec) for rec in out) == data
    return out, reader


def test_vmstate_only_stream_with_expect_ram_false() -> None:
    device = TIMER + b"\x00" * 16 + b"\x7e" + be32(0)
    vmdesc = b'{"devices":[]}'
    data = HEADER + CONFIG + device + b"\x00\x06" + be32(len(vmdesc)) + vmdesc
    out, reader = parse(data, StreamOptions(expect_ram=False))
    assert out[:3] == [
        r.StreamHeader(3),
        r.Configuration("pc-i440fx-10.0"),
        r.DeviceStateStart(27, r.SectionFull(0, "timer", 0, 2)),
    ]
    assert b"".join(c.data for c in out[3:] if isinstance(c, r.DeviceStateChunk)) == data[27:]
    assert reader.device_state_end is not None
    assert reader.device_state_end.eof_offset == 27 + len(device)
    assert reader.device_state_end.vmdesc_length == len(vmdesc)
    with pytest.raises(StreamError, match="before the RAM setup"):
        parse(data)


def test_ram_only_stream() -> None:
    data = (
        HEADER + CONFIG
        + b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
        + be64(0x1000 | 4) + b"\x06pc.ram" + be64(0x1000) + be64(0x10) + b"\x7e" + be32(2)
        + b"\x03" + be32(2) + be64(0x02) + b"\x06pc.ram\x00" + be64(0x10) + b"\x7e" + be32(2)
        + b"\x00"
    )  # fmt: skip
    out, reader = parse(data)
    assert out[-5:] == [
        r.SectionEnd(2),
        r.RamZero("pc.ram", 0, False),
        r.RamEos(),
        r.SectionFooter(2),
        r.Eof(),
    ]
    assert reader.ram_section_id == 2
    assert reader.device_state_end is None


def test_configuration_is_optional() -> None:
    out, _ = parse(HEADER + b"\x00")
    assert out == [r.StreamHeader(3), r.Eof()]


def test_packaged_payload_parses_in_packaged_mode() -> None:
    inner = b"\x08\x00\x04\x00\x00" + TIMER + b"abc\x7e" + be32(0) + b"\x08\x00\x05\x00\x00"
    data = HEADER + CONFIG + b"\x08\x00\x07\x00\x04" + be32(len(inner)) + inner + b"\x00"
    out, _ = parse(data)
    assert out[2] == r.Packaged(inner)
    nested, reader = parse(inner, StreamOptions(packaged=True))
    assert nested[:2] == [
        r.PostcopyListen(),
        r.DeviceStateStart(5, r.SectionFull(0, "timer", 0, 2)),
    ]
    assert b"".join(c.data for c in nested[2:] if isinstance(c, r.DeviceStateChunk)) == inner[5:]
    assert reader.device_state_end is None


def test_packaged_mode_without_device_state() -> None:
    out, _ = parse(b"\x08\x00\x04\x00\x00\x08\x00\x05\x00\x00", StreamOptions(packaged=True))
    assert out == [r.PostcopyListen(), r.PostcopyRun()]


def _ram_stream(config: bytes, entry: bytes, total: int, page: int) -> bytes:
    return (
        HEADER + config
        + b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
        + be64(total | 4) + entry + be64(0x10) + b"\x7e" + be32(2)
        + b"\x02" + be32(2) + be64(page | 0x08) + b"\x01a" + bytes(range(256)) * 4
        + be64(0x10) + b"\x7e" + be32(2) + b"\x00"
    )  # fmt: skip


def test_target_page_bits_sets_page_size() -> None:
    config = b"\x07\x00\x00\x00\x01x\x05\x1econfiguration/target-page-bits" + be32(1) + be32(10)
    out, reader = parse(_ram_stream(config, b"\x01a" + be64(0x800), 0x800, 0x400))
    assert reader.page_size == 1024
    assert out[1] == r.Configuration("x", (r.TargetPageBits(10),))
    pages = [rec for rec in out if isinstance(rec, r.RamPage)]
    assert pages == [r.RamPage("a", 0x400, bytes(range(256)) * 4, False)]


def test_ignore_shared_from_capabilities() -> None:
    config = (
        b"\x07\x00\x00\x00\x01x\x05\x1aconfiguration/capabilities" + be32(1)
        + be32(2) + b"\x0fx-ignore-shared\x0dvalidate-uuid"
        + b"\x05\x12configuration/uuid" + be32(1) + bytes(range(16))
        + b"\x05\x1econfiguration/target-page-bits" + be32(1) + be32(10)
    )  # fmt: skip
    data = _ram_stream(config, b"\x01a" + be64(0x800) + be64(0xFEE00000), 0x800, 0)
    out, reader = parse(data)
    assert out[1] == r.Configuration(
        "x",
        (
            r.Capabilities(("x-ignore-shared", "validate-uuid")),
            r.Uuid(bytes(range(16))),
            r.TargetPageBits(10),
        ),
    )
    assert reader.mem_size == r.RamMemSize((r.RamBlockInfo("a", 0x800, None, 0xFEE00000),))
    with pytest.raises(StreamError):
        parse(data, StreamOptions(ignore_shared=False))


def test_block_page_sizes_for_named_blocks() -> None:
    config = b"\x07\x00\x00\x00\x01x\x05\x1econfiguration/target-page-bits" + be32(1) + be32(10)
    entries = b"\x01a" + be64(0x800) + be64(0x200000) + b"\x01b" + be64(0x400)
    data = _ram_stream(config, entries, 0xC00, 0x400)
    _, reader = parse(data, StreamOptions(block_page_sizes=frozenset({"a"})))
    assert reader.mem_size == r.RamMemSize(
        (r.RamBlockInfo("a", 0x800, 0x200000), r.RamBlockInfo("b", 0x400))
    )


def test_continue_block_persists_across_sections() -> None:
    data = (
        HEADER + CONFIG
        + b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
        + be64(0x2000 | 4) + b"\x01a" + be64(0x2000) + be64(0x10) + b"\x7e" + be32(2)
        + b"\x02" + be32(2) + be64(0x02) + b"\x01a\x00" + be64(0x10) + b"\x7e" + be32(2)
        + b"\x08\x00\x02\x00\x04" + be32(9)
        + b"\x02" + be32(2) + be64(0x1022) + b"\x00" + be64(0x10) + b"\x7e" + be32(2)
        + b"\x00"
    )  # fmt: skip
    out, _ = parse(data)
    zeros = [rec for rec in out if isinstance(rec, r.RamZero)]
    assert zeros == [r.RamZero("a", 0, False), r.RamZero("a", 0x1000, True)]
    assert r.Ping(9) in out


def test_raw_mode_starts_at_first_device_section_after_ram() -> None:
    data = (
        HEADER + CONFIG
        + b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
        + be64(0x1000 | 4) + b"\x01a" + be64(0x1000) + be64(0x10) + b"\x7e" + be32(2)
    )  # fmt: skip
    start = len(data)
    data += b"\x01" + be32(3) + b"\x0cdirty-bitmap" + be32(0) + be32(1) + b"\x02" + be32(2) + b"\0"
    out, reader = parse(data)
    assert out[-2] == r.DeviceStateStart(start, r.SectionStart(3, "dirty-bitmap", 0, 1))
    assert out[-1] == r.DeviceStateChunk(data[start:])
    assert reader.raw and reader.offset == len(data)


def test_feed_after_close_is_a_usage_error() -> None:
    reader = StreamReader()
    reader.feed(HEADER + b"\x00")
    list(reader.records())
    reader.close()
    with pytest.raises(ValueError):
        reader.feed(b"x")


@pytest.mark.parametrize("page_size", [0, 512, 3000, 1 << 21])
def test_bad_page_size_option(page_size: int) -> None:
    with pytest.raises(ValueError):
        StreamOptions(page_size=page_size)


def test_close_keeps_undrained_records() -> None:
    data = HEADER + CONFIG + TIMER + b"state\x00"
    reader = StreamReader(StreamOptions(expect_ram=False))
    reader.feed(data)
    reader.close()
    out = list(reader.records())
    assert out[:2] == [r.StreamHeader(3), r.Configuration("pc-i440fx-10.0")]
    assert b"".join(encode(rec) for rec in out) == data
    assert reader.device_state_end is not None
    assert reader.device_state_end.eof_offset == len(data) - 1
    assert list(reader.records()) == []


def test_records_do_not_alias_the_fed_buffers() -> None:
    page = bytes(range(256)) * 16
    data = bytearray(
        HEADER + CONFIG
        + b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
        + be64(0x1000 | 4) + b"\x01a" + be64(0x1000) + be64(0x10) + b"\x7e" + be32(2)
        + b"\x02" + be32(2) + be64(0x08) + b"\x01a" + page + be64(0x10) + b"\x7e" + be32(2)
        + b"\x00"
    )  # fmt: skip
    reader = StreamReader()
    reader.feed(memoryview(data)[:100])
    reader.feed(data[100:])
    out = list(reader.records())
    reader.close()
    data[:] = bytes(len(data))
    pages = [rec for rec in out if isinstance(rec, r.RamPage)]
    assert [type(p.data) for p in pages] == [bytes]
    assert pages[0].data == page
