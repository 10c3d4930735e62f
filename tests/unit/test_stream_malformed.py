"""Truncated and corrupted streams: StreamError or a valid parse, nothing else.

Also checks that the reader's buffer stays bounded by one element plus the chunk
being fed, whatever the input.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_strategies import GeneratedStream, valid_streams

from qsnap.stream import StreamError, StreamReader, encode
from qsnap.stream import records as r

# A RAM record is at most a page plus be64 + str8 (256 bytes); the largest
# generated page is 16 KiB, commands and section headers are smaller.
MAX_ELEMENT = 16384 + 8 + 256


def run(data: bytes, stream: GeneratedStream, chunk: int) -> list[r.Record]:
    reader = StreamReader(stream.options)
    out: list[r.Record] = []
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
        out.extend(reader.records())
        assert reader.buffered <= MAX_ELEMENT + chunk
    reader.close()
    return out


@given(valid_streams(), st.data())
def test_truncation_raises_or_parses(stream: GeneratedStream, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(stream.data) - 1))
    chunk = data.draw(st.sampled_from([1, 7, 4096, 1 << 20]))
    if cut < stream.complete_at:
        with pytest.raises(StreamError, match=r"^byte \d+: ") as err:
            run(stream.data[:cut], stream, chunk)
        assert err.value.offset <= cut
    else:
        try:
            out = run(stream.data[:cut], stream, chunk)
        except StreamError as err:
            assert err.offset <= cut
        else:
            assert b"".join(encode(rec) for rec in out) == stream.data[:cut]


def test_every_truncation_of_a_small_stream() -> None:
    recs: list[r.Record] = [
        r.StreamHeader(),
        r.Configuration("pc-q35-10.0", (r.TargetPageBits(10), r.Capabilities(("colo",)))),
        r.Ping(7),
        r.SectionStart(3, "ram", 0, 4),
        r.RamMemSize((r.RamBlockInfo("pc.ram", 4096), r.RamBlockInfo("vga", 1024))),
        r.RamEos(),
        r.SectionFooter(3),
        r.SectionPart(3),
        r.RamPage("pc.ram", 1024, bytes(range(256)) * 4, False),
        r.RamZero("pc.ram", 2048, True),
        r.RamZero("vga", 0, False),
        r.RamEos(),
        r.SectionFooter(3),
        r.Eof(),
    ]
    data = b"".join(encode(rec) for rec in recs)
    for cut in range(len(data)):
        reader = StreamReader()
        reader.feed(data[:cut])
        with pytest.raises(StreamError) as err:
            list(reader.records())
            reader.close()
        assert "truncated" in str(err.value), (cut, str(err.value))
        assert err.value.offset == cut


corruptions = st.sampled_from(["flip", "insert", "delete", "garbage"])


@settings(max_examples=300)
@given(valid_streams(max_pages=12), st.data())
def test_corruption_raises_only_stream_error(stream: GeneratedStream, data: st.DataObject) -> None:
    blob = bytearray(stream.data)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(corruptions)
        at = data.draw(st.integers(0, max(0, len(blob) - 1)))
        if kind == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del blob[at : at + data.draw(st.integers(1, 16))]
        else:
            size = data.draw(st.integers(1, 64))
            blob[at : at + size] = data.draw(st.binary(min_size=size, max_size=size))
    chunk = data.draw(st.sampled_from([1, 13, 4096, 1 << 20]))
    try:
        out = run(bytes(blob), stream, chunk)
    except StreamError as err:
        assert 0 <= err.offset <= len(blob)
        assert str(err).startswith(f"byte {err.offset}: ")
    else:
        assert b"".join(encode(rec) for rec in out) == bytes(blob)


@settings(max_examples=200)
@given(st.binary(max_size=512), st.booleans())
def test_garbage_raises_only_stream_error(blob: bytes, with_header: bool) -> None:
    data = (b"QEVM\0\0\0\3" if with_header else b"") + blob
    reader = StreamReader()
    try:
        reader.feed(data)
        list(reader.records())
        reader.close()
    except StreamError as err:
        assert 0 <= err.offset <= len(data)


def test_failed_reader_stays_failed() -> None:
    reader = StreamReader()
    reader.feed(b"XXXX\0\0\0\3")
    with pytest.raises(StreamError) as first:
        list(reader.records())
    with pytest.raises(StreamError) as again:
        list(reader.records())
    assert again.value is first.value
    with pytest.raises(StreamError):
        reader.close()


def test_raw_mode_passes_chunks_through_without_accumulating() -> None:
    prologue = b"".join(
        encode(rec)
        for rec in (
            r.StreamHeader(),
            r.Configuration("pc"),
            r.SectionStart(0, "ram", 0, 4),
            r.RamMemSize((r.RamBlockInfo("pc.ram", 4096),)),
            r.RamEos(),
            r.SectionFooter(0),
        )
    )
    reader = StreamReader()
    reader.feed(prologue + encode(r.SectionFull(1, "timer", 0, 2)))
    list(reader.records())
    assert reader.raw
    big = b"\x55" * (1 << 20)
    for _ in range(64):
        reader.feed(big)
        chunks = list(reader.records())
        assert [type(c) for c in chunks] == [r.DeviceStateChunk]
        assert reader.buffered == 0
    reader.feed(b"\0")
    list(reader.records())
    reader.close()
    assert reader.device_state_end is not None
    assert reader.device_state_end.eof_offset == reader.offset - 1
