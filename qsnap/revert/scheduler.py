"""Which host pages go next in a revert, so that every page is sent exactly once.

The scheduler is pure bookkeeping (no I/O): one byte per host page and block records
whether the page has been sent, another whether the image knows it reads as zero.
``bytearray.find`` on those maps does the scanning in C, so choosing the next run costs
far less than sending it.  Postcopy requests name a host page (QEMU asks for whole host
pages); a request moves the background cursor to just after it, because a guest that
faulted on one page is likely to touch its neighbours next.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from qsnap.revert.errors import RevertError

_SENT = b"\x01"
_UNSENT = b"\x00"


@dataclass(frozen=True, slots=True)
class BlockGeometry:
    """A RAM block as the scheduler sees it: name, used length, host page size."""

    name: str
    length: int
    host_page_size: int


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive host pages of one block, all zero or all data, none sent yet."""

    block: int
    first: int
    count: int
    zero: bool


class PageScheduler:
    """Sent/zero maps for every block and the background cursor.

    ``zero_extents`` gives, per block, byte ranges that read as zero; only the host pages
    entirely inside them are treated as zero pages (sent without reading).
    """

    def __init__(
        self,
        blocks: Sequence[BlockGeometry],
        zero_extents: Sequence[Iterable[tuple[int, int]]],
    ) -> None:
        if len(blocks) != len(zero_extents):
            raise ValueError("one zero-extent list per block is needed")
        self.blocks = tuple(blocks)
        self._index = {b.name: i for i, b in enumerate(self.blocks)}
        self._sent: list[bytearray] = []
        self._zero: list[bytearray] = []
        for block, extents in zip(self.blocks, zero_extents, strict=True):
            hps = block.host_page_size
            pages = block.length // hps
            zero = bytearray(pages)
            for start, length in extents:
                first = -(-start // hps)
                end = min((start + length) // hps, pages)
                if end > first:
                    zero[first:end] = b"\x01" * (end - first)
            self._sent.append(bytearray(pages))
            self._zero.append(zero)
        self.remaining = sum(len(s) for s in self._sent)
        self.data_pages = sum(len(z) - z.count(1) for z in self._zero)
        self._cursor_block = 0
        self._cursor_page = 0

    def pages(self, block: int) -> int:
        """Number of host pages of block ``block``."""
        return len(self._sent[block])

    def is_sent(self, block: int, page: int) -> bool:
        return self._sent[block][page] != 0

    def block_index(self, name: str) -> int:
        """The index of the block called ``name``; unknown names are a RevertError."""
        try:
            return self._index[name]
        except KeyError:
            raise RevertError(
                f"QEMU requested pages of RAM block {name!r}, which is not in the snapshot"
            ) from None

    def _runs(self, block: int, first: int, end: int, limit: int) -> list[Run]:
        """Unsent runs in [first, end), split where zero/data changes, at most ``limit``."""
        sent = self._sent[block]
        zero = self._zero[block]
        runs: list[Run] = []
        page = sent.find(_UNSENT, first, end)
        while page >= 0 and len(runs) < limit:
            stop = sent.find(_SENT, page, end)
            stop = end if stop < 0 else stop
            is_zero = zero[page] != 0
            change = zero.find(_UNSENT if is_zero else _SENT, page, stop)
            stop = stop if change < 0 else change
            runs.append(Run(block, page, stop - page, is_zero))
            page = sent.find(_UNSENT, stop, end)
        return runs

    def request(self, name: str, offset: int, length: int) -> list[Run]:
        """The unsent runs covering a page request, widened to whole host pages.

        The pages are not marked: the caller marks each run once it is written.  A range
        outside the block is a RevertError naming the block and the offset.
        """
        block = self.block_index(name)
        geometry = self.blocks[block]
        if length <= 0 or offset < 0 or offset + length > geometry.length:
            raise RevertError(
                f"QEMU requested {length} bytes at offset {offset:#x} of RAM block "
                f"{name!r}, outside its {geometry.length:#x} bytes"
            )
        hps = geometry.host_page_size
        first = offset // hps
        end = -(-(offset + length) // hps)
        self._cursor_block, self._cursor_page = block, end
        return self._runs(block, first, end, end - first)

    def unsent(self, run: Run) -> list[Run]:
        """The parts of ``run`` still unsent (requests may have taken some meanwhile)."""
        return self._runs(run.block, run.first, run.first + run.count, run.count)

    def next_run(self, max_bytes: int) -> Run | None:
        """The next unsent run from the background cursor, wrapping over every block.

        At most ``max_bytes`` (but at least one host page); ``None`` once all is sent.
        """
        if self.remaining == 0:
            return None
        block, page = self._cursor_block, self._cursor_page
        for _ in range(len(self.blocks) + 1):
            sent = self._sent[block]
            found = sent.find(_UNSENT, page) if page < len(sent) else -1
            if found >= 0:
                max_pages = max(1, max_bytes // self.blocks[block].host_page_size)
                end = min(len(sent), found + max_pages)
                run = self._runs(block, found, end, 1)[0]
                self._cursor_block, self._cursor_page = block, run.first + run.count
                return run
            block, page = (block + 1) % len(self.blocks), 0
        raise AssertionError("remaining pages but none unsent")

    def unsent_ranges(self, block: int) -> Iterator[tuple[int, int]]:
        """(first host page, count) of every maximal run of unsent pages of ``block``."""
        sent = self._sent[block]
        page = sent.find(_UNSENT)
        while page >= 0:
            end = sent.find(_SENT, page)
            end = len(sent) if end < 0 else end
            yield page, end - page
            page = sent.find(_UNSENT, end)

    def mark_sent(self, run: Run) -> None:
        """Record ``run`` as written; sending a page twice is a bug, so it is checked."""
        sent = self._sent[run.block]
        end = run.first + run.count
        if sent.find(_SENT, run.first, end) >= 0:
            raise AssertionError(f"pages of {run} already sent")
        sent[run.first : end] = _SENT * run.count
        self.remaining -= run.count
