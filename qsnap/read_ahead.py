"""Taking the migration stream off stdin while ``qsnap save`` starts.

QEMU starts ``exec:qsnap save`` and writes the stream at once.  Until qsnap has imported
its modules and opened the image (0.1-0.3 s), QEMU would stall on a full pipe, with the
guest's memory write-protected all that time.  A thread started before those imports
reads the stream into memory meanwhile, up to a bound, and hands it over at the first
read; after that the save reads stdin itself (a thread throughout cost more CPU than it
saved: see ``qsnap.save``).

Only the standard library is imported here: this runs before the rest of qsnap loads.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import stat
import threading

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
LIMIT = 32 << 20
READ_SIZE = 1 << 20
POLL_MS = 5


def grow_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer (the most an unprivileged process may set by default)."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError as exc:
        log.debug("cannot grow the stdin pipe: %s", exc)


class ReadAhead:
    """Reads ``fd`` in a thread until :meth:`take` or ``limit`` bytes or end of input."""

    def __init__(self, fd: int, limit: int = LIMIT) -> None:
        self.fd = fd
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: OSError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qsnap-read-ahead", daemon=True)

    @classmethod
    def start(cls, fd: int = 0, limit: int = LIMIT) -> ReadAhead:
        grow_pipe(fd)
        ahead = cls(fd, limit)
        ahead._thread.start()
        return ahead

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while self._size < self.limit and not self._stop.is_set():
                if not poller.poll(POLL_MS):
                    continue
                data = os.read(self.fd, min(READ_SIZE, self.limit - self._size))
                if not data:
                    self._eof = True
                    return
                self._chunks.append(data)
                self._size += len(data)
        except OSError as exc:
            self._error = exc

    def stop(self) -> None:
        """Stop reading (what was read is dropped unless taken); idempotent."""
        self._stop.set()
        self._thread.join()

    def take(self) -> tuple[list[bytes], bool]:
        """Stop reading; the chunks read so far, in order, and whether input ended.

        A read that failed in the thread raises here: the stream is unusable then.
        """
        self.stop()
        if self._error is not None:
            raise self._error
        chunks, self._chunks = self._chunks, []
        return chunks, self._eof
