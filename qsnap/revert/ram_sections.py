"""RAM records of a generated stream, grouped into PART sections of bounded size.

Both revert modes send pages the same way: ZERO records for pages known or found to be
zero (never a zero page as PAGE, unlike the seed), PAGE records otherwise, CONTINUE
chosen by ``RamEncoder``, and each PART closed by EOS and its footer once it holds
about ``part_bytes``.  Records are buffered as record words and views of the read buffers, and
written with ``writev`` once they hold about ``part_bytes``: the kernel gathers them, so
page data is copied once, from the read buffer into the pipe.

Revert spends its CPU here, and the machine it shares with QEMU and the storage daemon
has little to spare, so no Python bytecode runs per page: the first record of a run goes
through ``RamEncoder`` (which decides between CONTINUE and the block name), and the
others, all CONTINUE in the same block, have consecutive words ``(offset + i * page) |
flags`` packed in one ``struct`` call and interleaved with their pages by C iterators.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from itertools import chain, groupby, repeat

from qsnap.image.span import Span
from qsnap.revert.sink import StreamSink
from qsnap.revert.splice import Spliced, SpliceTable
from qsnap.revert.stats import RevertStats
from qsnap.stream.constants import RamFlag, SectionType
from qsnap.stream.wire import RamEncoder, encode_footer

_SECTION_HEAD = struct.Struct(">BI")
_WORD = 8
_ZERO_RECORD = _WORD + 1
_CONTINUE_PAGE = int(RamFlag.PAGE | RamFlag.CONTINUE)
_CONTINUE_ZERO = int(RamFlag.ZERO | RamFlag.CONTINUE)


def _words(first: int, count: int, step: int) -> bytes:
    """``count`` be64 words ``first``, ``first + step``, ... packed back to back."""
    return struct.pack(f">{count}Q", *range(first, first + count * step, step))


def _slices(view: memoryview, count: int, size: int, stride: int) -> map[memoryview]:
    """``count`` views of ``size`` bytes, ``stride`` bytes apart, from the start of ``view``."""
    starts = range(0, count * stride, stride)
    return map(view.__getitem__, map(slice, starts, range(size, count * stride + size, stride)))


def _zero_pages(span: Span, page_size: int, zero_page: bytes) -> Iterator[bool]:
    """Whether each page of ``span`` (bytes or bytearray) is all zeros, tested in place.

    ``startswith`` is a ``memcmp``; ``bytes.find`` with a page-long needle preprocesses
    it on every call and is 25 times slower.
    """
    starts = range(span.start, span.start + span.length, page_size)
    return map(span.buffer.startswith, repeat(zero_page), starts)  # type: ignore[union-attr]


class _SlotViews:
    """Views of one shared-memory slot's pages, and a buffer with a record word per page.

    When the sink splices, the words and the records' iovecs live in a
    :class:`SpliceTable`, and a run of records is handed over as one :class:`Spliced`.
    """

    def __init__(self, span: Span, page_size: int, splice: bool) -> None:
        count = span.length // page_size
        self.pages = list(_slices(span.view(), count, page_size, page_size))
        self.table = SpliceTable(span, page_size) if splice else None
        if self.table is not None:
            self.words = self.table.words
            return
        self.words = memoryview(bytearray(count * _WORD))
        self._words = list(_slices(self.words, count, _WORD, _WORD))
        self._mixed: list[memoryview] = [memoryview(b"")] * (2 * count)

    def records(self, first: int, count: int) -> list[memoryview] | list[Spliced]:
        """The word and the page of pages ``first``, ``first + 1``, ... (``count`` of them)."""
        if self.table is not None:
            return [self.table.records(first, count)]
        mixed = self._mixed[: 2 * count]
        mixed[0::2] = self._words[first : first + count]
        mixed[1::2] = self.pages[first : first + count]
        return mixed


class RamSectionWriter:
    """Encodes pages into PART sections of the saved RAM section id."""

    def __init__(
        self,
        sink: StreamSink,
        section_id: int,
        page_size: int,
        stats: RevertStats,
        part_bytes: int = 1 << 20,
    ) -> None:
        self.sink = sink
        self.section_id = section_id
        self.page_size = page_size
        self.stats = stats
        self.part_bytes = part_bytes
        self._encoder = RamEncoder(page_size)
        self._zero_page = bytes(page_size)
        self._parts: list[bytes | bytearray | memoryview | Spliced] = []
        self._slot_views: dict[tuple[int, int], _SlotViews] = {}
        self._pending = 0
        self._section_size = 0
        self._open = False

    def _begin(self) -> None:
        if not self._open:
            self._parts.append(_SECTION_HEAD.pack(SectionType.SECTION_PART, self.section_id))
            self._open = True
            self._section_size = 0

    def _added(self, size: int) -> None:
        self._pending += size
        self._section_size += size
        if self._section_size >= self.part_bytes:
            self.close_section()
        elif self._pending >= self.part_bytes:
            self.push()

    def zeros(self, block: str, offset: int, count: int) -> None:
        """ZERO records for ``count`` target pages from ``offset``, none of them read."""
        self._begin()
        self.stats.zero_pages += count
        self._added(self._zero_records(block, offset, count))

    def pages(self, block: str, offset: int, data: bytes | bytearray | Span) -> None:
        """PAGE (or ZERO, for pages that are all zeros) records for ``data``.

        The records refer to ``data`` until they are written (:meth:`push`).
        """
        span = data if isinstance(data, Span) else Span.whole(data)
        ps = self.page_size
        if span.length % ps:
            raise ValueError(f"page data of {span.length} bytes is not a multiple of {ps}")
        self._begin()
        slot = self._slot(span) if isinstance(span.buffer, mmap.mmap) else None
        if slot is not None:  # an mmap has no startswith; its find is a naive loop in 3.11
            zero: Iterator[bool] = map(self._zero_page.startswith, slot.pages[: span.length // ps])
        else:
            zero = _zero_pages(span, ps, self._zero_page)
        view = span.view()
        index = size = 0
        for is_zero, group in groupby(zero):
            count = len(list(group))
            at = offset + index * ps
            if is_zero:
                self.stats.zero_pages += count
                size += self._zero_records(block, at, count)
            else:
                self.stats.data_pages += count
                if slot is not None:
                    size += self._slot_records(block, at, slot, index, count)
                else:
                    size += self._data_records(block, at, view[index * ps : (index + count) * ps])
            index += count
        self._added(size)

    def _slot(self, span: Span) -> _SlotViews:
        """The views of the shared-memory slot ``span`` was read into.

        Slots are reused for every read, so their page views and a buffer of record words
        (with its views) are made once per slot; the words are valid as long as the pages
        are, until the next read.  No Python object is made per page.
        """
        key = (id(span.buffer), span.start)
        views = self._slot_views.get(key)
        splice = self.sink.splicing
        if (
            views is None
            or len(views.pages) < span.length // self.page_size
            or (views.table is not None) != splice
        ):
            views = _SlotViews(span, self.page_size, splice)
            self._slot_views[key] = views
        return views

    def _slot_records(
        self, block: str, offset: int, views: _SlotViews, index: int, count: int
    ) -> int:
        """``_data_records`` for pages ``index`` onwards of a shared-memory slot."""
        ps = self.page_size
        first = self._encoder.page(block, offset, views.pages[index])
        rest = count - 1
        struct.pack_into(  # each page's word has its own place: runs of one span coexist
            f">{rest}Q",
            views.words,
            (index + 1) * _WORD,
            *range((offset + ps) | _CONTINUE_PAGE, offset + count * ps, ps),
        )
        self._parts.append(first)
        self._parts += views.records(index + 1, rest)
        return len(first) + rest * (_WORD + ps)

    def _zero_records(self, block: str, offset: int, count: int) -> int:
        """Queue ZERO records for ``count`` pages; returns their size."""
        first = self._encoder.zero(block, offset)
        rest = count - 1
        records = bytearray(rest * _ZERO_RECORD)
        words = _words((offset + self.page_size) | _CONTINUE_ZERO, rest, self.page_size)
        for byte in range(_WORD):
            records[byte::_ZERO_RECORD] = words[byte::_WORD]
        self._parts += (first, records)
        return len(first) + len(records)

    def _data_records(self, block: str, offset: int, view: memoryview) -> int:
        """Queue PAGE records for the pages of ``view`` (none of them zero); returns their size."""
        ps = self.page_size
        first = self._encoder.page(block, offset, view[:ps])
        rest = len(view) // ps - 1
        words = memoryview(_words((offset + ps) | _CONTINUE_PAGE, rest, ps))
        self._parts.append(first)
        self._parts.extend(
            chain.from_iterable(
                zip(
                    _slices(words, rest, _WORD, _WORD),
                    _slices(view[ps:], rest, ps, ps),
                    strict=True,
                )
            )
        )
        return len(first) + rest * (_WORD + ps)

    def push(self) -> None:
        """Write what is buffered, leaving the current section open."""
        if self._parts:
            self.sink.write(self._parts)
            self._parts = []
            self._pending = 0

    def close_section(self) -> None:
        """Close the open PART (EOS + footer) and write everything buffered."""
        if self._open:
            self._parts.append(self._encoder.eos())
            self._parts.append(encode_footer(self.section_id))
            self._open = False
        self.push()

    def end_section(self) -> list[bytes]:
        """The RAM END section (EOS only) that ends a postcopy stream, not yet written.

        Any open PART is closed and written first.
        """
        self.close_section()
        return [
            _SECTION_HEAD.pack(SectionType.SECTION_END, self.section_id),
            self._encoder.eos(),
            encode_footer(self.section_id),
        ]
