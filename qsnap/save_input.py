"""The stdin of ``qsnap save``: what the start-up child took, then the pipe itself.

Kept apart from :mod:`qsnap.save` so that the command line can know its defaults, and
start the storage daemon, before the save's heavy imports.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import stat
import sys
import time

from qsnap.read_ahead import PIPE_SIZE, Backlog, ReadAhead, grow_pipe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _T = TypeVar("_T")

log = logging.getLogger(__name__)

READ_SIZE = 256 << 10
"""The most one stdin read takes.  Smaller reads cost qsnap more CPU (0.6 -> 0.85 s for
512 MiB of a stream that is always there), but QEMU migrated 4-9 % faster than with 1 MiB
reads (medians of three runs of 10-12 alternated rounds): the pipe is emptied in smaller,
more frequent bites, and a read holds the pipe's lock, which QEMU's writes wait for,
while it copies."""
DEFAULT_TIMEOUT = 300.0
SMALL_READ = 256 << 10
GATHER_WAIT_MS = 2  # a pause in the stream this long hands over what was read
GATHER_NAP = 0.0003  # QEMU writes 100-200 KiB meanwhile: far from filling the 1 MiB pipe
_M_TRIM_THRESHOLD = -1  # mallopt() parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


class StalledStream(TimeoutError):
    """No stream data arrived within the timeout."""


def _keep_buffers_mapped() -> None:
    """Keep freed 1 MiB read buffers in glibc's heap instead of returning them to the kernel.

    By default glibc trims the heap (or unmaps) as soon as a couple of MiB are free, so
    every stdin read faulted fresh pages in again: ~0.2 CPU s per GiB of stream.  With
    these thresholds the few buffers in flight are reused (bounded by the read-ahead).
    """
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # not a name this libc knows
        version = ""
    if not version.startswith("glibc"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError) as exc:
        log.debug("mallopt: %s", exc)


class _Relay:
    """A private pipe that stdin's buffers are moved into by ``splice`` before they are read.

    Reading a pipe copies out with the pipe's mutex held, and a writer that finds it held
    spins while the holder runs: QEMU spun for 0.1 s of its 0.75 s of CPU per 512 MiB
    while qsnap's ``readv`` copied into the shared slots (``mutex_spin_on_owner`` under
    ``anon_pipe_write``).  ``splice`` hands QEMU's buffers over without copying them; the
    copy then comes out of this pipe, which nobody else writes.  QEMU's CPU per save fell
    to what it spends beside ``cat > FILE``.
    """

    def __init__(self, source: int) -> None:
        self.source = source
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        grow_pipe(self._w)
        self.held = 0  # bytes moved in and not yet read

    def read(self, n: int) -> bytes:
        if not self._fill():
            return b""
        data = os.read(self._r, n)
        self.held -= len(data)
        return data

    def readv(self, buffers: list[memoryview]) -> int:
        if not self._fill():
            return 0
        n = os.readv(self._r, buffers)
        self.held -= n
        return n

    def _fill(self) -> bool:
        """Move in what stdin holds, once all moved before is read; False at its end.
        Only called once stdin has data or has ended (the relay is then empty: room)."""
        if not self.held:
            self.held = os.splice(self.source, self._w, PIPE_SIZE)
        return self.held > 0

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class StdinReader:
    """Reads of stdin, each waiting at most ``timeout`` s for data.

    The first reads hand out what ``ahead``'s child stored, while it goes on reading
    until they catch up with it (or it reaches its bound: QEMU then waits until they
    have).  After that, stdin is read here, not ahead in another thread or process
    throughout: a read-ahead thread took the stream in the pieces QEMU writes (tens of
    KiB) and paid a GIL hand-off per piece, which cost more CPU than it saved waiting.
    A small read is topped up with what follows until there is enough to be worth
    parsing, in short naps (0.3 ms): QEMU writes 14-32 KiB at a time, and waking for
    each piece cost qsnap a fifth more CPU.  The pipe stays far from full, so QEMU does
    not wait on it.  (A single 1 ms sleep after a small read, before any topping up,
    held QEMU up: under load the wake-up came after the pipe had filled.)  A stdin that
    is a pipe is read through a :class:`_Relay`.
    """

    def __init__(
        self, timeout: float, ahead: ReadAhead | None = None, fd: int | None = None
    ) -> None:
        _keep_buffers_mapped()
        if ahead is None:
            self.fd = sys.stdin.fileno() if fd is None else fd
            grow_pipe(self.fd)
        else:
            self.fd = ahead.fd  # grown when it started
        self.timeout = timeout
        self._ahead = ahead
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.received = 0
        self._early: Backlog | None = None  # what the start-up child read, and goes on reading
        self._from_stdin = False  # where the last read came from
        self._pipe = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
        self._relay: _Relay | None = None  # made once the backlog is read
        self.ended = False

    def _from_backlog(self, read: Callable[[Backlog], _T]) -> _T | None:
        """``read`` on what the start-up child stored while it lasts; None after that
        (stdin's turn, or the end of the stream if the child saw it)."""
        if self._ahead is not None:
            self._early = self._ahead.take()
            self._ahead = None
        early = self._early
        if early is None:
            return None
        got = read(early)
        if got:
            self._from_stdin = False
            return got
        self.ended = early.ended
        self._early = None
        return None

    def __call__(self, n: int) -> bytes:
        data = self._from_backlog(lambda early: early.read(n))
        if data is not None:
            self.received += len(data)
            return data
        if self.ended:
            return b""
        self._wait()
        data = self._read(n)
        if not data:
            self._end()
        elif len(data) < min(SMALL_READ, n):
            data = self._top_up(data, n)
        self.received += len(data)
        self._from_stdin = True
        return data

    def readv(self, buffers: list[memoryview]) -> int:
        """Read into ``buffers`` in order; 0 at the end."""
        n = self._from_backlog(lambda early: early.readv(buffers))
        if n is not None:
            self.received += n
            return n
        if self.ended:
            return 0
        self._wait()
        n = self._readv(buffers)
        if not n:
            self._end()
        self.received += n
        self._from_stdin = True
        return n

    def nap(self) -> None:
        """After a small read of stdin: one wake-up for several of QEMU's writes."""
        if self._from_stdin:
            time.sleep(GATHER_NAP)

    def _read(self, n: int) -> bytes:
        return self._relay.read(n) if self._relay is not None else os.read(self.fd, n)

    def _readv(self, buffers: list[memoryview]) -> int:
        return self._relay.readv(buffers) if self._relay is not None else os.readv(self.fd, buffers)

    def _ready(self, ms: float) -> bool:
        """Something to read within ``ms`` (or the end of the stream).  The first call
        comes once the backlog is read: stdin goes through the relay from then on."""
        if self._relay is None:
            if self._pipe and not self.ended:
                self._relay = _Relay(self.fd)
        elif self._relay.held:
            return True
        return bool(self._poller.poll(ms))

    def _end(self) -> None:
        self.ended = True
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    def _wait(self) -> None:
        if not self._ready(self.timeout * 1000):
            raise StalledStream(f"byte {self.received}: no stream data for {self.timeout:g} s")

    def _top_up(self, data: bytes, n: int) -> bytes:
        parts = [data]
        size = len(data)
        while size < min(SMALL_READ, n):
            time.sleep(GATHER_NAP)  # one wake-up for several of QEMU's writes
            if not self._ready(0) and not self._ready(GATHER_WAIT_MS):
                break
            more = self._read(n - size)
            if not more:
                self._end()
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)
