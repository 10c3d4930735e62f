"""Writing the generated stream to QEMU without ever blocking for good.

A QEMU that stops reading (dead, or postcopy paused) must not leave qsnap stuck in a
write: the pipe is switched to non-blocking mode and every wait for room is a ``poll``
with a stall timeout, during which ``abort_check`` may report that the destination has
already given up (SHUT or end of the return path).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import stat
import termios
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate, chain

from qsnap.revert.errors import RevertError
from qsnap.revert.splice import WORD, Spliced, vmsplice

Buffer = bytes | bytearray | memoryview

_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_POLL_SLICE_MS = 100


class StreamSink:
    """Gathered writes (``writev``) of stream pieces to one file descriptor."""

    def __init__(
        self,
        fd: int,
        stall_timeout: float = 60.0,
        abort_check: Callable[[], str | None] | None = None,
    ) -> None:
        self.fd = fd
        self.stall_timeout = stall_timeout
        self.abort_check = abort_check
        self.bytes_written = 0
        mode = os.fstat(fd).st_mode
        self.pollable = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
        self._blocking = os.get_blocking(fd)
        if self.pollable:
            os.set_blocking(fd, False)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self.splicing = False

    def grow_pipe(self, size: int) -> int:
        """Ask for a pipe buffer of ``size`` bytes; returns the size in effect (0: no pipe).

        A precopy stream gains from a large buffer: QEMU keeps loading from it while qsnap
        waits for its next image read.  Postcopy keeps the default, since a requested
        page queues behind whatever the pipe holds.
        """
        if not stat.S_ISFIFO(os.fstat(self.fd).st_mode):
            return 0
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, size)
        return fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)

    def splice_pages(self) -> bool:
        """Hand page records to the pipe by reference from now on (``qsnap.revert.splice``).

        Only a pipe takes them; the caller must then keep the memory of every
        :class:`Spliced` part unchanged until :meth:`wait_consumed` returns for it.
        """
        self.splicing = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
        return self.splicing

    def unread(self) -> int:
        """Bytes written that QEMU has not read yet (what the pipe holds)."""
        return int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, bytes(4)), "little")

    def wait_consumed(self, position: int) -> None:
        """Return once QEMU has read the stream up to ``position`` (bytes from the start).

        Rarely waits: by the time the records after ``position`` are in the pipe, the
        pipe (a bounded number of buffers) has usually passed the earlier ones on.
        """
        deadline = time.monotonic() + self.stall_timeout
        while self.bytes_written - self.unread() < position:
            self._still_waiting(deadline)
            time.sleep(0.0001)

    def close(self) -> None:
        """Give the descriptor its blocking mode back (it is not closed)."""
        if self.pollable:
            os.set_blocking(self.fd, self._blocking)

    def _wait_writable(self) -> None:
        deadline = time.monotonic() + self.stall_timeout
        while True:
            events = self._poll.poll(_POLL_SLICE_MS)
            if events:
                if events[0][1] & (select.POLLERR | select.POLLHUP):
                    raise RevertError("QEMU closed the migration stream (its end of the pipe)")
                return
            self._still_waiting(deadline)

    def _still_waiting(self, deadline: float) -> None:
        """Raise if the destination has given up, or QEMU stalled past ``deadline``."""
        if self.abort_check is not None:
            reason = self.abort_check()
            if reason is not None:
                raise RevertError(reason)
        if time.monotonic() > deadline:
            raise RevertError(f"QEMU has read nothing for {self.stall_timeout:g} s; giving up")

    def write(self, parts: Sequence[Buffer | Spliced]) -> None:
        """Write every byte of ``parts`` in order: buffers, and runs of page records.

        Spliced runs (only given after :meth:`splice_pages` enabled them) go by reference.
        """
        if not self.splicing:  # then parts are all buffers: no Python code per part
            self._write(parts)  # type: ignore[arg-type]
            return
        batch: list[Buffer] = []
        for part in parts:
            if isinstance(part, Spliced):
                self._write(batch)
                batch = []
                self._splice(part)
            else:
                batch.append(part)
        self._write(batch)

    def _splice(self, run: Spliced) -> None:
        """``vmsplice`` the records of ``run``; a record cut short is finished by copy."""
        table = run.table
        record_size = WORD + table.page_size
        page, end = run.first, run.first + run.count
        while page < end:
            try:
                done = vmsplice(self.fd, table.iovec(2 * page), min(2 * (end - page), _IOV_MAX))
            except BlockingIOError:
                self._wait_writable()
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    raise RevertError("QEMU closed the migration stream (broken pipe)") from None
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                    raise RevertError(f"writing the migration stream: {exc.strerror}") from None
                self.splicing = False  # a pipe that will not take pages: copy from now on
                self._write(_copied(Spliced(table, page, end - page)))
                return
            self.bytes_written += done
            records, cut = divmod(done, record_size)
            page += records
            if cut:
                self._write([memoryview(b"".join(table.record(page)))[cut:]])
                page += 1

    def _write(self, parts: Sequence[Buffer]) -> None:
        """Write every byte of ``parts`` (bytes, or byte-format memoryviews) in order.

        Parts may be many and small (a record word, then a page): after a partial write
        the first unwritten part is found by bisection on their cumulative ends, so no
        Python code runs per part.
        """
        pending: list[Buffer] = list(parts)
        ends = list(accumulate(map(len, pending)))
        written = 0
        index = 0
        while index < len(pending):
            try:
                done = os.writev(self.fd, pending[index : index + _IOV_MAX])
            except BlockingIOError:
                self._wait_writable()
                continue
            except BrokenPipeError:
                raise RevertError("QEMU closed the migration stream (broken pipe)") from None
            except OSError as exc:
                raise RevertError(f"writing the migration stream: {exc.strerror}") from None
            self.bytes_written += done
            written += done
            index = bisect_right(ends, written)
            if index < len(pending):
                start = ends[index] - len(parts[index])
                if written > start:
                    pending[index] = memoryview(parts[index])[written - start :]


def _copied(run: Spliced) -> list[Buffer]:
    """The records of ``run`` as views, for writing by copy."""
    return list(chain.from_iterable(map(run.table.record, range(run.first, run.first + run.count))))
