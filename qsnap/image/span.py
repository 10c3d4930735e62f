"""One read's data as a span of a buffer, handed on without a copy."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

Readable = bytes | bytearray | mmap.mmap


@dataclass(frozen=True, slots=True)
class Span:
    """``length`` bytes at ``start`` of ``buffer``.

    The buffer may be memory that a later read reuses (shared with the storage daemon),
    so a span is only valid until the next read of the same sequence is asked for.
    """

    buffer: Readable
    start: int
    length: int

    @classmethod
    def whole(cls, data: bytes | bytearray) -> Span:
        return cls(data, 0, len(data))

    def view(self) -> memoryview:
        return memoryview(self.buffer)[self.start : self.start + self.length]
