"""An in-memory RevertSource for the revert unit tests (test code, not a product feature).

It builds the saved stream pieces with the codec, so that a generated stream can be parsed
back with StreamReader, and it records every read so that tests can prove zero extents
are never read.
"""

from __future__ import annotations

import collections
import json
import mmap
from collections.abc import Iterable, Iterator, Sequence

from qsnap.image.span import Span
from qsnap.revert.source import SourceBlock
from qsnap.stream import records as r
from qsnap.stream.wire import encode_footer
from qsnap.stream.writer import encode

RAM_SECTION_ID = 2
MACHINE = "pc-i440fx-10.0"


def device_state_bytes(section_id: int = 3, body: bytes = b"\x01\x02\x03\x04") -> tuple[bytes, int]:
    """A fake device FULL section + EOF + vmdesc, and the length of the sections part."""
    sections = encode(r.SectionFull(section_id, "timer", 0, 2)) + body + encode_footer(section_id)
    vmdesc = json.dumps({"page_size": 4096, "devices": []}).encode()
    return sections + encode(r.Eof()) + encode(r.VmDescription(vmdesc)), len(sections)


class MemorySource:
    """Blocks held as bytes; zero extents given explicitly (they must read as zeros)."""

    def __init__(
        self,
        blocks: Sequence[tuple[str, bytes]],
        zero_extents: dict[str, list[tuple[int, int]]] | None = None,
        page_size: int = 4096,
        chunk: int = 1000,
    ) -> None:
        self.data = dict(blocks)
        self.target_page_size = page_size
        self.blocks = tuple(SourceBlock(name, len(data)) for name, data in blocks)
        self._zero = zero_extents or {}
        for name, extents in self._zero.items():
            for offset, length in extents:
                assert self.data[name][offset : offset + length] == bytes(length)
        self.prologue = encode(r.StreamHeader()) + encode(r.Configuration(MACHINE))
        infos = tuple(r.RamBlockInfo(name, len(data)) for name, data in blocks)
        self.ram_section_id = RAM_SECTION_ID
        self.ram_start = (
            encode(r.SectionStart(RAM_SECTION_ID, "ram", 0, 4))
            + encode(r.RamMemSize(infos))
            + encode(r.RamEos())
            + encode_footer(RAM_SECTION_ID)
        )
        self.device, self.device_sections_length = device_state_bytes()
        self.device_state_length = len(self.device)
        self.chunk = chunk
        self.reads: list[tuple[str, int, int]] = []
        self.closed = False

    def zero_extents(self, block: str) -> Iterable[tuple[int, int]]:
        return list(self._zero.get(block, []))

    def read(self, block: str, offset: int, length: int) -> bytes:
        assert not self.closed, "read after close"
        assert offset >= 0 and offset + length <= len(self.data[block])
        self.reads.append((block, offset, length))
        return self.data[block][offset : offset + length]

    def read_many(self, requests: Iterable[tuple[str, int, int]], keep: int = 0) -> Iterator[Span]:
        """Spans of ``keep + 1`` reused mmaps, each scribbled over once ``keep + 1`` more
        spans were asked for, as the memory shared with the storage daemon is reused."""
        free = [mmap.mmap(-1, 1 << 20) for _ in range(keep + 1)]
        held: collections.deque[mmap.mmap] = collections.deque()
        for block, offset, length in requests:
            data = self.read(block, offset, length)
            if len(held) > keep:
                released = held.popleft()
                released[:] = b"\xa5" * len(released)
                free.append(released)
            slot = free.pop()
            if len(slot) < length:
                slot = mmap.mmap(-1, length)
            slot[:length] = data
            held.append(slot)
            yield Span(slot, 0, length)

    def device_state(self, sections_only: bool) -> Iterator[bytes]:
        assert not self.closed, "read after close"
        end = self.device_sections_length if sections_only else len(self.device)
        for pos in range(0, end, self.chunk):
            yield self.device[pos : min(end, pos + self.chunk)]

    def close(self) -> None:
        self.closed = True

    def read_zero_pages(self) -> list[tuple[str, int]]:
        """Pages inside a zero extent that were read (there must be none)."""
        bad = []
        for block, offset, length in self.reads:
            for zoff, zlen in self._zero.get(block, []):
                if offset < zoff + zlen and zoff < offset + length:
                    bad.append((block, max(offset, zoff)))
        return bad
