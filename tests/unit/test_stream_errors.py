"""One test per kind of malformed input: the StreamError names the byte offset
and what was expected. Streams are written out by hand from QEMU's layouts."""

from __future__ import annotations

import struct

import pytest

from qsnap.stream import StreamError, StreamOptions, StreamReader


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


HEADER = b"QEVM\x00\x00\x00\x03"  # 0..8
CONFIG = b"\x07\x00\x00\x00\x02pc"  # 8..15
RAM_START = b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)  # 15..32
MEM_SIZE = be64(0x2000 | 0x04) + b"\x06pc.ram" + be64(0x2000)  # 32..55
EOS = be64(0x10)  # 55..63
FOOTER = b"\x7e" + be32(2)  # 63..68
PROLOGUE = HEADER + CONFIG + RAM_START + MEM_SIZE + EOS + FOOTER
PART = b"\x02" + be32(2)  # 68..73
assert len(PROLOGUE) == 68


def error_of(data: bytes, options: StreamOptions | None = None, chunk: int = 0) -> StreamError:
    reader = StreamReader(options)
    chunk = chunk or len(data) or 1
    with pytest.raises(StreamError) as err:
        for i in range(0, len(data), chunk):
            reader.feed(data[i : i + chunk])
            list(reader.records())
        reader.close()
    return err.value


