"""Data pages read from the pipe straight into a write slot, their headers set aside.

In the bulk of a snapshot the stream is one data page after another, each an 8-byte
header (offset | CONTINUE | PAGE) and the page.  Once the record being received is such
a page, ``qsnap save`` predicts that the next ones continue it and reads the stream
with ``readv`` into a scatter list: header 0 into a small buffer, page 0 into the slot
the daemon will write from, header 1, page 1 next to page 0, and so on.  The kernel's
copy out of the pipe then does what qsnap otherwise did with a second copy in Python
(and a Python step per page): the pages arrive contiguous, in memory shared with the
daemon.  Each header is checked when it has arrived; at the first one that breaks the
prediction (a zero page, another block, the end of the RAM section) the fill stops, and
the bytes received from that record on go back to the stream reader in stream order.

Sans-I/O: :class:`PageScatter` says where the next bytes go and what they were.
"""

from __future__ import annotations

import functools
import struct
from itertools import chain

from qsnap.stream.reader import run_length

HEADER = 8


@functools.cache
def _headers(n: int) -> struct.Struct:
    return struct.Struct(f">{n}Q")


class PageScatter:
    """A slot being filled: ``pages`` records at most, the first one's header ``word``.

    ``placed`` stream bytes have arrived; ``good`` leading records are whole data pages
    that continue the prediction (their pages are the slot's first ``good`` pages);
    ``open`` is False once a header broke the prediction or the slot is full; ``asked``
    is how much the last :meth:`vectors` had room for.
    """

    def __init__(self, slot: memoryview, page_size: int) -> None:
        """For one slot, reused (:meth:`start`): its views are made once."""
        self.page_size = page_size
        self.step = HEADER + page_size
        self.capacity = len(slot) // page_size
        self.word = self.pages = self.placed = self.good = self.asked = self._checked = 0
        self.broken = False
        self._heads = bytearray(HEADER * self.capacity)
        heads = memoryview(self._heads)
        n = self.capacity
        # header 0, page 0, header 1, page 1, ...: views made by C loops, not Python ones
        cut = map(
            slice,
            range(0, n * page_size, page_size),
            range(page_size, (n + 1) * page_size, page_size),
        )
        head_cut = map(slice, range(0, HEADER * n, HEADER), range(HEADER, HEADER * (n + 1), HEADER))
        self._vectors: list[memoryview] = list(
            chain.from_iterable(
                zip(map(heads.__getitem__, head_cut), map(slot.__getitem__, cut), strict=True)
            )
        )

    def start(self, word: int, pages: int) -> None:
        """A new fill: at most ``pages`` records, the first one's header ``word``."""
        if not 1 <= pages <= self.capacity:
            raise ValueError(f"{pages} pages of {self.page_size} bytes do not fit the slot")
        self.word = word
        self.pages = pages
        self.placed = self.good = self._checked = 0
        self.broken = False
        self.asked = 0

    @property
    def open(self) -> bool:
        return not self.broken and self.placed < self.pages * self.step

    def vectors(self, most: int) -> list[memoryview]:
        """Where the next ``most`` bytes (at most) of the stream go, in order."""
        index, into = divmod(self.placed, self.step)
        if into < HEADER:
            first = self._vectors[2 * index][into:]
            index = 2 * index + 1
        else:
            first = self._vectors[2 * index + 1][into - HEADER :]
            index = 2 * index + 2
        # whole vectors after the first, about ``most`` bytes in all (a soft bound)
        out = [first, *self._vectors[index : min(index + 2 * (most // self.step), 2 * self.pages)]]
        self.asked = sum(map(len, out))
        return out

    def place(self, data: bytes | memoryview) -> None:
        """Copy bytes already received (the start of the first record) into place."""
        view = memoryview(data)
        while view:
            target = self.vectors(len(view))[0]
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            self.received(n)

    def received(self, n: int) -> None:
        """``n`` more bytes arrived where :meth:`vectors` said: check the new headers."""
        if n < 0 or self.placed + n > self.pages * self.step:
            raise ValueError(f"{n} bytes received beyond the slot")
        self.placed += n
        step = self.step
        if self.broken:
            return
        headers = (
            min((self.placed - HEADER) // step + 1, self.pages) if self.placed >= HEADER else 0
        )
        if headers > self._checked:
            first = self._checked
            words = _headers(headers - first).unpack_from(self._heads, HEADER * first)
            good = run_length(words, self.word + first * self.page_size, self.page_size)
            if good < len(words):
                self.broken = True
                headers = first + good
            self._checked = headers
        self.good = min(self._checked, self.placed // step)

    def good_pages(self) -> list[memoryview]:
        """The slot's first ``good`` pages, as views of it."""
        return self._vectors[1 : 2 * self.good : 2]

    def rest(self) -> bytes:
        """The bytes placed after the ``good`` records, in stream order (for the reader)."""
        start = self.good * self.step
        if start >= self.placed:
            return b""
        parts = []
        index = self.good * 2
        size = 0
        want = self.placed - start
        while size < want:
            part = self._vectors[index][: want - size]
            parts.append(part)
            size += len(part)
            index += 1
        return b"".join(parts)
