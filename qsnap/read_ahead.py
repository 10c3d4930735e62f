"""Taking the migration stream off stdin while ``qsnap save`` starts.

QEMU starts ``exec:qsnap save`` and writes the stream at once.  Until qsnap has imported
its modules and opened the image (0.1-0.2 s), QEMU would stall on a full pipe, with the
guest's memory write-protected all that time.  A forked child reads the stream into a
memfd meanwhile, up to a bound, and hands it over at the first read; after that the
save reads stdin itself.

A child, not a thread: a thread needs the GIL for every read, and the imports in the
main thread hold it for the whole switch interval (5 ms), in which QEMU fills the 1 MiB
pipe in under 2 ms and then waits; QEMU spent most of qsnap's start-up waiting.  The
child reads as soon as QEMU writes.  The data stays in the memfd until it is parsed
(read back with ``pread``, never mapped by the parent).

Only the standard library is imported here: this runs before the rest of qsnap loads.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import select
import stat
import struct
from collections.abc import Iterator

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
LIMIT = 64 << 20
READ_SIZE = 1 << 20
_STATE = struct.Struct("<Q?i")
"""Shared between the child and the parent: bytes stored, input ended, errno of a failure."""


def grow_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer (the most an unprivileged process may set by default)."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as exc:
        log.debug("cannot grow the stdin pipe: %s", exc)


def _fill(fd: int, store: int, limit: int, state: mmap.mmap, stop: int) -> None:
    """The child: read ``fd`` into ``store`` until told to stop, ``limit``, end or error."""
    memory = memoryview(mmap.mmap(store, limit))
    poller = select.poll()
    poller.register(stop, select.POLLIN | select.POLLHUP)
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    size = 0
    try:
        while size < limit:
            if any(f == stop for f, _ in poller.poll()):
                return  # the parent takes over (or is gone)
            n = os.readv(fd, [memory[size : size + READ_SIZE]])
            if not n:
                _STATE.pack_into(state, 0, size, True, 0)
                return
            size += n
            _STATE.pack_into(state, 0, size, False, 0)
    except OSError as exc:
        _STATE.pack_into(state, 0, size, False, exc.errno or -1)


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
            log.debug("no read-ahead: %s", exc)
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
        _, status = os.waitpid(pid, 0)
        if status:  # what it stored is still good: the save reads on from there
            log.debug("read-ahead child ended with status %#x", status)

    def take(self) -> tuple[Iterator[bytes], bool]:
        """Stop reading; the data read so far, in chunks and in order, and whether input
        ended.  A read that failed in the child raises here: the stream is unusable then.
        """
        self.stop()
        size, ended, error = _STATE.unpack_from(self._state)
        if error:
            self._close_store()
            raise OSError(error, f"reading stdin: {os.strerror(error)}")
        return self._chunks(size), ended

    def _chunks(self, size: int) -> Iterator[bytes]:
        try:
            for pos in range(0, size, READ_SIZE):
                yield os.pread(self._store, min(READ_SIZE, size - pos), pos)
        finally:
            self._close_store()

    def _close_store(self) -> None:
        if self._store >= 0:
            os.close(self._store)
            self._store = -1
