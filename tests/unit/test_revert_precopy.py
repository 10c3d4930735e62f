"""Precopy revert streams generated from an in-memory image, parsed back with the codec."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from revert_memory import MemorySource

from qsnap.revert.precopy import revert_precopy
from qsnap.revert.session import RevertOptions
from qsnap.revert.sink import StreamSink
from qsnap.revert.source import SourceBlock
from qsnap.stream import StreamReader
from qsnap.stream import records as r

PAGE = 4096


def run_precopy(
    source: MemorySource,
    options: RevertOptions,
    splice: bool = False,
    read_size: int = 1 << 20,
    read_pause: float = 0.0,
) -> bytes:
    """Revert into a pipe (as under QEMU, without return path) and return the bytes.

    ``splice``: pages go into the pipe by reference; the source scribbles over each span
    once it is released, so a span released before QEMU (here: a reader thread taking
    ``read_size`` bytes at a time, ``read_pause`` seconds apart) has read it shows up
    in the stream.
    """
    rfd, wfd = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(rfd, read_size):
            chunks.append(data)
            time.sleep(read_pause)

    reader = threading.Thread(target=drain)
    reader.start()
    sink = StreamSink(wfd, stall_timeout=10)
    if splice:
        assert sink.splice_pages()
    try:
        revert_precopy(source, sink, None, options)
    finally:
        sink.close()
        os.close(wfd)
        reader.join(10)
        os.close(rfd)
    return b"".join(chunks)


def parse(stream: bytes) -> list[r.Record]:
    reader = StreamReader()
    reader.feed(stream)
    out = list(reader.records())
    reader.close()
    return out


@st.composite
def images(draw: st.DrawFn) -> MemorySource:
    """1-3 blocks of 1-40 pages: zero pages (some in declared zero extents), data pages."""
    blocks = []
    zero: dict[str, list[tuple[int, int]]] = {}
    for i in range(draw(st.integers(1, 3))):
        kinds = draw(st.lists(st.sampled_from("dzx"), min_size=1, max_size=40))
        name = ("pc.ram", "vga.vram", "pc.bios")[i]
        data = bytearray()
        for index, kind in enumerate(kinds):
            if kind == "d":
                data += bytes([index % 251 + 1, i]) * (PAGE // 2)
            else:
                data += bytes(PAGE)
            if kind == "x":
                zero.setdefault(name, []).append((index * PAGE, PAGE))
        blocks.append((name, bytes(data)))
    return MemorySource(blocks, zero)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=images(),
    read_kib=st.sampled_from([4, 12, 64, 1024]),
    part_kib=st.sampled_from([4, 40, 1024]),
    splice=st.booleans(),
)
def test_every_page_once_with_saved_pieces(
    source: MemorySource, read_kib: int, part_kib: int, splice: bool
) -> None:
    stream = run_precopy(
        source, RevertOptions(read_bytes=read_kib << 10, part_bytes=part_kib << 10), splice
    )
    assert stream.startswith(source.prologue + source.ram_start)
    assert stream.endswith(source.device)
    records = parse(stream)
    seen: dict[tuple[str, int], bytes] = {}
    part_sizes: list[int] = []
    for rec in records:
        if isinstance(rec, (r.RamPage, r.RamZero)):
            key = (rec.block, rec.offset)
            assert key not in seen, f"page {key} sent twice"
            seen[key] = rec.data if isinstance(rec, r.RamPage) else bytes(PAGE)
            part_sizes[-1] += 1
        elif isinstance(rec, r.SectionPart):
            assert rec.section_id == source.ram_section_id
            part_sizes.append(0)
        assert not isinstance(rec, r.Command), "no command without a return path"
    expected = {
        (name, off): data[off : off + PAGE]
        for name, data in source.data.items()
        for off in range(0, len(data), PAGE)
    }
    assert seen == expected
    assert source.read_zero_pages() == []
    assert all(0 < n <= part_kib * 1024 // 9 + 1 for n in part_sizes)


def test_zero_pages_are_zero_records() -> None:
    data = bytes(PAGE) + b"\x07" * PAGE + bytes(PAGE)
    source = MemorySource([("pc.ram", data)], {"pc.ram": [(2 * PAGE, PAGE)]})
    kinds = [
        (type(rec).__name__, rec.offset)
        for rec in parse(run_precopy(source, RevertOptions()))
        if isinstance(rec, (r.RamPage, r.RamZero))
    ]
    assert kinds == [("RamZero", 0), ("RamPage", PAGE), ("RamZero", 2 * PAGE)]
    assert source.reads == [("pc.ram", 0, 2 * PAGE)]


def test_host_pages_larger_than_target_pages_are_sent_whole() -> None:
    """A block with 16 KiB host pages: runs are whole host pages, records target pages."""
    zero_pages = {0, 4, 5, 6, 7, 8, 14}
    data = b"".join(bytes(PAGE) if i in zero_pages else bytes([i]) * PAGE for i in range(16))
    source = MemorySource([("huge", data)], {"huge": [(4 * PAGE, 4 * PAGE + 100)]})
    source.blocks = (SourceBlock("huge", len(data), 4 * PAGE),)
    records = parse(run_precopy(source, RevertOptions(read_bytes=6 * PAGE)))
    offsets = [rec.offset for rec in records if isinstance(rec, (r.RamPage, r.RamZero))]
    assert offsets == list(range(0, len(data), PAGE))
    # the zero extent covers host page 1 only; reads come in whole host pages
    assert [(off, n) for _, off, n in source.reads] == [
        (0, 4 * PAGE),
        (8 * PAGE, 4 * PAGE),
        (12 * PAGE, 4 * PAGE),
    ]
    zeros = [rec.offset // PAGE for rec in records if isinstance(rec, r.RamZero)]
    assert zeros == sorted(zero_pages)


def striped_source(pages: int) -> MemorySource:
    """One block of distinct data pages, every 7th page zero (runs of 6 data pages)."""
    data = b"".join(
        bytes(PAGE) if i % 7 == 3 else i.to_bytes(4, "big") * (PAGE // 4) for i in range(pages)
    )
    return MemorySource([("pc.ram", data)], {})


def test_spliced_stream_equals_copied_stream() -> None:
    """Pages handed over by reference while a slow reader lags behind: the same bytes as
    written by copy, so no span was reused while the pipe still held its pages."""
    options = RevertOptions(read_bytes=8 << 10, part_bytes=256 << 10)
    copied = run_precopy(striped_source(512), options)
    spliced = run_precopy(striped_source(512), options, True, 4 << 10, 0.0002)
    assert len(spliced) == len(copied)
    assert spliced == copied


def test_splice_without_waiting_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with the wait for QEMU's reading removed, spans are
    reused (scribbled over, then read into) while their pages are still in the pipe."""
    options = RevertOptions(read_bytes=8 << 10, part_bytes=256 << 10)
    copied = run_precopy(striped_source(512), options)
    monkeypatch.setattr(StreamSink, "wait_consumed", lambda self, position: None)
    hasty = run_precopy(striped_source(512), options, True, 4 << 10, 0.0002)
    assert len(hasty) == len(copied)
    assert hasty != copied
