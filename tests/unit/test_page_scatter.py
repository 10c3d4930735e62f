"""Data pages read straight into a slot (qsnap.page_scatter) and the reader's hand-over.

The scatter list is driven the way ``readv`` fills it, in arbitrary pieces; the slot's
pages and the bytes handed back must be the stream's own.  The reader half: a stream
read with pages taken out of it wherever :meth:`StreamReader.page_ahead` allows gives
the same pages, records and errors as the plain reader.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from itertools import chain, repeat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_strategies import chunkings, valid_streams
from test_stream_batches import expand, page_size_of, pages_of, read, run_streams

from qsnap.page_scatter import HEADER, PageScatter
from qsnap.stream import RamEncoder, StreamError, StreamReader, encode, encode_footer
from qsnap.stream import records as r
from qsnap.stream.constants import RamFlag
from qsnap.stream.reader import Batch, RamPageRun

PAGE = 4096
STEP = HEADER + PAGE
CONTINUE_PAGE = int(RamFlag.PAGE | RamFlag.CONTINUE)


def header(offset: int, flags: int = CONTINUE_PAGE) -> bytes:
    return struct.pack(">Q", offset | flags)


def fill_like_readv(fill: PageScatter, data: bytes, pieces: list[int]) -> None:
    """Pour ``data`` into ``fill`` as readv would, a piece (bounded by ``asked``) at a
    time, until the fill closes or the data runs out (pieces of a page after ``pieces``).
    """
    pos = 0
    for want in chain(pieces, repeat(PAGE)):
        if not fill.open or pos >= len(data):
            return
        vectors = fill.vectors(want)
        n = min(want, fill.asked, len(data) - pos)
        left = n
        for vec in vectors:
            take = min(len(vec), left)
            vec[:take] = data[pos + n - left : pos + n - left + take]
            left -= take
            if not left:
                break
        fill.received(n)
        pos += n


BREAKERS: list[Callable[[int], bytes]] = [
    lambda after: b"",
    lambda after: header(after, int(RamFlag.ZERO | RamFlag.CONTINUE)) + b"\0",
    lambda after: header(after + PAGE) + b"\xee" * PAGE,  # skips a page
    lambda after: header(after, int(RamFlag.PAGE)) + b"\x06pc.ram" + b"\xdd" * PAGE,
    lambda after: header(0, int(RamFlag.EOS)) + b"\x04\x00\x00\x00\x03",
]


def page_run(first: int, count: int, breaker: int, tail: bytes) -> tuple[list[bytes], bytes]:
    """``count`` data pages from ``first``, then what breaks the run (or nothing)."""
    pages = [bytes([i + 1]) * PAGE for i in range(count)]
    after = first + count * PAGE
    data = b"".join(header(first + i * PAGE) + p for i, p in enumerate(pages))
    return pages, data + BREAKERS[breaker](after) + tail


@given(
    st.integers(0, 64),
    st.integers(0, 10),
    st.integers(0, len(BREAKERS) - 1),
    st.binary(max_size=64),
    st.integers(1, 8),
    st.integers(HEADER, STEP - 1),
    st.data(),
)
@settings(max_examples=300, deadline=None)
def test_slot_holds_the_stream_pages_and_rest_is_what_follows(
    first_page: int,
    count: int,
    breaker: int,
    tail: bytes,
    capacity: int,
    carried: int,
    data: st.DataObject,
) -> None:
    first = first_page * PAGE
    pages, stream = page_run(first, count, breaker, tail)
    slot = memoryview(bytearray(capacity * PAGE))
    fill = PageScatter(slot, PAGE)
    limit = data.draw(st.integers(1, capacity), label="pages")
    fill.start(first | CONTINUE_PAGE, limit)
    carried = min(carried, len(stream))
    fill.place(stream[:carried])
    pieces = data.draw(st.lists(st.integers(1, 3 * STEP), max_size=40), label="pieces")
    fill_like_readv(fill, stream[carried:], pieces)

    assert fill.placed <= limit * STEP
    placed = stream[: fill.placed]
    expect_good = min(len(pages), limit, fill.placed // STEP)
    assert fill.good == expect_good
    assert bytes(slot[: fill.good * PAGE]) == b"".join(pages[: fill.good])
    assert [bytes(p) for p in fill.good_pages()] == pages[: fill.good]
    assert fill.rest() == placed[fill.good * STEP :]
    broke = len(pages) < limit and fill.placed >= len(pages) * STEP + HEADER
    broke = broke and stream[len(pages) * STEP : len(pages) * STEP + HEADER] != header(
        first + len(pages) * PAGE
    )
    assert fill.broken == broke
    if fill.open:  # it can only stop early when it has taken all the stream
        assert fill.placed == len(stream)


def test_a_fill_can_be_reused_for_the_next_slot() -> None:
    slot = memoryview(bytearray(2 * PAGE))
    fill = PageScatter(slot, PAGE)
    fill.start(header_word := (8 * PAGE) | CONTINUE_PAGE, 2)
    fill_like_readv(fill, header(8 * PAGE) + b"a" * PAGE + header(0x999000), [10**6])
    assert (fill.good, fill.broken) == (1, True)
    fill.start(header_word + 2 * PAGE, 2)
    assert (fill.good, fill.broken, fill.placed, fill.open) == (0, False, 0, True)
    fill_like_readv(
        fill, header(10 * PAGE) + b"b" * PAGE + header(11 * PAGE) + b"c" * PAGE, [5, 10**6]
    )
    assert (fill.good, fill.open, fill.rest()) == (2, False, b"")
    assert bytes(slot) == b"b" * PAGE + b"c" * PAGE


def read_taking_pages(
    stream: bytes, cuts: list[int], pieces: list[int], capacity: int
) -> tuple[list[Batch], str]:
    """What ``qsnap save`` sees: the reader's batches, and runs taken past it in slots.

    The input is cut at ``cuts``; whenever the reader says a data page is being
    received, the following bytes go through a scatter list instead (in ``pieces``),
    and what did not fit the prediction is fed back.
    """
    reader = StreamReader()
    items: list[Batch] = []
    fills: dict[int, tuple[memoryview, PageScatter]] = {}  # by page size (the stream's)
    pos = 0
    bounds = [*cuts, len(stream)]
    try:
        while pos < len(stream):
            ahead = reader.page_ahead()
            if ahead is not None:
                size = reader.page_size
                if size not in fills:
                    slot = memoryview(bytearray(capacity * size))
                    fills[size] = slot, PageScatter(slot, size)
                slot, fill = fills[size]
                fill.start(ahead.word, min(capacity, ahead.room))
                fill.place(ahead.received)
                fill_like_readv(fill, stream[pos:], pieces or [size + HEADER])
                pos += fill.placed - len(ahead.received)
                if fill.good:
                    pages = [
                        memoryview(bytes(slot[i * size : (i + 1) * size])) for i in range(fill.good)
                    ]
                    items.append(RamPageRun(ahead.block, ahead.offset, tuple(pages)))
                reader.skip_pages(fill.good)
                reader.feed(fill.rest())
            else:
                end = next(b for b in bounds if b > pos)
                reader.feed(stream[pos:end])
                pos = end
            items.extend(reader.batches())
        reader.close()
        items.extend(reader.records())
    except StreamError as exc:
        return items, str(exc)
    return items, ""


@given(run_streams(), st.data())
@settings(max_examples=150, deadline=None)
def test_pages_taken_past_the_reader_change_nothing(stream: object, data: st.DataObject) -> None:
    raw: bytes = stream.data  # type: ignore[attr-defined]
    cuts = data.draw(chunkings(len(raw)), label="cuts")
    pieces = data.draw(st.lists(st.integers(1, 3 * STEP), max_size=6), label="pieces")
    capacity = data.draw(st.integers(1, 6), label="capacity")
    plain, plain_error = read(raw, [], batched=True)
    taken, error = read_taking_pages(raw, cuts, pieces, capacity)
    assert error == plain_error == ""
    assert pages_of(expand(taken)) == pages_of(expand(plain))
    others = [i for i in expand(taken) if i[0] not in ("page", "zero")]
    assert others == [i for i in expand(plain) if i[0] not in ("page", "zero")]


@given(st.one_of(run_streams(), valid_streams()), st.data())
@settings(max_examples=300, deadline=None)
def test_errors_are_the_same_at_the_same_byte(stream: object, data: st.DataObject) -> None:
    raw = bytearray(stream.data)  # type: ignore[attr-defined]
    if raw:
        at = data.draw(st.integers(0, len(raw) - 1), label="corrupt at")
        raw[at] ^= data.draw(st.integers(1, 255), label="xor")
    raw = raw[: data.draw(st.integers(0, len(raw)), label="truncate at")]
    cuts = data.draw(chunkings(len(raw)), label="cuts")
    pieces = data.draw(st.lists(st.integers(1, 3 * STEP), max_size=6), label="pieces")
    plain, plain_error = read(bytes(raw), cuts, batched=True)
    taken, error = read_taking_pages(bytes(raw), cuts, pieces, 3)
    assert error == plain_error
    size = page_size_of(plain)
    assert pages_of(expand(taken, size)) == pages_of(expand(plain, size))


def test_page_ahead_needs_a_data_page_of_the_current_block() -> None:
    reader = StreamReader()
    assert reader.page_ahead() is None
    with pytest.raises(ValueError, match="without a data page"):
        reader.skip_pages(0)


def test_no_page_ahead_for_a_page_past_the_end_of_its_block() -> None:
    """A block whose length is not whole pages: its last, partial page is left to the
    reader's and the writer's checks (nothing to read in place)."""
    ram = RamEncoder(PAGE)
    stream = b"".join(
        [
            encode(r.StreamHeader()),
            encode(r.Configuration("pc-i440fx-10.0")),
            encode(r.SectionStart(3, "ram", 0, 4)),
            encode(
                r.RamMemSize(  # the total must be whole pages: it shares its word with flags
                    (r.RamBlockInfo("pc.ram", PAGE + PAGE // 2), r.RamBlockInfo("vga", PAGE // 2))
                )
            ),
            encode(r.RamEos()),
            encode_footer(3),
            encode(r.SectionPart(3)),
            ram.page("pc.ram", 0, b"\1" * PAGE),
        ]
    )
    inside = ram.page("pc.ram", 0, b"\2" * PAGE)  # CONTINUE, inside the block
    past = ram.page("pc.ram", PAGE, b"\3" * PAGE)  # CONTINUE, past its end
    for follower, expected in ((inside, 1), (past, None)):
        reader = StreamReader()
        reader.feed(stream + follower[:100])
        list(reader.batches())
        ahead = reader.page_ahead()
        assert (ahead.room if ahead is not None else None) == expected
