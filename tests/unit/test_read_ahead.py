"""ReadAhead: stdin read while qsnap starts, handed over in order, bounded, on real pipes."""

from __future__ import annotations

import array
import fcntl
import os
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qsnap.save_input
from qsnap.read_ahead import ReadAhead
from qsnap.save_input import SMALL_READ, StalledStream, StdinReader


@contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with suppress(OSError):
                os.close(fd)


def writer(fd: int, data: bytes, close: bool) -> threading.Thread:
    def run() -> None:
        _write_all(fd, data)
        if close:
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def wait_for(ahead: ReadAhead, size: int) -> None:
    deadline = time.monotonic() + 10
    while ahead.buffered()[0] < size and time.monotonic() < deadline:
        time.sleep(0.005)


def child_done(ahead: ReadAhead) -> None:
    """Wait until the reading child has ended on its own (left for take() to reap)."""
    os.waitid(os.P_PID, ahead._pid, os.WEXITED | os.WNOWAIT)


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=1, max_size=3 << 20), st.integers(1 << 16, 4 << 20))
def test_hands_over_a_prefix_then_the_reader_goes_on(data: bytes, limit: int) -> None:
    with pipe() as (r, w):
        ahead = ReadAhead.start(r, limit=limit)
        t = writer(w, data, close=True)
        wait_for(ahead, min(limit, len(data)))
        read = StdinReader(5.0, ahead)
        got = b""
        while chunk := read(1 << 20):
            got += chunk
        t.join(10)
        assert got == data
        assert ahead.buffered()[0] <= limit


def test_stops_at_the_limit_and_reports_no_end() -> None:
    with pipe() as (r, w):
        ahead = ReadAhead.start(r, limit=100_000)
        writer(w, bytes(range(256)) * 1024, close=False)  # 256 KiB, pipe left open
        wait_for(ahead, 100_000)
        time.sleep(0.05)
        backlog = ahead.take()
        assert b"".join(backlog) == (bytes(range(256)) * 1024)[:100_000]
        assert not backlog.ended


def test_end_of_input_during_start_up() -> None:
    with pipe() as (r, w):
        ahead = ReadAhead.start(r)
        writer(w, b"QEVM", close=True)
        child_done(ahead)
        assert ahead.buffered() == (4, True)
        read = StdinReader(5.0, ahead)
        assert read(10) == b"QEVM"
        assert read(10) == b""


def test_a_stalled_source_still_times_out_after_the_hand_over() -> None:
    with pipe() as (r, w):
        ahead = ReadAhead.start(r)
        writer(w, b"x" * 1000, close=False)
        wait_for(ahead, 1000)
        read = StdinReader(0.2, ahead)
        assert read(1 << 20) == b"x" * 1000
        with pytest.raises(StalledStream, match=r"^byte 1000: no stream data for 0.2 s"):
            read(1 << 20)


def test_a_read_error_is_raised_at_the_hand_over() -> None:
    ahead = ReadAhead.start(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
    child_done(ahead)
    with pytest.raises(IsADirectoryError):
        list(ahead.take())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 300_000), min_size=1, max_size=8), st.sampled_from([0, 3 << 20]))
def test_readv_hands_over_the_backlog_then_stdin(sizes: list[int], limit: int) -> None:
    """What the save's scatter reads see: the child's store pipes, then stdin, in order,
    into vectors of any sizes (the child stops at its bound: the writer then waits)."""
    data = bytes(range(251)) * (5 * 4177)  # about 5 MiB, no period of a power of two
    with pipe() as (r, w):
        ahead = ReadAhead.start(r, limit=limit)
        t = writer(w, data, close=True)
        wait_for(ahead, min(limit, 1 << 20))
        read = StdinReader(5.0, ahead)
        got = bytearray()
        while True:
            buffers = [memoryview(bytearray(n)) for n in sizes]
            n = read.readv(buffers)
            if not n:
                break
            got += b"".join(buffers)[:n]
        t.join(10)
    assert bytes(got) == data


