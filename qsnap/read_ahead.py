"""Taking the migration stream off stdin while ``qsnap save`` starts.

QEMU starts ``exec:qsnap save`` and writes the stream at once.  Until qsnap has imported
its modules and opened the image (0.1-0.2 s), QEMU would stall on a full pipe, with the
guest's memory write-protected all that time.  A forked child moves the stream into a
chain of pipes meanwhile, up to a bound.  From its first read on, the save parses what
the child stored while the child goes on reading, until the save has caught up with it
(or the bound is reached); after that the save reads stdin itself.  So QEMU is paced by
the child, not by the parsing, for the first tens of MiB.

A child, not a thread: a thread needs the GIL for every read, and the imports in the
main thread hold it for the whole switch interval (5 ms), in which QEMU fills the 1 MiB
pipe in under 2 ms and then waits; QEMU spent most of qsnap's start-up waiting.  The
child reads as soon as QEMU writes.  The data stays in the store pipes until it is
parsed: ``splice`` moves QEMU's own pipe buffers there, without a copy.  (Into a memfd,
as before, the child copied every byte into memory touched for the first time: 0.08-0.1
CPU s per 64 MiB, against about 0.01 for the pipes, on the CPU that QEMU and qsnap's
start-up share.)

Only the standard library is imported here: this runs before the rest of qsnap loads.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import stat
import struct
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # not imported at start-up (typing alone costs QEMU 7 ms)
    from collections.abc import Callable
    from typing import TypeVar

    _T = TypeVar("_T")


def _debug(message: str, *args: object) -> None:
    import logging  # not at start-up: it costs QEMU ~10 ms of a blocked pipe

    logging.getLogger(__name__).debug(message, *args)


PIPE_SIZE = 1 << 20
LIMIT = 64 << 20
READ_SIZE = 1 << 20
SPLICE_SIZE = 128 << 10
"""At most this much per ``splice``: it holds stdin's pipe lock meanwhile, and QEMU's
writes wait for that lock (with 1 MiB splices into a memfd, which copied, QEMU slept
0.65 ms of every 3.3 ms during start-up)."""
_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
STORE_SLACK = 3 / 2
"""Store pipes of 1 MiB for 1.5 times ``limit``: QEMU's pipe buffers come about two
thirds full (they are pages; a write's last one is shared with the next write only
while it is still in stdin's pipe), and the bound is on the stream's bytes."""
NAP = 0.0003
"""After a short splice.  ``splice`` moves whole pipe buffers, the last one often
partly filled (QEMU goes on appending to it): spliced as soon as they arrived, the
store pipes held 35 of their 64 MiB.  QEMU writes 100-200 KiB meanwhile, far from
filling the 1 MiB pipe."""
_STATE = struct.Struct("<Q?i")
"""Shared between the child and the parent: bytes stored, input ended, errno of a
failure."""


def grow_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer (the most an unprivileged process may set by default)."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as exc:
        _debug("cannot grow the stdin pipe: %s", exc)


def _fill(fd: int, store: list[int], limit: int, state: mmap.mmap, stop: int) -> None:
    """The child: move ``fd`` into the ``store`` pipes until told to stop, ``limit``, end
    or error.

    From a pipe, ``splice`` moves QEMU's pipe buffers into the store pipes as they are:
    nothing is copied, and no memory is touched for the first time (which is slow on
    these machines).  A store pipe is closed once full, so that the parent sees its end.
    Anything else is read and written (no more than fits).  The count is published
    after the data is in.
    """
    pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    poller = select.poll()
    poller.register(stop, select.POLLIN | select.POLLHUP)
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    size, ended, error = 0, False, 0
    try:
        for out in store:
            room = PIPE_SIZE  # for what is read and written: all of it must fit
            while size < limit and room:
                if any(f == stop for f, _ in poller.poll()):
                    return  # the parent takes over (or is gone)
                if pipe:
                    want = min(SPLICE_SIZE, limit - size)
                    try:
                        n = os.splice(fd, out, want, flags=_NONBLOCK)
                    except BlockingIOError:  # this store pipe is full (stdin is not empty)
                        break
                    if 0 < n < want:
                        time.sleep(NAP)  # let QEMU fill its last buffer, and more
                else:
                    data = os.read(fd, min(READ_SIZE, limit - size, room))
                    view = memoryview(data)
                    while view:  # it fits: the parent can only have made more room
                        view = view[os.write(out, view) :]
                    n = len(data)
                    room -= n
                if not n:
                    ended = True
                    return
                size += n
                _STATE.pack_into(state, 0, size, False, 0)
            os.close(out)
            if size >= limit:
                return
    except OSError as exc:
        error = exc.errno or -1
    finally:
        _STATE.pack_into(state, 0, size, ended, error)


def _close_all_but(keep: set[int]) -> None:
    """In the child: hold no other end of any pipe (a writer's end would keep the reader
    from ever seeing the end of input)."""
    low = 0
    for fd in sorted(keep):
        if low < fd:  # closerange(0, 0) would close everything
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class ReadAhead:
    """A child reading ``fd`` until :meth:`take`, ``limit`` bytes or end of input."""

    def __init__(self, fd: int, limit: int = LIMIT) -> None:
        self.fd = fd
        self.limit = limit
        self._state = mmap.mmap(-1, mmap.PAGESIZE)  # shared with the child
        self._store: list[int] = []  # read ends of the store pipes, in order
        self._stop = -1
        self._pid = 0
        self.cpu_seconds = 0.0
        """CPU time of the child, once it has been waited for (the save reports it as its
        own, not as the storage daemon's, which is the other child it reaps)."""

    @classmethod
    def start(cls, fd: int = 0, limit: int = LIMIT) -> ReadAhead:
        grow_pipe(fd)
        ahead = cls(fd, limit)
        ahead._spawn()
        return ahead

    def _spawn(self) -> None:
        if self.limit <= 0:
            return
        writers: list[int] = []
        try:
            writers = self._store_pipes()
            stop_r, self._stop = os.pipe2(os.O_CLOEXEC)
            self._pid = os.fork()
        except OSError as exc:  # the save goes on without it, only slower to start
            _debug("no read-ahead: %s", exc)
            self._close_store()
            for w in writers:
                os.close(w)
            return
        if self._pid == 0:  # the child: nothing of the parent's may run here
            status = 1
            try:
                _close_all_but({self.fd, *writers, stop_r, 2})
                _fill(self.fd, writers, self.limit, self._state, stop_r)
                status = 0
            finally:
                os._exit(status)
        os.close(stop_r)
        for w in writers:  # the child's alone: a store pipe ends when the child closes it
            os.close(w)

    def _store_pipes(self) -> list[int]:
        """Pipes of 1 MiB for ``limit`` bytes (and slack); their write ends (the read ends
        are kept).

        Fewer when the system allows no more (an unprivileged user's pipe buffers are
        bounded by fs.pipe-user-pages-soft, 64 MiB in all by default).
        """
        writers: list[int] = []
        for _ in range(-(-int(self.limit * STORE_SLACK) // PIPE_SIZE)):
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError as exc:
                _debug("read-ahead: %d store pipes (%s)", len(writers), exc)
                os.close(r)
                os.close(w)
                break
            self._store.append(r)
            writers.append(w)
        if not writers:
            raise OSError("no store pipe")
        return writers

    def buffered(self) -> tuple[int, bool]:
        """Bytes read so far, and whether input ended (for tests and progress)."""
        size, ended, _ = _STATE.unpack_from(self._state)
        return size, ended

    def stop(self) -> None:
        """Stop the child and wait for it; idempotent."""
        # Forget first: a signal handler may raise anywhere below, and stop() runs again.
        pid, self._pid = self._pid, 0
        stop, self._stop = self._stop, -1
        if stop >= 0:
            os.close(stop)  # the child sees the hang-up before its next read
        if not pid:
            return
        _, status, usage = os.wait4(pid, 0)
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        if status:  # what it stored is still good: the save reads on from there
            _debug("read-ahead child ended with status %#x", status)

    def take(self) -> Backlog:
        """The stream read so far and from now on, in order, while the child goes on
        reading until the parent catches up with it (or its limit): QEMU keeps writing
        at the child's pace meanwhile.  Read stdin only once the backlog is exhausted.
        """
        return Backlog(self)

    def _published(self) -> tuple[int, bool, int]:
        size, ended, error = _STATE.unpack_from(self._state)
        return size, ended, error

    def _close_store(self) -> None:
        for r in self._store:
            os.close(r)
        self._store = []


class Backlog:
    """What :class:`ReadAhead`'s child read, in order; ``ended`` once exhausted.

    Read it with :meth:`read` or :meth:`readv` (or iterate); both return nothing once it
    is exhausted, and stdin is then the caller's to read.
    """

    def __init__(self, ahead: ReadAhead) -> None:
        self._ahead = ahead
        self._pipe = 0  # the store pipe read from
        self.ended = False
        self.exhausted = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer at the end of a store pipe); b"" once exhausted."""
        return self._next(lambda fd: os.read(fd, n)) or b""

    def readv(self, buffers: list[memoryview]) -> int:
        """Like ``os.readv`` on the backlog; 0 once exhausted."""
        return self._next(lambda fd: os.readv(fd, buffers)) or 0

    def __iter__(self) -> Backlog:
        return self

    def __next__(self) -> bytes:
        data = self.read(READ_SIZE)
        if not data:
            raise StopIteration
        return data

    def _next(self, read: Callable[[int], _T]) -> _T | None:
        ahead = self._ahead
        store = ahead._store
        while self._pipe < len(store):
            try:
                got = read(store[self._pipe])
            except BlockingIOError:
                # The child is filling this pipe and has nothing more yet: caught up.
                # From here the parent reads stdin itself; once the child is gone, what
                # it stored ends with the end of each pipe.
                ahead.stop()
                continue
            if got:
                return got
            self._pipe += 1  # closed by the child, and empty
        if not self.exhausted:
            self.exhausted = True
            ahead.stop()
            ahead._close_store()
            _, ended, error = ahead._published()
            if error:
                raise OSError(error, f"reading stdin: {os.strerror(error)}")
            self.ended = ended
        return None