@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize(
    ("data", "offset", "message"),
    [
        (b"QEVN\x00\x00\x00\x03", 0, "bad magic 0x5145564e, expected 0x5145564d"),
        (b"QEVM\x00\x00\x00\x02", 4, "stream version 2 is obsolete"),
        (b"QEVM\x00\x00\x00\x07", 4, "unsupported stream version 7"),
        (HEADER + b"\x07" + be32(257) + b"x" * 257, 9, "machine name of 257 bytes"),
        (
            HEADER + b"\x07" + be32(1) + b"p\x05\x0dconfiguration" + be32(1),
            14,
            "unknown configuration subsection 'configuration'",
        ),
        (
            HEADER + CONFIG[:-2] + b"pc\x05\x1aconfiguration/capabilities" + be32(1)
            + be32(1) + b"\x0amapped-ram",
            47,
            "mapped-ram streams are not supported",
        ),
        (
            HEADER + CONFIG + b"\x04" + be32(3) + b"\x0avirtio-mem" + be32(0) + be32(1),
            15,
            "device section 'virtio-mem' (section id 3) before the RAM setup",
        ),
        (PROLOGUE + b"\x09", 68, "unknown section type 0x09"),
        (PROLOGUE + b"\x06" + be32(2) + b"{}", 68, "VMDESCRIPTION before EOF"),
        (PROLOGUE + b"\x7e" + be32(2), 68, "unexpected SECTION_FOOTER"),
        (PROLOGUE + b"\x08\x00\x63\x00\x00", 68, "unknown command 0x0063"),
        (PROLOGUE + b"\x08\x00\x00\x00\x00", 68, "unknown command 0x0000"),
        (PROLOGUE + b"\x08\x00\x02\x00\x03abc", 68, "command PING with length 3, expected 4"),
        (PROLOGUE + b"\x08\x00\x01\x00\x01x", 68, "OPEN_RETURN_PATH with length 1, expected 0"),
        (PROLOGUE + b"\x08\x00\x03\x00\x08" + be64(1), 68, "expected 0 or 16"),
        (
            PROLOGUE + b"\x08\x00\x06\x00\x14\x01\x02pc\x00" + be64(0) + be64(1)[:7],
            73,
            "POSTCOPY_RAM_DISCARD version 1, expected 0",
        ),
        (
            PROLOGUE + b"\x08\x00\x06\x00\x15\x00\x02pc\x01" + be64(0) + be64(1),
            77,
            "name not followed by 0 but 0x01",
        ),
        (
            PROLOGUE + b"\x08\x00\x06\x00\x0d\x00\x02pc\x00" + be64(0),
            68,
            "POSTCOPY_RAM_DISCARD with 8 bytes of ranges",
        ),
        (
            PROLOGUE + b"\x08\x00\x06\x00\x05\x00\x02pc\x00",
            68,
            "POSTCOPY_RAM_DISCARD with 0 bytes of ranges",
        ),
        (
            PROLOGUE + b"\x08\x00\x0a\x00\x04\x02pcX",
            68,
            "RECV_BITMAP with length 4, expected 3",
        ),
        (PROLOGUE + b"\x08\x00\x0a\x00\x02\x05p", 68, "RECV_BITMAP payload of 2 bytes is too"),
        (
            PROLOGUE + b"\x08\x00\x07\x00\x04" + be32((16 << 20) + 1),
            73,
            "PACKAGED payload of 16777217 bytes (at most 16777216)",
        ),
        (PROLOGUE + b"\x02" + be32(9), 68, "SECTION_PART for unknown section id 9"),
        (PROLOGUE + b"\x03" + be32(9), 68, "SECTION_END for unknown section id 9"),
        (PROLOGUE + PART + be64(0x40), 73, "XBZRLE pages are not supported"),
        (PROLOGUE + PART + be64(0x100), 73, "compressed pages"),
        (PROLOGUE + PART + be64(0x80), 73, "RDMA hook records"),
        (PROLOGUE + PART + be64(0x001), 73, "unknown RAM flags 0x1"),
        (PROLOGUE + PART + be64(0x400), 73, "unknown RAM flags 0x400"),
        (PROLOGUE + PART + be64(0x0A) + b"\x06pc.ram", 73, "invalid RAM flag combination 0xa"),
        (PROLOGUE + PART + be64(0x1010), 73, "RAM EOS record with offset 0x1000"),
        (PROLOGUE + PART + be64(0x22) + b"\x00", 73, "CONTINUE but no previous block"),
        (PROLOGUE + PART + be64(0x02) + b"\x06pc.ram\x07", 88, "ZERO page fill byte 0x07"),
        (
            PROLOGUE + PART + be64(0x02) + b"\x06pc.ram\x00" + be64(0x1022) + b"\x01",
            89 + 8,
            "ZERO page fill byte 0x01",
        ),
        (
            PROLOGUE + PART + be64(0x08) + b"\x03vga" + b"\x00" * 4096,
            73,
            "RAM block 'vga' is not in the MEM_SIZE list",
        ),
        (
            PROLOGUE + PART + be64(0x2008) + b"\x06pc.ram",
            73,
            "RAM offset 0x2000 out of block 'pc.ram' (used_length 0x2000)",
        ),
        (
            PROLOGUE + PART + be64(0x02) + b"\x06pc.ram\x00" + be64(0x2022),
            89,
            "RAM offset 0x2000 out of block 'pc.ram'",
        ),
        (PROLOGUE + PART + EOS + b"\x7e" + be32(3), 81, "SECTION_FOOTER for section 3"),
        (PROLOGUE + PART + EOS + b"\x00", 81, "expected SECTION_FOOTER for section 2, got 0x00"),
        (PROLOGUE + PART + MEM_SIZE, 73, "second RAM block list"),
        (
            HEADER + CONFIG + RAM_START + be64(0x2004) + b"\x06pc.ram" + be64(0x3000),
            40,
            "RAM block 'pc.ram' length 0x3000 exceeds the 0x2000 bytes left",
        ),
        (
            HEADER + CONFIG + RAM_START + be64(0x3004) + b"\x01a" + be64(0x1000) + b"\x01a"
            + be64(0x1000),
            50,
            "RAM block 'a' listed twice",
        ),
        (
            HEADER + CONFIG + RAM_START + be64(0x1004) + b"\x01a" + be64(0),
            40,
            "RAM block 'a' has length 0",
        ),
        (HEADER + CONFIG + RAM_START + be64(0x08) + b"\x01a", 32, "RAM page before the RAM block"),
        (HEADER + CONFIG + RAM_START[:-1] + b"\x03", 15, "RAM section version 3"),
        (HEADER + CONFIG + b"\x04" + RAM_START[1:], 15, "RAM in a SECTION_FULL"),
        (PROLOGUE + RAM_START, 68, "second RAM SECTION_START"),
        (PROLOGUE + b"\x00\x07", 69, "expected VMDESCRIPTION after EOF, got CONFIGURATION"),
        (
            PROLOGUE + b"\x00\x06" + be32((64 << 20) + 1),
            70,
            "VMDESCRIPTION of 67108865 bytes (at most 67108864)",
        ),
        (PROLOGUE + b"\x00\x06" + be32(2) + b"{}\x00", 76, "unexpected data after the VMDESC"),
    ],
)  # fmt: skip
def test_error(data: bytes, offset: int, message: str, chunk: int) -> None:
    err = error_of(data, chunk=chunk)
    assert message in err.message
    assert err.offset == offset
    assert str(err) == f"byte {offset}: {err.message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "stream truncated inside the stream header"),
        (HEADER[:5], "stream truncated inside the stream header"),
        (HEADER + CONFIG[:3], "stream truncated inside the configuration"),
        (HEADER + CONFIG, "stream truncated inside the configuration"),
        (PROLOGUE[:40], "stream truncated inside section 2 (ram)"),
        (PROLOGUE[:60], "stream truncated inside section 2 (ram)"),
        (PROLOGUE[:65], "stream truncated inside section 2 (ram)"),
        (PROLOGUE, "stream truncated inside the stream (no EOF)"),
        (PROLOGUE + PART[:3], "stream truncated inside the SECTION_PART element"),
        (
            PROLOGUE + PART + be64(0x08) + b"\x06pc.ram" + b"\0" * 100,
            "stream truncated inside section 2 (ram)",
        ),
        (PROLOGUE + b"\x08\x00\x02\x00", "stream truncated inside the COMMAND"),
        (PROLOGUE + b"\x00\x06\x00\x00", "stream truncated inside the VMDESCRIPTION"),
        (PROLOGUE + b"\x04" + be32(5) + b"\x05timer" + be32(0) + be32(1) + b"x", "device state"),
    ],
)
def test_truncated(data: bytes, message: str) -> None:
    err = error_of(data)
    assert message in str(err)
    assert err.offset == len(data)


def test_truncated_inside_packaged_payload() -> None:
    data = PROLOGUE + b"\x08\x00\x07\x00\x04" + be32(100) + b"x" * 50
    err = error_of(data)
    assert err.offset == len(data)
    assert "inside the COMMAND element starting at byte 68" in err.message