def trickle(fd: int, pieces: list[bytes], pause: float) -> threading.Thread:
    """A writer like QEMU's migration thread: small writes, one after another."""

    def run() -> None:
        for piece in pieces:
            _write_all(fd, piece)
            time.sleep(pause)
        os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_small_pieces_are_gathered_into_large_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU writes tens of KiB at a time; each read hands out at least SMALL_READ (but
    the last), gathered as the pieces arrive, so parsing runs on large batches. The
    pause that ends gathering is widened here: a loaded CI machine can hold the writer
    thread back for longer than the real 2 ms, which would rightly end a batch early."""
    monkeypatch.setattr(qsnap.save_input, "GATHER_WAIT_MS", 500)
    pieces = [bytes([i % 251]) * (16 << 10) for i in range(96)]  # 1.5 MiB in 16 KiB
    with pipe() as (r, w):
        trickle(w, pieces, 0.0002)
        read = StdinReader(5.0, ReadAhead.start(r, limit=0))
        chunks = list(iter(lambda: read(1 << 20), b""))
    assert b"".join(chunks) == b"".join(pieces)
    assert all(len(c) >= SMALL_READ for c in chunks[:-1]), [len(c) for c in chunks]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2 * SMALL_READ), st.sampled_from([0, 1 << 20]))
def test_reads_of_any_size_hand_over_the_whole_stream(n: int, limit: int) -> None:
    """Reads asking for less than SMALL_READ are topped up to what they asked for, never
    to an empty read that would look like the end of the stream."""
    pieces = [bytes([i % 251]) * (16 << 10) for i in range(48)]  # 768 KiB in 16 KiB
    with pipe() as (r, w):
        trickle(w, pieces, 0.0002)
        read = StdinReader(5.0, ReadAhead.start(r, limit=limit))
        chunks = list(iter(lambda: read(n), b""))
    assert b"".join(chunks) == b"".join(pieces)


def test_a_pause_in_the_stream_hands_over_what_was_read() -> None:
    """Gathering never waits for more than a pause of GATHER_WAIT_MS: a small piece
    followed by silence is handed out long before the silence ends."""
    with pipe() as (r, w):
        trickle(w, [b"head" * 100, b"tail"], 1.0)
        read = StdinReader(5.0, ReadAhead.start(r, limit=0))
        start = time.monotonic()
        first = read(1 << 20)
        waited = time.monotonic() - start
        assert first == b"head" * 100
        assert waited < 0.5
        assert read(1 << 20) == b"tail"
        assert read(1 << 20) == b""


def test_reads_stdin_itself() -> None:
    """qsnap's stdin is descriptor 0: the child keeps it while closing every other one."""
    code = (
        "import os, time\n"
        "from qsnap.read_ahead import ReadAhead\n"
        "ahead = ReadAhead.start(0)\n"
        "deadline = time.monotonic() + 10\n"
        "while not ahead.buffered()[1] and time.monotonic() < deadline:\n"
        "    time.sleep(0.005)\n"
        "backlog = ahead.take()\n"
        "data = b''.join(backlog)\n"
        "print(len(data), data == bytes(range(256)) * 8192, backlog.ended)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=bytes(range(256)) * 8192,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.split() == [b"2097152", b"True", b"True"]


def test_the_child_goes_on_reading_while_its_backlog_is_handed_out() -> None:
    """After the hand-over the child keeps taking the stream off the pipe (up to its
    limit) while qsnap parses: the writer finishes 6 MiB through a 1 MiB pipe although
    qsnap has taken only the first chunk, and everything comes out once, in order."""
    data = bytes(range(251)) * (6 * 4177)  # about 6 MiB, no period of a power of two
    with pipe() as (r, w):
        ahead = ReadAhead.start(r, limit=16 << 20)
        more = writer(w, data[: 1 << 20], close=False)
        wait_for(ahead, 1 << 20)
        more.join(10)
        read = StdinReader(5.0, ahead)
        got = read(1 << 20)  # the hand-over
        rest = writer(w, data[1 << 20 :], close=True)
        rest.join(10)
        assert not rest.is_alive(), "the writer waits for the pipe: nobody reads it"
        while chunk := read(1 << 20):
            got += chunk
        assert got == data


def test_the_child_s_cpu_time_is_known_once_it_is_stopped() -> None:
    """The save reports it as its own: otherwise it is counted as the storage daemon's
    (both are children; RUSAGE_CHILDREN does not tell them apart)."""
    size = 48 << 20
    with pipe() as (r, w):
        ahead = ReadAhead.start(r, limit=size)
        t = writer(w, b"\xa5" * size, close=True)
        wait_for(ahead, size)
        assert ahead.cpu_seconds == 0.0  # not waited for yet
        ahead.stop()
        t.join(10)
        assert ahead.buffered()[0] == size
        assert ahead.cpu_seconds > 0.0  # even splice and poll cost some


def test_a_file_is_read_ahead_across_store_pipes(tmp_path: Path) -> None:
    """Not a pipe: read and written into the store pipes (no more than fits in each);
    the hand-over then reads on from the file where the child stopped."""
    data = os.urandom(3 << 20)
    path = tmp_path / "stream"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        ahead = ReadAhead.start(fd, limit=(2 << 20) + 12345)
        child_done(ahead)
        assert ahead.buffered() == ((2 << 20) + 12345, False)
        read = StdinReader(5.0, ahead)
        got = b""
        while chunk := read(1 << 20):
            got += chunk
        assert got == data
    finally:
        os.close(fd)


def _pending(fd: int) -> int:
    size = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, size)
    return size[0]


