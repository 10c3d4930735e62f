"""RAM records of a generated stream, grouped into PART sections of bounded size.

Both revert modes send pages the same way: ZERO records for pages known or found to be
zero (never a zero page as PAGE, unlike the seed), PAGE records otherwise, CONTINUE
chosen by ``RamEncoder``, and each PART closed by EOS and its footer once it holds
about ``part_bytes``.  Records are buffered and joined into one write of about
``part_bytes`` (one memcpy in C is cheaper than Python bookkeeping per record).
"""

from __future__ import annotations

import struct

from qsnap.revert.sink import StreamSink
from qsnap.revert.stats import RevertStats
from qsnap.stream.constants import SectionType
from qsnap.stream.writer import RamEncoder, encode_footer

_SECTION_HEAD = struct.Struct(">BI")


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
        self._parts: list[bytes] = []
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
        zero = self._encoder.zero
        ps = self.page_size
        records = [zero(block, offset + i * ps) for i in range(count)]
        self._parts.extend(records)
        self.stats.zero_pages += count
        self._added(sum(map(len, records)))

    def pages(self, block: str, offset: int, data: bytes | bytearray) -> None:
        """PAGE (or ZERO, for pages that are all zeros) records for ``data``."""
        self._begin()
        ps = self.page_size
        page, zero, zero_page = self._encoder.page, self._encoder.zero, self._zero_page
        records = []
        zeros = 0
        is_zero = data.startswith  # compares in place, without slicing a copy
        view = memoryview(data)
        for pos in range(0, len(data), ps):
            if is_zero(zero_page, pos):
                records.append(zero(block, offset + pos))
                zeros += 1
            else:
                records.append(page(block, offset + pos, view[pos : pos + ps]))
        self._parts.extend(records)
        self.stats.zero_pages += zeros
        self.stats.data_pages += len(records) - zeros
        self._added(sum(map(len, records)))

    def push(self) -> None:
        """Write what is buffered, leaving the current section open."""
        if self._parts:
            self.sink.write([b"".join(self._parts)])
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
