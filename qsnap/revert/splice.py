"""Page records handed to the stream pipe by reference (``vmsplice``), not copied into it.

A precopy revert's pages sit in memory shared with the storage daemon.  Writing them
into the pipe copies every byte once more, into freshly allocated pipe pages, while the
pipe's mutex keeps QEMU from reading; ``vmsplice`` instead puts references to the pages
themselves in the pipe, and QEMU's ``read`` copies them out.  The price: the memory must
not change until QEMU has read it.  The caller therefore keeps each slot until
:meth:`StreamSink.wait_consumed` says the pipe has passed on its bytes.

Only memory that a ``fork`` cannot turn copy-on-write is spliced: the daemon's memfd
slots, and record words in an anonymous shared mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from itertools import chain, repeat

from qsnap.image.span import Span

SPLICE_F_NONBLOCK = 0x02
_IOVEC = struct.Struct("=QQ")
WORD = 8

_libc = ctypes.CDLL(None, use_errno=True)
_vmsplice = _libc.vmsplice
_vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_uint]
_vmsplice.restype = ctypes.c_ssize_t


def vmsplice(fd: int, iovecs: int, count: int) -> int:
    """``vmsplice(fd, iovecs, count, SPLICE_F_NONBLOCK)``: bytes handed over, or OSError."""
    done = _vmsplice(fd, iovecs, count, SPLICE_F_NONBLOCK)
    if done < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(done)


def address(buffer: mmap.mmap) -> int:
    """Where ``buffer`` starts in this process (valid while it stays mapped)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class SpliceTable:
    """The pages of one shared slot as records: an iovec per record word and per page.

    The words live in an anonymous shared mapping next to the iovec array; a run of
    records is then a contiguous stretch of the array, handed to ``vmsplice`` as is.
    """

    def __init__(self, span: Span, page_size: int) -> None:
        if not isinstance(span.buffer, mmap.mmap):
            raise TypeError("only shared-memory slots can be spliced")
        self.count = count = span.length // page_size
        self.page_size = page_size
        self._memory = mmap.mmap(-1, count * (2 * _IOVEC.size + WORD))
        base = address(self._memory)
        words_at = 2 * _IOVEC.size * count
        self.words = memoryview(self._memory)[words_at:]
        pages = address(span.buffer) + span.start
        struct.pack_into(
            f"={4 * count}Q",
            self._memory,
            0,
            *chain.from_iterable(
                zip(
                    range(base + words_at, base + words_at + count * WORD, WORD),
                    repeat(WORD),
                    range(pages, pages + count * page_size, page_size),
                    repeat(page_size),
                )
            ),
        )
        self._iovecs = base
        self.pages = span.view()

    def records(self, first: int, count: int) -> Spliced:
        """Pages ``first`` ... ``first + count - 1``, each after its word."""
        return Spliced(self, first, count)

    def iovec(self, segment: int) -> int:
        """Address of iovec ``segment`` (``2 * page``: its word, ``2 * page + 1``: the page)."""
        return self._iovecs + _IOVEC.size * segment

    def record(self, page: int) -> list[memoryview]:
        """Page ``page``'s word and data, as views (for writing by copy)."""
        ps = self.page_size
        return [
            self.words[page * WORD : (page + 1) * WORD],
            self.pages[page * ps : (page + 1) * ps],
        ]


@dataclass(frozen=True, slots=True)
class Spliced:
    """A run of page records of a :class:`SpliceTable`, to be written by reference."""

    table: SpliceTable
    first: int
    count: int

    def __len__(self) -> int:
        return self.count * (WORD + self.table.page_size)