def test_stdin_is_moved_out_before_it_is_copied() -> None:
    """Copying out of a pipe holds its mutex, which QEMU's writes spin on: a read first
    moves all that stdin holds into qsnap's own pipe (splice), then copies from there."""
    data = bytes(range(256)) * 192  # 48 KiB: fits stdin's pipe before anything reads it
    with pipe() as (r, w):
        _write_all(w, data)
        read = StdinReader(5.0, fd=r)
        first = bytearray(100)
        assert read.readv([memoryview(first)]) == 100
        assert _pending(r) == 0  # stdin is empty: the rest waits in the relay
        _write_all(w, b"more")
        os.close(w)
        rest = b"".join(iter(lambda: read(7000), b""))
    assert bytes(first) + rest == data + b"more"
    assert read.ended


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 40_000), min_size=1, max_size=12),
    st.lists(st.tuples(st.booleans(), st.integers(1, 70_000)), min_size=1, max_size=30),
)
def test_reads_and_readvs_through_the_relay_keep_the_stream(
    pieces: list[int], reads: list[tuple[bool, int]]
) -> None:
    """However the writes and the reads are cut, read() and readv() mixed hand out the
    stream in order, once, and its end."""
    stream = bytes(i % 253 for i in range(sum(pieces)))
    chunks = [stream[sum(pieces[:i]) : sum(pieces[: i + 1])] for i in range(len(pieces))]
    got = bytearray()
    with pipe() as (r, w):
        trickle(w, chunks, 0.0001)
        read = StdinReader(5.0, fd=r)
        for turn in range(len(stream) + 2):  # each read takes a byte at least
            as_readv, size = reads[turn % len(reads)]
            if as_readv:
                buffers = [memoryview(bytearray(size // 2 + 1)), memoryview(bytearray(size))]
                n = read.readv(buffers)
                got += b"".join(bytes(b) for b in buffers)[:n]
            else:
                n = len(part := read(size))
                got += part
            if not n:
                break
    assert bytes(got) == stream
    assert read.ended
