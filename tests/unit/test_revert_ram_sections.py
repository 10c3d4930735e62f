"""RamSectionWriter's batched records against one RamEncoder call per page."""

from __future__ import annotations

import mmap
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from qsnap.image.span import Span
from qsnap.revert.ram_sections import RamSectionWriter
from qsnap.revert.sink import StreamSink
from qsnap.revert.stats import RevertStats
from qsnap.stream.wire import RamEncoder

PS = 4096

# (block, first page, then per page: None = zeros(), b"" = zero page read, else data byte)
Call = tuple[str, int, list[int | None]]

calls = st.lists(
    st.tuples(
        st.sampled_from(["pc.ram", "vga.vram"]),
        st.integers(0, 64),
        st.one_of(
            st.lists(st.integers(0, 3), min_size=1, max_size=12),
            st.lists(st.none(), min_size=1, max_size=12),
        ),
    ),
    max_size=8,
)


def _page(value: int) -> bytes:
    """0 is an all-zero page; others differ only in their last byte (no early exit)."""
    return bytes(PS - 1) + bytes([value])


def _expected(script: list[Call]) -> bytes:
    encoder = RamEncoder(PS)
    out = bytearray()
    for block, first, pages in script:
        for i, value in enumerate(pages):
            offset = (first + i) * PS
            if value is None or value == 0:
                out += encoder.zero(block, offset)
            else:
                out += encoder.page(block, offset, _page(value))
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(calls, st.booleans())
def test_records_match_one_encoder_call_per_page(script: list[Call], shared: bool) -> None:
    """Pages from a bytes object, or from one reused shared-memory slot (overwritten by
    the next read once the records were written), give the same records."""
    slot = mmap.mmap(-1, 64 * PS)
    stats = RevertStats()
    with tempfile.TemporaryFile() as out:
        # part_bytes larger than anything written: no section boundary inside the records.
        writer = RamSectionWriter(StreamSink(out.fileno()), 7, PS, stats, part_bytes=1 << 30)
        for block, first, pages in script:
            if pages[0] is None:
                writer.zeros(block, first * PS, len(pages))
            else:
                data = b"".join(_page(v or 0) for v in pages)
                if shared:
                    slot[PS : PS + len(data)] = data
                    writer.pages(block, first * PS, Span(slot, PS, len(data)))
                    writer.push()
                    slot[:] = b"\xa5" * len(slot)
                else:
                    writer.pages(block, first * PS, data)
        writer.push()
        out.seek(0)
        written = out.read()
    body = _expected(script)
    if script:
        assert written[:5] == bytes([0x02, 0, 0, 0, 7])  # SECTION_PART, section id 7
        written = written[5:]
    assert written == body
    data_pages = sum(1 for _, _, pages in script for v in pages if v)
    assert stats.data_pages == data_pages
    assert stats.zero_pages == sum(len(p) for _, _, p in script) - data_pages


def test_sections_close_after_part_bytes_with_eos_and_footer() -> None:
    stats = RevertStats()
    with tempfile.TemporaryFile() as out:
        writer = RamSectionWriter(StreamSink(out.fileno()), 3, PS, stats, part_bytes=2 * PS)
        writer.pages("pc.ram", 0, _page(1) * 3)
        writer.zeros("pc.ram", 3 * PS, 2)
        writer.close_section()
        out.seek(0)
        written = out.read()
    part, eos, footer = bytes([2, 0, 0, 0, 3]), (0x10).to_bytes(8, "big"), b"\x7e\0\0\0\x03"
    encoder = RamEncoder(PS)
    pages = b"".join(encoder.page("pc.ram", i * PS, _page(1)) for i in range(3))
    zeros = encoder.zero("pc.ram", 3 * PS) + encoder.zero("pc.ram", 4 * PS)
    assert written == part + pages + eos + footer + part + zeros + eos + footer
