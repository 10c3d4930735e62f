"""Bulk I/O through the storage daemon's vhost-user-blk export, in shared memory.

Over NBD every byte is copied into a socket on one side and out of it on the other.
Here the daemon's block layer reads into, and writes from, a memfd that qsnap maps:
a read lands where qsnap writes the pipe from, and a write costs qsnap one copy of the
pages into a slot, with nothing for the daemon to receive.  QEMU's block layer still does
all the image I/O; only the transport differs from NBD, which stays for everything else.

Requests on this queue and on an NBD connection to the same daemon are not ordered
against each other: callers wait for one transport's writes before the other may touch
the same range.  The virtio-blk status byte has no errno, so a failed write is handed
back with its data (:class:`VhostWriteError`) for the caller to learn the cause elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import select
import struct
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from qsnap.image.span import Span
from qsnap.image.vhost_user import Frontend, Request, VhostUserError
from qsnap.image.virtqueue import RingLayout, Segment, SplitQueue, VirtqueueError

SECTOR = 512
_OUTHDR = struct.Struct("<IIQ")
_CONTROL = 32
"""Bytes per slot for the request header (16) and the status byte the device writes."""
_STATUS_UNSET = 0xFF
_CHAIN = 3
"""Descriptors per request: header, data, status."""

Buffer = bytes | bytearray | memoryview


class BlkRequest(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4


class BlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class BlkFeature(IntFlag):
    RO = 1 << 5
    FLUSH = 1 << 9


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


def _status_name(status: int) -> str:
    return BlkStatus(status).name if status in BlkStatus._value2member_map_ else str(status)


class VhostWriteError(VhostUserError):
    """The device failed one write; ``data`` is what it was given, to retry elsewhere."""

    def __init__(self, message: str, offset: int, data: bytes) -> None:
        super().__init__(message)
        self.offset = offset
        self.data = data


@dataclass(frozen=True, slots=True)
class _Write:
    offset: int
    length: int


class VhostBlkDevice:
    """``depth`` requests in flight, each with a shared slot of ``slot_size`` bytes.

    Reads come back in order as spans of their slots (:meth:`reads`); writes are queued
    with :meth:`write` and complete in any order, :meth:`drain` waits for them all.
    """

    def __init__(
        self,
        frontend: Frontend,
        *,
        depth: int,
        slot_size: int,
        timeout: float,
        death: Callable[[], str],
        writable: bool = False,
    ) -> None:
        """Takes ownership of ``frontend``; use :meth:`open`."""
        self.frontend = frontend
        self.depth = depth
        self.slot_size = slot_size
        self.timeout = timeout
        self.writable = writable
        self._death = death
        self._heads: dict[int, int] = {}
        """Slot of each chain in flight, by head (a head is reused once collected)."""
        self._done: set[int] = set()
        """Slots whose request the device has finished."""
        self._free = list(range(depth))
        self._writes: dict[int, _Write] = {}
        """Writes (and a flush, as an empty write) in flight, by slot."""
        self._failed: collections.deque[VhostWriteError] = collections.deque()
        self._broken = ""
        layout = RingLayout.at(0, max(8, 1 << (_CHAIN * depth - 1).bit_length()))
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
        if writable:
            offered = frontend.get_u64(Request.GET_FEATURES)
            if offered & BlkFeature.RO or not offered & BlkFeature.FLUSH:
                raise VhostUserError("the vhost-user-blk export is read-only or cannot flush")
        frontend.negotiate(BlkFeature.FLUSH if writable else 0)
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
        writable: bool = False,
    ) -> VhostBlkDevice:
        """Connect to the export's socket and set up the queue and the shared memory."""
        if depth < 1 or slot_size <= 0 or slot_size % SECTOR:
            raise ValueError(f"bad device geometry: depth {depth}, slot size {slot_size}")
        frontend = Frontend.connect(path, timeout)
        try:
            return cls(
                frontend,
                depth=depth,
                slot_size=slot_size,
                timeout=timeout,
                death=death,
                writable=writable,
            )
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

    # -- reads --------------------------------------------------------------------------

    def reads(
        self, requests: Iterable[tuple[int, int]], keep: int = 0
    ) -> Generator[Span, None, None]:
        """The data of each (offset, length), in order.

        A span stays valid until ``keep + 1`` more have been asked for: its slot is then
        given to a later read.
        """
        self._check()
        if not 0 <= keep < self.depth:
            raise ValueError(f"cannot keep {keep} spans with {self.depth} slots")
        pending: collections.deque[tuple[int, int, int]] = collections.deque()
        held: collections.deque[int] = collections.deque()  # slots of spans the caller has
        try:
            for offset, length in requests:
                self._check_range("read", offset, length)
                while len(pending) + len(held) >= self.depth:  # no slot left: hand one out
                    yield self._complete(*pending.popleft(), held)
                    if len(held) > keep:
                        self._free.append(held.popleft())
                slot = self._slot()
                self._submit(slot, BlkRequest.IN, offset, length)
                pending.append((slot, offset, length))
            while pending:
                yield self._complete(*pending.popleft(), held)
                if len(held) > keep:
                    self._free.append(held.popleft())
        finally:
            self._free.extend(held)
            self._settle(pending)

    def _settle(self, pending: Iterable[tuple[int, int, int]]) -> None:
        """Wait out the reads a caller abandoned, so no later request gets a slot still
        being written (errors are left for the next caller: the connection is then broken)."""
        with contextlib.suppress(VhostUserError):
            for slot, _, _ in pending:
                while slot not in self._done:
                    self._wait()
                self._done.remove(slot)
                self._free.append(slot)

    def _complete(self, slot: int, offset: int, length: int, held: collections.deque[int]) -> Span:
        """The span of a finished read; its slot goes to ``held`` until the caller is done."""
        while slot not in self._done:
            self._wait()
        self._done.remove(slot)
        held.append(slot)
        status = self._status(slot)
        if status != BlkStatus.OK:
            raise VhostUserError(
                f"vhost-user-blk read at {offset:#x}+{length:#x} failed: "
                f"status {_status_name(status)}" + self._why()
            )
        return Span(self._memory, self._slot_data(slot), length)

    # -- writes -------------------------------------------------------------------------

    def write(self, offset: int, parts: Sequence[Buffer], length: int) -> None:
        """Copy the concatenation of ``parts`` (``length`` bytes) into a slot and queue it.

        Raises the :class:`VhostWriteError` of an earlier write that failed (once each),
        before this one is queued: the caller handles it and calls again.
        """
        if not self.writable:
            raise VhostUserError("vhost-user-blk device opened read-only")
        self._check_range("write", offset, length)
        if sum(map(len, parts)) != length:
            raise ValueError(f"write at {offset:#x}: its parts do not add up to {length:#x} bytes")
        slot = self._slot()
        mem, pos = self._memory, self._slot_data(slot)
        # Slice by slice through the mapping: a third less CPU than os.pwritev into the
        # memfd (the kernel looks up each shmem page), at the cost of the slots in RSS.
        for part in parts:
            n = len(part)
            mem[pos : pos + n] = part
            pos += n
        self._writes[slot] = _Write(offset, length)
        self._submit(slot, BlkRequest.OUT, offset, length)

    def lend(self) -> tuple[int, memoryview]:
        """A free slot for the caller to fill in place: its number and its memory.

        It goes back with :meth:`write_lent` (as a write) or :meth:`give_back`.  Raises
        like :meth:`write` does, before any slot is taken.
        """
        if not self.writable:
            raise VhostUserError("vhost-user-blk device opened read-only")
        slot = self._slot()
        start = self._slot_data(slot)
        return slot, memoryview(self._memory)[start : start + self.slot_size]

    def write_lent(self, slot: int, offset: int, length: int) -> None:
        """Queue the write of the first ``length`` bytes of a lent slot, as they are."""
        self._check_range("write", offset, length)
        self._writes[slot] = _Write(offset, length)
        self._submit(slot, BlkRequest.OUT, offset, length)

    def give_back(self, slot: int) -> None:
        """A lent slot that was not written after all."""
        self._free.append(slot)

    def drain(self) -> None:
        """Wait for every write in flight; raise the first failure (once each)."""
        self._check()
        while True:
            self._reap_failures()
            if not self._writes:
                return
            self._wait()

    def flush(self) -> None:
        """Drain, then FLUSH: it covers writes completed before it, on any export of the node."""
        self.drain()
        slot = self._slot()
        self._writes[slot] = _Write(0, 0)
        self._submit(slot, BlkRequest.FLUSH, 0, 0)
        self.drain()

    def _reap(self) -> None:
        """Free the slots of finished writes; a failure keeps a copy of its data."""
        for slot in [s for s in self._done if s in self._writes]:
            self._done.remove(slot)
            write = self._writes.pop(slot)
            status = self._status(slot)
            if status != BlkStatus.OK:
                what = f"write at {write.offset:#x}+{write.length:#x}" if write.length else "flush"
                data = self._memory[self._slot_data(slot) : self._slot_data(slot) + write.length]
                self._failed.append(
                    VhostWriteError(
                        f"vhost-user-blk {what} failed: status {_status_name(status)}",
                        write.offset,
                        data,
                    )
                )
            self._free.append(slot)

    # -- common -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._broken:
            raise VhostUserError(f"vhost-user-blk connection unusable: {self._broken}")

    def _reap_failures(self) -> None:
        """Collect finished requests; raise the first write failure not reported yet."""
        self._reap()
        if self._failed:
            raise self._failed.popleft()

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or offset % SECTOR or length % SECTOR or not 0 < length <= self.slot_size:
            raise ValueError(f"{what} at {offset:#x}+{length:#x}: not whole sectors in one slot")

    def _slot(self) -> int:
        """A free slot, waiting for a write to finish if need be (raising its failure)."""
        self._check()
        while True:
            self._reap_failures()
            if self._free:
                return self._free.pop()
            if not self._writes:
                raise RuntimeError("vhost-user-blk: every slot is held by a read")
            self._wait()

    def _slot_data(self, slot: int) -> int:
        return self._data + slot * self.slot_size

    def _status(self, slot: int) -> int:
        return self._memory[self._control + slot * _CONTROL + _OUTHDR.size]

    def _submit(self, slot: int, kind: BlkRequest, offset: int, length: int) -> None:
        control = self._control + slot * _CONTROL
        _OUTHDR.pack_into(self._memory, control, kind, 0, offset // SECTOR)
        self._memory[control + _OUTHDR.size] = _STATUS_UNSET
        segments = [Segment(control, _OUTHDR.size)]
        if length:
            segments.append(Segment(self._slot_data(slot), length, writable=kind == BlkRequest.IN))
        segments.append(Segment(control + _OUTHDR.size, 1, writable=True))
        self._heads[self._queue.add(segments)] = slot
        os.eventfd_write(self._kick, 1)

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
            raise self._fail(f"qemu-storage-daemon answered no request within {self.timeout:g} s")
        for fd, _ in events:
            if fd == self._call:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._call)
            else:
                raise self._fail(
                    "qemu-storage-daemon dropped the vhost-user-blk connection" + self._why()
                )
