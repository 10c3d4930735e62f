"""Bounds-checked reads from a buffer, for the reader's slow paths.

A read past the end of the buffered bytes raises NeedMore: the caller rewinds and
waits for more input. Malformed values are reported by the caller with
``StreamError(..., cursor.offset)``.
"""

from __future__ import annotations

import struct

from .text import decode_name

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class NeedMore(Exception):
    """Not enough bytes buffered to finish the current element."""


class Cursor:
    """Reads big-endian fields from ``buf`` starting at ``pos``.

    ``base`` is the absolute stream offset of ``buf[0]``, so ``offset`` can name
    positions in error messages.
    """

    __slots__ = ("base", "buf", "pos")

    def __init__(self, buf: bytes, pos: int, base: int) -> None:
        self.buf = buf
        self.pos = pos
        self.base = base

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def _need(self, n: int) -> int:
        pos = self.pos
        if pos + n > len(self.buf):
            raise NeedMore
        self.pos = pos + n
        return pos

    def u8(self) -> int:
        return self.buf[self._need(1)]

    def be16(self) -> int:
        return int(_BE16.unpack_from(self.buf, self._need(2))[0])

    def be32(self) -> int:
        return int(_BE32.unpack_from(self.buf, self._need(4))[0])

    def be64(self) -> int:
        return int(_BE64.unpack_from(self.buf, self._need(8))[0])

    def take(self, n: int) -> bytes:
        pos = self._need(n)
        return self.buf[pos : pos + n]

    def str8(self) -> str:
        """u8 length + bytes (``qemu_get_counted_string``)."""
        return decode_name(self.take(self.u8()))
