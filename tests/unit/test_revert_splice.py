"""Page records written into a pipe by reference (vmsplice), read back by another thread."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsnap.image.span import Span
from qsnap.revert.errors import RevertError
from qsnap.revert.sink import StreamSink
from qsnap.revert.splice import SpliceTable

PAGE = 4096


def read_all(rfd: int, into: list[bytes]) -> threading.Thread:
    def drain() -> None:
        while data := os.read(rfd, 3000):  # not a divisor of anything written
            into.append(data)

    thread = threading.Thread(target=drain)
    thread.start()
    return thread


def slot(pages: int, start: int) -> Span:
    """``pages`` distinct pages at ``start`` of an anonymous shared mapping."""
    memory = mmap.mmap(-1, start + pages * PAGE)
    for i in range(pages):
        memory[start + i * PAGE : start + (i + 1) * PAGE] = bytes([i + 1]) * PAGE
    return Span(memory, start, pages * PAGE)


@settings(max_examples=25, deadline=None)
@given(
    start=st.sampled_from([0, 8, 100, PAGE - 8, PAGE]),
    first=st.integers(0, 5),
    count=st.integers(0, 6),
    pipe_pages=st.sampled_from([1, 2, 16]),
)
def test_records_arrive_in_order(start: int, first: int, count: int, pipe_pages: int) -> None:
    """Word, page, word, page...; pages that straddle host pages (``start`` not aligned)
    can be cut short when the pipe is full, and the rest is copied after them."""
    span = slot(12, start)
    table = SpliceTable(span, PAGE)
    words = [0x1000 * (i + 1) | 0x28 for i in range(first, first + count)]
    for i, word in zip(range(first, first + count), words, strict=True):
        struct.pack_into(">Q", table.words, i * 8, word)
    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, pipe_pages * PAGE)
    chunks: list[bytes] = []
    reader = read_all(rfd, chunks)
    sink = StreamSink(wfd, stall_timeout=10)
    try:
        assert sink.splice_pages()
        sink.write([b"head", table.records(first, count), b"tail"])
        sink.wait_consumed(sink.bytes_written)
        assert sink.unread() == 0
    finally:
        sink.close()
        os.close(wfd)
        reader.join(10)
        os.close(rfd)
    expected = b"head"
    for i, word in zip(range(first, first + count), words, strict=True):
        expected += struct.pack(">Q", word) + bytes([i + 1]) * PAGE
    assert b"".join(chunks) == expected + b"tail"
    assert sink.bytes_written == len(expected) + 4


def test_only_pipes_take_spliced_pages(tmp_path: os.PathLike[str]) -> None:
    with open(os.path.join(tmp_path, "out"), "wb") as out:
        assert StreamSink(out.fileno()).splice_pages() is False


def test_closed_reader_is_an_error() -> None:
    span = slot(4, 0)
    table = SpliceTable(span, PAGE)
    rfd, wfd = os.pipe()
    os.close(rfd)
    sink = StreamSink(wfd, stall_timeout=10)
    try:
        assert sink.splice_pages()
        with pytest.raises(RevertError, match="QEMU closed the migration stream"):
            sink.write([table.records(0, 4)])
    finally:
        sink.close()
        os.close(wfd)


def test_wait_consumed_gives_up_when_nothing_is_read() -> None:
    rfd, wfd = os.pipe()
    sink = StreamSink(wfd, stall_timeout=0.2)
    try:
        sink.write([b"x" * 100])
        assert sink.unread() == 100
        with pytest.raises(RevertError, match="has read nothing"):
            sink.wait_consumed(50)
        os.read(rfd, 60)
        sink.wait_consumed(50)
        assert sink.unread() == 40
    finally:
        sink.close()
        os.close(wfd)
        os.close(rfd)


def test_only_shared_memory_is_spliced() -> None:
    with pytest.raises(TypeError):
        SpliceTable(Span.whole(bytearray(PAGE)), PAGE)
