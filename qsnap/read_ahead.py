"""Taking the migration stream off stdin while ``qsnap save`` starts.

QEMU starts ``exec:qsnap save`` and writes the stream at once.  Until qsnap has imported
its modules and opened the image (0.1-0.2 s), QEMU would stall on a full pipe, with the
guest's memory write-protected all that time.  A forked child moves the stream into a
memfd meanwhile, up to a bound.  From its first read on, the save parses what the child
stored while the child goes on reading, until the save has caught up with it (or the
bound is reached); after that the save reads stdin itself.  So QEMU is paced by the
child's cheap copy, not by the parsing, for the first tens of MiB.

A child, not a thread: a thread needs the GIL for every read, and the imports in the
main thread hold it for the whole switch interval (5 ms), in which QEMU fills the 1 MiB
pipe in under 2 ms and then waits; QEMU spent most of qsnap's start-up waiting.  The
child reads as soon as QEMU writes.  The data stays in the memfd until it is parsed
(read back with ``pread``, never mapped by the parent).

Only the standard library is imported here: this runs before the rest of qsnap loads.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import stat
import struct


def _debug(message: str, *args: object) -> None:
    import logging  # not at start-up: it costs QEMU ~10 ms of a blocked pipe

    logging.getLogger(__name__).debug(message, *args)


PIPE_SIZE = 1 << 20
LIMIT = 64 << 20
READ_SIZE = 1 << 20
SPLICE_SIZE = 128 << 10
"""At most this much per ``splice``: it holds the pipe's lock while it copies into the
memfd (fresh pages, slow to fault in), and QEMU's writes wait for that lock.  With 1 MiB
splices QEMU slept 0.65 ms of every 3.3 ms during start-up (46-56 ms in all)."""
_STATE = struct.Struct("<Q?i?")
"""Shared between the child and the parent: bytes stored, input ended, errno of a failure,
and whether the child has stopped reading."""


def grow_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer (the most an unprivileged process may set by default)."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as exc:
        _debug("cannot grow the stdin pipe: %s", exc)


def _fill(fd: int, store: int, limit: int, state: mmap.mmap, stop: int) -> None:
    """The child: move ``fd`` into ``store`` until told to stop, ``limit``, end or error.

    Data goes in by system call (``splice`` from a pipe, else read and ``pwrite``) before
    the size that covers it is published: the parent reads up to that size meanwhile.
    """
    pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    poller = select.poll()
    poller.register(stop, select.POLLIN | select.POLLHUP)
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    size, ended, error = 0, False, 0
    try:
        while size < limit:
            if any(f == stop for f, _ in poller.poll()):
                return  # the parent takes over (or is gone)
            if pipe:
                n = os.splice(fd, store, min(SPLICE_SIZE, limit - size), offset_dst=size)
            else:
                n = os.pwrite(store, os.read(fd, min(READ_SIZE, limit - size)), size)
            if not n:
                ended = True
                return
            size += n
            _STATE.pack_into(state, 0, size, False, 0, False)
    except OSError as exc:
        error = exc.errno or -1
    finally:
        _STATE.pack_into(state, 0, size, ended, error, True)


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
        self._store = -1
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
        try:
            self._store = os.memfd_create("qsnap-read-ahead", os.MFD_CLOEXEC)
            os.ftruncate(self._store, self.limit)  # sparse: pages come as data arrives
            stop_r, self._stop = os.pipe2(os.O_CLOEXEC)
            self._pid = os.fork()
        except OSError as exc:  # the save goes on without it, only slower to start
            _debug("no read-ahead: %s", exc)
            self._close_store()
            return
        if self._pid == 0:  # the child: nothing of the parent's may run here
            status = 1
            try:
                _close_all_but({self.fd, self._store, stop_r, 2})
                _fill(self.fd, self._store, self.limit, self._state, stop_r)
                status = 0
            finally:
                os._exit(status)
        os.close(stop_r)

    def buffered(self) -> tuple[int, bool]:
        """Bytes read so far, and whether input ended (for tests and progress)."""
        size, ended, _, _ = _STATE.unpack_from(self._state)
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
        size, ended, error, _ = _STATE.unpack_from(self._state)
        return size, ended, error

    def reading(self) -> bool:
        """Whether the child may still read stdin (nobody else may, meanwhile)."""
        return bool(self._pid) and not _STATE.unpack_from(self._state)[3]

    def _close_store(self) -> None:
        if self._store >= 0:
            os.close(self._store)
            self._store = -1


class Backlog:
    """What :class:`ReadAhead`'s child read, in chunks; ``ended`` once exhausted."""

    def __init__(self, ahead: ReadAhead) -> None:
        self._ahead = ahead
        self._pos = 0
        self.ended = False

    @property
    def child_reading(self) -> bool:
        return self._ahead.reading()

    def __iter__(self) -> Backlog:
        return self

    def __next__(self) -> bytes:
        ahead = self._ahead
        size, ended, error = ahead._published()
        if self._pos >= size and ahead._pid:
            ahead.stop()  # caught up: from here the parent reads stdin itself
            size, ended, error = ahead._published()
        if self._pos >= size or ahead._store < 0:
            ahead._close_store()
            if error:
                raise OSError(error, f"reading stdin: {os.strerror(error)}")
            self.ended = ended
            raise StopIteration
        n = min(READ_SIZE, size - self._pos)
        data = os.pread(ahead._store, n, self._pos)
        self._pos += n
        return data
