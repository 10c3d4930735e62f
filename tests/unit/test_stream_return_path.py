"""Return-path messages: layouts from migration/migration.c, round trips, errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stream_strategies import idstrs

from qsnap.stream import StreamError
from qsnap.stream import return_path as rp

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
messages = st.one_of(
    st.builds(rp.Shut, u32),
    st.builds(rp.Pong, u32),
    st.builds(rp.ReqPagesId, u64, u32, idstrs),
    st.builds(rp.ReqPages, u64, u32),
    st.builds(rp.RecvBitmap, idstrs, st.integers(0, 4).map(lambda n: bytes(range(8 * n)))),
    st.builds(rp.ResumeAck, u32),
    st.just(rp.SwitchoverAck()),
)


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (rp.Shut(0), b"\x00\x01\x00\x04\x00\x00\x00\x00"),
        (rp.Shut(1), b"\x00\x01\x00\x04\x00\x00\x00\x01"),
        (rp.Pong(7), b"\x00\x02\x00\x04\x00\x00\x00\x07"),
        (
            rp.ReqPagesId(0x1000, 4096, "pc.ram"),
            b"\x00\x03\x00\x13" + struct.pack(">QI", 0x1000, 4096) + b"\x06pc.ram",
        ),
        (rp.ReqPages(0x2000, 4096), b"\x00\x04\x00\x0c" + struct.pack(">QI", 0x2000, 4096)),
        (
            rp.RecvBitmap("a", b"\xff" * 8),
            b"\x00\x05\x00\x02\x01a" + struct.pack(">Q", 8) + b"\xff" * 8
            + bytes.fromhex("0123456789abcdef"),
        ),
        (rp.ResumeAck(1), b"\x00\x06\x00\x04\x00\x00\x00\x01"),
        (rp.SwitchoverAck(), b"\x00\x07\x00\x00"),
    ],
)  # fmt: skip
def test_layout(msg: rp.ReturnPathMessage, wire: bytes) -> None:
    assert rp.encode_message(msg) == wire
    reader = rp.ReturnPathReader()
    reader.feed(wire)
    assert list(reader.messages()) == [msg]
    reader.close()


@given(st.lists(messages, max_size=10), st.lists(st.integers(1, 40), min_size=1))
def test_roundtrip_any_chunking(msgs: list[rp.ReturnPathMessage], sizes: list[int]) -> None:
    data = b"".join(rp.encode_message(m) for m in msgs)
    reader = rp.ReturnPathReader()
    out: list[rp.ReturnPathMessage] = []
    pos = i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        reader.feed(data[pos : pos + size])
        out.extend(reader.messages())
        pos += size
        i += 1
    reader.close()
    assert out == msgs
    assert reader.offset == len(data)


@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_truncation_is_reported(msgs: list[rp.ReturnPathMessage], data: st.DataObject) -> None:
    wire = b"".join(rp.encode_message(m) for m in msgs)
    cut = data.draw(st.integers(1, len(wire) - 1))
    reader = rp.ReturnPathReader()
    reader.feed(wire[:cut])
    list(reader.messages())
    ends = {len(b"".join(rp.encode_message(m) for m in msgs[:k])) for k in range(len(msgs) + 1)}
    if cut in ends:
        reader.close()
    else:
        with pytest.raises(StreamError, match=f"^byte {cut}: return path truncated"):
            reader.close()


@given(st.binary(max_size=300))
def test_garbage_raises_only_stream_error(blob: bytes) -> None:
    reader = rp.ReturnPathReader()
    reader.feed(blob)
    try:
        list(reader.messages())
        reader.close()
    except StreamError as err:
        assert 0 <= err.offset <= len(blob)


@pytest.mark.parametrize(
    ("wire", "offset", "message"),
    [
        (b"\x00\x00\x00\x00", 0, "unknown return-path message 0x0000"),
        (b"\x00\x08\x00\x00", 0, "unknown return-path message 0x0008"),
        (b"\x00\x01\x00\x03abc", 0, "SHUT with length 3, expected 4"),
        (b"\x00\x04\x00\x0d" + b"\0" * 13, 0, "REQ_PAGES with length 13, expected 12"),
        (b"\x00\x03\x02\x01" + b"\0" * 513, 0, "REQ_PAGES_ID with length 513"),
        (
            b"\x00\x03\x00\x0e" + b"\0" * 12 + b"\x05a",
            0,
            "REQ_PAGES_ID payload of 14 bytes is too short",
        ),
        (
            b"\x00\x03\x00\x0f" + b"\0" * 12 + b"\x01ab",
            0,
            "REQ_PAGES_ID with length 15, expected 14",
        ),
        (b"\x00\x05\x00\x02\x01a" + struct.pack(">Q", 3), 6, "RECV_BITMAP bitmap of 3 bytes"),
        (
            b"\x00\x05\x00\x02\x01a" + struct.pack(">Q", 0) + struct.pack(">Q", 1),
            14,
            "without its ending marker",
        ),
        (rp.encode_message(rp.Pong(1)) + b"\x00\x09\x00\x00", 8, "unknown return-path"),
    ],
)
def test_errors(wire: bytes, offset: int, message: str) -> None:
    reader = rp.ReturnPathReader()
    reader.feed(wire)
    with pytest.raises(StreamError) as err:
        list(reader.messages())
    assert message in err.value.message
    assert err.value.offset == offset
