"""Generated streams parse back to their records and re-encode to the same bytes."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from stream_strategies import GeneratedStream, chunkings, valid_streams

from qsnap.stream import StreamReader, encode
from qsnap.stream import records as r


def parse(stream: GeneratedStream, cuts: list[int]) -> tuple[list[r.Record], StreamReader]:
    reader = StreamReader(stream.options)
    out: list[r.Record] = []
    bounds = [0, *cuts, len(stream.data)]
    for lo, hi in pairwise(bounds):
        reader.feed(stream.data[lo:hi])
        out.extend(reader.records())
    reader.close()
    return out, reader


@given(st.data())
def test_roundtrip_at_random_chunkings(data: st.DataObject) -> None:
    stream = data.draw(valid_streams())
    out, reader = parse(stream, data.draw(chunkings(len(stream.data))))
    chunks = [rec for rec in out if isinstance(rec, r.DeviceStateChunk)]
    structured = [rec for rec in out if not isinstance(rec, r.DeviceStateChunk)]
    assert structured == list(stream.records)
    assert b"".join(c.data for c in chunks) == stream.device
    assert all(type(c.data) is bytes for c in chunks)
    assert b"".join(encode(rec) for rec in out) == stream.data
    assert reader.offset == len(stream.data)


@settings(max_examples=25)
@given(valid_streams(max_pages=8))
def test_one_byte_chunks(stream: GeneratedStream) -> None:
    out, _ = parse(stream, list(range(1, len(stream.data))))
    assert b"".join(encode(rec) for rec in out) == stream.data


@given(valid_streams())
def test_ram_page_data_is_independent_bytes(stream: GeneratedStream) -> None:
    out, _ = parse(stream, [])
    pages = [rec for rec in out if isinstance(rec, r.RamPage)]
    expected = [rec for rec in stream.records if isinstance(rec, r.RamPage)]
    assert all(type(p.data) is bytes for p in pages)
    assert [p.data for p in pages] == [p.data for p in expected]


@given(valid_streams())
def test_device_state_end_found(stream: GeneratedStream) -> None:
    _, reader = parse(stream, [])
    end = reader.device_state_end
    if stream.eof_offset is None:
        assert end is None
        return
    assert end is not None
    assert end.eof_offset == stream.eof_offset
    if end.vmdesc_length is None:
        assert stream.eof_offset == len(stream.data) - 1
    else:
        assert end.eof_offset + 6 + end.vmdesc_length == len(stream.data)
        assert stream.data[end.eof_offset + 1] == 0x06
