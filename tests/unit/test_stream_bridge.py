"""StreamReader's bridge: an element cut by a chunk boundary is completed without
copying the next chunk, and nothing else changes.

The bridge only applies to chunks four times its size (16 KiB: real reads are 1 MiB);
the generated streams are small, so these tests shrink it to a few bytes, which puts a
bridge at almost every cut, and compare with the same input fed whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st
from stream_strategies import chunkings, valid_streams
from test_stream_batches import expand, page_size_of, read, run_streams

from qsnap.stream import RamEncoder, StreamReader, encode, encode_footer
from qsnap.stream import reader as reader_module
from qsnap.stream import records as r
from qsnap.stream.reader import RamPageRun

PAGE = 4096
bridges = st.integers(1, 64)


@contextmanager
def bridge_of(size: int) -> Iterator[None]:
    saved = reader_module._BRIDGE
    reader_module._BRIDGE = size
    try:
        yield
    finally:
        reader_module._BRIDGE = saved


@given(st.one_of(run_streams(), valid_streams()), bridges, st.booleans(), st.data())
def test_bridged_input_reads_as_whole_input(
    stream: object, bridge: int, batched: bool, data: st.DataObject
) -> None:
    raw: bytes = stream.data  # type: ignore[attr-defined]
    kw = {"options": stream.options} if hasattr(stream, "options") else {}
    cuts = data.draw(chunkings(len(raw)))
    whole, whole_error = read(raw, [], batched=False, **kw)
    with bridge_of(bridge):
        items, error = read(raw, cuts, batched=batched, **kw)
    assert (error, whole_error) == ("", "")
    page_size = page_size_of(whole)
    assert _joined(expand(items, page_size)) == _joined(expand(whole, page_size))


def _joined(items: Sequence[object]) -> list[object]:
    """Consecutive device-state chunks as one: passed through as fed, they follow the
    input's cuts, which the whole input does not have."""
    out: list[object] = []
    for item in items:
        chunk = item[0] if isinstance(item, tuple) and len(item) == 1 else None
        if (
            isinstance(chunk, r.DeviceStateChunk)
            and out
            and isinstance(out[-1], r.DeviceStateChunk)
        ):
            out[-1] = r.DeviceStateChunk(out[-1].data + chunk.data)
        else:
            out.append(chunk if isinstance(chunk, r.DeviceStateChunk) else item)
    return out


@settings(max_examples=300)
@given(st.one_of(run_streams(), valid_streams()), bridges, st.data())
def test_bridged_corrupt_input_fails_at_the_same_byte(
    stream: object, bridge: int, data: st.DataObject
) -> None:
    raw: bytes = stream.data  # type: ignore[attr-defined]
    kw = {"options": stream.options} if hasattr(stream, "options") else {}
    at = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        bad = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    else:
        bad = raw[:at]
    cuts = data.draw(chunkings(len(bad)))
    plain, plain_error = read(bad, cuts, batched=False, **kw)
    with bridge_of(bridge):
        bridged, error = read(bad, cuts, batched=True, **kw)
    assert error == plain_error
    page_size = page_size_of(plain)
    assert expand(bridged, page_size) == expand(plain, page_size)


def test_pages_after_a_cut_are_views_of_the_chunk_fed() -> None:
    """The point of the bridge: a 1 MiB read cut inside a page is not copied."""
    ram = RamEncoder(PAGE)
    pages = [bytes([i % 251 + 1]) * PAGE for i in range(512)]
    stream = b"".join(
        [
            encode(r.StreamHeader()),
            encode(r.Configuration("pc-i440fx-10.0")),
            encode(r.SectionStart(3, "ram", 0, 4)),
            encode(r.RamMemSize((r.RamBlockInfo("pc.ram", len(pages) * PAGE),))),
            encode(r.RamEos()),
            encode_footer(3),
            encode(r.SectionPart(3)),
            *(ram.page("pc.ram", i * PAGE, p) for i, p in enumerate(pages)),
        ]
    )
    cut = len(stream) // 2 + 100  # inside a page
    first, second = stream[:cut], stream[cut:]
    reader = StreamReader()
    reader.feed(first)
    got = [b for b in reader.batches() if isinstance(b, RamPageRun)]
    reader.feed(second)
    later = [b for b in reader.batches() if isinstance(b, RamPageRun)]
    views = [v for run in later for v in run.pages]
    assert b"".join([*(bytes(v) for run in got for v in run.pages), *map(bytes, views)]) == (
        b"".join(pages)
    )
    assert any(v.obj is second for v in views)
    assert reader.buffered == 0
