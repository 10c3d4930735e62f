"""Bulk reads through the storage daemon's vhost-user-blk export, into shared memory.

Over NBD every byte read is copied by the daemon into the socket and by qsnap out of it
before qsnap copies it into QEMU's pipe.  Here the daemon's block layer reads straight
into a memfd that qsnap maps, and qsnap's writes to the pipe take the data from there:
two copies fewer per byte, and no Python buffer per read.  QEMU's block layer still does
all the image I/O; only the transport differs from NBD, which stays for everything else.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import select
import struct
from collections.abc import Callable, Iterable, Iterator
from enum import IntEnum

from qsnap.image.span import Span
from qsnap.image.vhost_user import Frontend, VhostUserError
from qsnap.image.virtqueue import RingLayout, Segment, SplitQueue, VirtqueueError

SECTOR = 512
_OUTHDR = struct.Struct("<IIQ")
_CONTROL = 32
"""Bytes per slot for the request header (16) and the status byte the device writes."""
_STATUS_UNSET = 0xFF


class BlkRequest(IntEnum):
    IN = 0


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


class VhostBlkReader:
    """Reads of up to ``slot_size`` bytes, ``depth`` in flight, into ``depth`` shared slots."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        depth: int,
        slot_size: int,
        timeout: float,
        death: Callable[[], str],
    ) -> None:
        """Takes ownership of ``frontend``; use :meth:`open`."""
        self.frontend = frontend
        self.depth = depth
        self.slot_size = slot_size
        self.timeout = timeout
        self._death = death
        self._heads: dict[int, int] = {}
        """Slot of each chain in flight, by head (a head is reused once collected)."""
        self._done: set[int] = set()
        self._broken = ""
        """Slots whose read the device has finished."""
        layout = RingLayout.at(0, max(8, 1 << (3 * depth - 1).bit_length()))
        self._control = _align(layout.end, 64)
        self._data = _align(self._control + depth * _CONTROL, mmap.PAGESIZE)
        size = self._data + depth * slot_size
        self._fd = os.memfd_create("qsnap-vhost-user", os.MFD_CLOEXEC)
        self._kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        os.ftruncate(self._fd, size)
        self._memory = mmap.mmap(self._fd, size)
        self._queue = SplitQueue(self._memory, layout)
        self._poll = select.poll()
        self._poll.register(self._call, select.POLLIN)
        self._poll.register(frontend.fileno(), select.POLLIN)
        frontend.negotiate(0)
        frontend.share_memory(self._fd, size)
        frontend.start_queue(0, layout, self._kick, self._call)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        depth: int = 8,
        slot_size: int = 1 << 20,
        timeout: float = 60.0,
        death: Callable[[], str] = str,
    ) -> VhostBlkReader:
        """Connect to the export's socket and set up the queue and the shared memory."""
        if depth < 1 or slot_size <= 0 or slot_size % SECTOR:
            raise ValueError(f"bad reader geometry: depth {depth}, slot size {slot_size}")
        frontend = Frontend.connect(path, timeout)
        try:
            return cls(frontend, depth=depth, slot_size=slot_size, timeout=timeout, death=death)
        except BaseException:
            frontend.close()
            raise

    def close(self) -> None:
        """Disconnect and unmap (a span still in use keeps the mapping until it goes)."""
        self.frontend.close()
        if self._fd < 0:
            return
        self._queue.release()
        with contextlib.suppress(BufferError):
            self._memory.close()
        for fd in (self._kick, self._call, self._fd):
            os.close(fd)
        self._fd = -1

    def reads(self, requests: Iterable[tuple[int, int]]) -> Iterator[Span]:
        """The data of each (offset, length), in order; a span is valid until the next."""
        if self._broken:
            raise VhostUserError(f"vhost-user-blk connection unusable: {self._broken}")
        free = list(range(self.depth))
        pending: collections.deque[tuple[int, int, int]] = collections.deque()
        try:
            for offset, length in requests:
                pending.append(self._submit(free.pop(), offset, length))
                if len(pending) == self.depth:
                    slot, span = self._complete(*pending.popleft())
                    yield span
                    free.append(slot)
            while pending:
                slot, span = self._complete(*pending.popleft())
                yield span
                free.append(slot)
        finally:
            self._settle(pending)

    def _settle(self, pending: Iterable[tuple[int, int, int]]) -> None:
        """Wait out the reads a caller abandoned, so no later read gets a slot still being
        written (errors are left for the next caller: the connection is then broken)."""
        with contextlib.suppress(VhostUserError):
            for slot, _, _ in pending:
                while slot not in self._done:
                    self._wait()
                self._done.remove(slot)

    def _submit(self, slot: int, offset: int, length: int) -> tuple[int, int, int]:
        if offset < 0 or offset % SECTOR or length % SECTOR or not 0 < length <= self.slot_size:
            raise ValueError(f"read at {offset:#x}+{length:#x}: not whole sectors in one slot")
        control = self._control + slot * _CONTROL
        _OUTHDR.pack_into(self._memory, control, BlkRequest.IN, 0, offset // SECTOR)
        self._memory[control + _OUTHDR.size] = _STATUS_UNSET
        head = self._queue.add(
            [
                Segment(control, _OUTHDR.size),
                Segment(self._data + slot * self.slot_size, length, writable=True),
                Segment(control + _OUTHDR.size, 1, writable=True),
            ]
        )
        self._heads[head] = slot
        os.eventfd_write(self._kick, 1)
        return slot, offset, length

    def _complete(self, slot: int, offset: int, length: int) -> tuple[int, Span]:
        while slot not in self._done:
            self._wait()
        self._done.remove(slot)
        status = self._memory[self._control + slot * _CONTROL + _OUTHDR.size]
        if status != BlkStatus.OK:
            name = BlkStatus(status).name if status in BlkStatus._value2member_map_ else status
            raise VhostUserError(
                f"vhost-user-blk read at {offset:#x}+{length:#x} failed: status {name}"
                + self._why()
            )
        return slot, Span(self._memory, self._data + slot * self.slot_size, length)

    def _why(self) -> str:
        death = self._death()
        return f" ({death})" if death else ""

    def _fail(self, message: str) -> VhostUserError:
        self._broken = message
        return VhostUserError(message)

    def _wait(self) -> None:
        """Collect used chains, waiting for the device's call if there are none yet."""
        try:
            used = self._queue.collect()
        except VirtqueueError as exc:
            raise self._fail(f"vhost-user-blk: {exc}") from None
        if used:
            self._done.update(self._heads.pop(u.head) for u in used)
            return
        events = self._poll.poll(int(self.timeout * 1000))
        if not events:
            raise self._fail(f"qemu-storage-daemon answered no read within {self.timeout:g} s")
        for fd, _ in events:
            if fd == self._call:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._call)
            else:
                raise self._fail(
                    "qemu-storage-daemon dropped the vhost-user-blk connection" + self._why()
                )
