"""The driver side of a virtio split virtqueue, laid out in memory shared with a device.

Sans-I/O: descriptors go in, used elements come out; notifying the device (kick) and
waiting for it (call) are the caller's business.  The layout follows the virtio 1.x
specification (split virtqueues): a descriptor table, the available ring written by the
driver, the used ring written by the device.

Ordering: the descriptors and the ring entry are stored before the available index, and
the used index is loaded before the used entries.  Python cannot issue memory barriers,
so this relies on a host that keeps stores in order and loads in order (x86-64's TSO);
:data:`ORDERED_HOST` says whether this one does, and callers fall back to a socket
transport where it does not.

The two indices shared with a running device are accessed through a memoryview of 16-bit
words: one 2-byte load or store (native order, little-endian on such hosts).
``struct.pack_into`` clears a field before it stores the value: a device that read the
available index in between saw thousands of chains appear and gave up ("Virtqueue size
exceeded", once in some thousands of requests).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag

ORDERED_HOST = os.uname().machine == "x86_64"

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_RING_HEADER = 4  # flags, idx
_MAX_SIZE = 32768

Writable = bytearray | memoryview | mmap.mmap


class DescFlag(IntFlag):
    NEXT = 1
    WRITE = 2
    """The device writes this buffer (a read's data, a status byte)."""


class VirtqueueError(Exception):
    """The device broke the ring protocol (an id it was never given, a bad index)."""


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Offsets of one queue's three parts in the shared memory, and where it ends."""

    size: int
    desc: int
    avail: int
    used: int
    end: int

    @classmethod
    def at(cls, base: int, size: int) -> RingLayout:
        """A queue of ``size`` entries (a power of two) starting at ``base``."""
        if size <= 0 or size > _MAX_SIZE or size & (size - 1):
            raise ValueError(f"virtqueue size {size} is not a power of two up to {_MAX_SIZE}")
        desc = _align(base, 16)
        avail = desc + _DESC.size * size
        used = _align(avail + _RING_HEADER + 2 * size + 2, 4)
        end = used + _RING_HEADER + _USED_ELEM.size * size + 2
        return cls(size, desc, avail, used, end)


@dataclass(frozen=True, slots=True)
class Segment:
    """One buffer of a descriptor chain, by its address in the shared memory."""

    addr: int
    length: int
    writable: bool = False


@dataclass(frozen=True, slots=True)
class Used:
    """A chain the device is done with: its head id, and how many bytes it wrote."""

    head: int
    written: int


class SplitQueue:
    """Adds descriptor chains to the available ring and collects the used ones."""

    def __init__(self, memory: Writable, layout: RingLayout) -> None:
        self._mem = memoryview(memory)
        if self._mem.readonly or len(self._mem) < layout.end:
            raise ValueError("virtqueue memory is read-only or smaller than its layout")
        self.layout = layout
        self._mem[layout.desc : layout.end] = bytes(layout.end - layout.desc)
        self._words = self._mem[: len(self._mem) & ~1].cast("H")  # see the module
        self._free = list(range(layout.size - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        self._avail_idx = 0
        self._used_idx = 0

    @property
    def free(self) -> int:
        """Descriptors not part of an outstanding chain."""
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Chains made available and not yet used."""
        return len(self._chains)

    def add(self, segments: Sequence[Segment]) -> int:
        """Make one chain available to the device; returns its head id."""
        if not segments:
            raise ValueError("a descriptor chain needs at least one segment")
        if len(segments) > len(self._free):
            raise ValueError(f"{len(segments)} descriptors wanted, {len(self._free)} free")
        ids = [self._free.pop() for _ in segments]
        layout, mem = self.layout, self._mem
        last = len(ids) - 1
        for i, (seg, d) in enumerate(zip(segments, ids, strict=True)):
            flags = DescFlag.WRITE if seg.writable else 0
            if i < last:
                flags |= DescFlag.NEXT
            _DESC.pack_into(
                mem, layout.desc + d * _DESC.size, seg.addr, seg.length, flags,
                ids[i + 1] if i < last else 0,
            )  # fmt: skip
        slot = self._avail_idx % layout.size
        _U16.pack_into(mem, layout.avail + _RING_HEADER + 2 * slot, ids[0])
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._words[(layout.avail + 2) // 2] = self._avail_idx
        self._chains[ids[0]] = ids
        return ids[0]

    def collect(self) -> list[Used]:
        """The chains the device has used since the last call, their descriptors freed."""
        layout, mem = self.layout, self._mem
        device_idx = self._words[(layout.used + 2) // 2]
        if (device_idx - self._used_idx) & 0xFFFF > len(self._chains):
            raise VirtqueueError(
                f"used index {device_idx} runs past the {len(self._chains)} outstanding chains"
            )
        done = []
        while self._used_idx != device_idx:
            slot = self._used_idx % layout.size
            head, written = _USED_ELEM.unpack_from(mem, layout.used + _RING_HEADER + 8 * slot)
            chain = self._chains.pop(head, None)
            if chain is None:
                raise VirtqueueError(f"used ring returned descriptor {head}, which is not a head")
            self._free.extend(reversed(chain))
            done.append(Used(head, written))
            self._used_idx = (self._used_idx + 1) & 0xFFFF
        return done

    def release(self) -> None:
        """Drop the view of the shared memory (so that it can be unmapped)."""
        self._words.release()
        self._mem.release()
