"""StreamReader.batches(): RAM pages in runs, everything else as records() gives it.

The expected pages come from the generator; the expected errors from records(), the
per-record path that test_stream_malformed checks on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st
from stream_strategies import chunkings, valid_streams

from qsnap.stream import RamEncoder, StreamError, StreamReader, encode, encode_footer
from qsnap.stream import records as r
from qsnap.stream.reader import Batch, RamPageRun, RamZeroRun

PAGE = 4096
SECTION = 3

Item = tuple[object, ...]


@dataclass(frozen=True)
class RunStream:
    data: bytes
    pages: list[Item]  # ("page", block, offset, bytes) / ("zero", block, offset)
    runs: list[Item]  # (kind, block, first offset, count): maximal runs
    fields: list[int]  # where each RAM record's header and each zero record's fill byte are


@st.composite
def run_streams(draw: st.DrawFn, max_pages: int = 48) -> RunStream:
    """A RAM stream made of runs of consecutive pages, cut into PART sections."""
    names = draw(st.lists(st.sampled_from(["pc.ram", "vga", "rom"]), min_size=1, unique=True))
    sizes = {n: draw(st.integers(1, max_pages)) for n in names}
    out = [
        encode(r.StreamHeader()),
        encode(r.Configuration("pc-i440fx-10.0")),
        encode(r.SectionStart(SECTION, "ram", 0, 4)),
        encode(r.RamMemSize(tuple(r.RamBlockInfo(n, sizes[n] * PAGE) for n in names))),
        encode(r.RamEos()),
        encode_footer(SECTION),
    ]
    ram = RamEncoder(PAGE)
    pages: list[Item] = []
    runs: list[Item] = []
    fields: list[int] = []
    serial = 0
    for _ in range(draw(st.integers(0, 6))):
        out.append(encode(r.SectionPart(SECTION)))
        size = sum(map(len, out))
        extendable = False  # a run never crosses a section boundary
        for _ in range(draw(st.integers(1, 4))):
            name = draw(st.sampled_from(names))
            first = draw(st.integers(0, sizes[name] - 1))
            count = draw(st.integers(1, sizes[name] - first))
            kind = draw(st.sampled_from(["page", "zero"]))
            for index in range(first, first + count):
                offset = index * PAGE
                at = size
                if kind == "page":
                    serial += 1
                    data = serial.to_bytes(4, "big") * (PAGE // 4)
                    out.append(ram.page(name, offset, data))
                    pages.append(("page", name, offset, data))
                else:
                    out.append(ram.zero(name, offset))
                    pages.append(("zero", name, offset))
                    fields.append(at + len(out[-1]) - 1)
                fields.extend(range(at, at + 8))
                size += len(out[-1])
                prev = runs[-1] if runs else None
                if (
                    extendable
                    and prev is not None
                    and prev[:2] == (kind, name)
                    and offset == prev[2] + prev[3] * PAGE  # type: ignore[operator]
                ):
                    runs[-1] = (kind, name, prev[2], prev[3] + 1)  # type: ignore[operator]
                else:
                    runs.append((kind, name, offset, 1))
                extendable = True
        out += [encode(r.RamEos()), encode_footer(SECTION)]
    out.append(encode(r.Eof()))
    return RunStream(b"".join(out), pages, runs, fields)


def expand(items: list[Batch], page_size: int = PAGE) -> list[Item]:
    """Runs and records alike as one item per page (others as records)."""
    out: list[Item] = []
    for item in items:
        if isinstance(item, RamPageRun):
            out += [
                ("page", item.block, item.offset + i * page_size, bytes(p))
                for i, p in enumerate(item.pages)
            ]
        elif isinstance(item, RamZeroRun):
            out += [("zero", item.block, item.offset + i * page_size) for i in range(item.count)]
        elif isinstance(item, r.RamPage):
            out.append(("page", item.block, item.offset, item.data))
        elif isinstance(item, r.RamZero):
            out.append(("zero", item.block, item.offset))
        else:
            out.append((item,))
    return out


def read(data: bytes, cuts: list[int], batched: bool, **kw: object) -> tuple[list[Batch], str]:
    """Everything the reader gives, and the error text ("" when none)."""
    reader = StreamReader(**kw)  # type: ignore[arg-type]
    items: list[Batch] = []
    try:
        for lo, hi in pairwise([0, *cuts, len(data)]):
            reader.feed(data[lo:hi])
            items.extend(reader.batches() if batched else reader.records())
        reader.close()
        items.extend(reader.records())
    except StreamError as exc:
        return items, str(exc)
    return items, ""


def page_size_of(items: list[Batch]) -> int:
    """The stream's page size, from its configuration record (what the reader uses)."""
    for item in items:
        if isinstance(item, r.Configuration):
            for sub in item.subsections:
                if isinstance(sub, r.TargetPageBits):
                    return 1 << sub.bits
    return PAGE


def pages_of(items: list[Item]) -> list[Item]:
    return [i for i in items if i[0] in ("page", "zero")]


@given(run_streams(), st.data())
def test_runs_carry_every_page_in_order(stream: RunStream, data: st.DataObject) -> None:
    items, error = read(stream.data, data.draw(chunkings(len(stream.data))), batched=True)
    assert error == ""
    assert pages_of(expand(items)) == stream.pages


@given(run_streams())
def test_input_fed_at_once_gives_maximal_runs(stream: RunStream) -> None:
    items, _ = read(stream.data, [], batched=True)
    runs = [
        ("page", i.block, i.offset, len(i.pages))
        if isinstance(i, RamPageRun)
        else ("zero", i.block, i.offset, i.count)
        for i in items
        if isinstance(i, RamPageRun | RamZeroRun)
    ]
    assert runs == stream.runs


@given(run_streams())
def test_pages_are_read_only_views(stream: RunStream) -> None:
    items, _ = read(stream.data, [], batched=True)
    views = [p for i in items if isinstance(i, RamPageRun) for p in i.pages]
    assert all(type(v) is memoryview and v.readonly and v.nbytes == PAGE for v in views)


@given(st.data())
def test_other_records_as_records_gives_them(data: st.DataObject) -> None:
    stream = data.draw(valid_streams())
    cuts = data.draw(chunkings(len(stream.data)))
    batched, error = read(stream.data, cuts, batched=True, options=stream.options)
    plain, plain_error = read(stream.data, cuts, batched=False, options=stream.options)
    assert (error, plain_error) == ("", "")
    page_size = page_size_of(plain)
    assert expand(batched, page_size) == expand(plain, page_size)


corruptions = st.sampled_from(["flip", "truncate"])


@settings(max_examples=300)
@given(st.one_of(run_streams(), valid_streams()), corruptions, st.data())
def test_corrupt_input_fails_like_records(stream: object, kind: str, data: st.DataObject) -> None:
    raw: bytes = stream.data  # type: ignore[attr-defined]
    kw = {"options": stream.options} if hasattr(stream, "options") else {}
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        bad = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    else:
        bad = raw[:at]
    cuts = data.draw(chunkings(len(bad)))
    batched, error = read(bad, cuts, batched=True, **kw)
    plain, plain_error = read(bad, cuts, batched=False, **kw)
    assert error == plain_error
    page_size = page_size_of(plain)
    assert expand(batched, page_size) == expand(plain, page_size)


# Runs of hundreds of records: the reader checks their headers in bulk (up to 256 at a
# time), so a bad header or fill byte deep inside a run must still be found where
# records() finds it, and the pages before it still be given.
long_run_streams = run_streams(max_pages=1200)


@settings(max_examples=40, deadline=None)
@given(long_run_streams, st.data())
def test_long_runs_carry_every_page_in_order(stream: RunStream, data: st.DataObject) -> None:
    items, error = read(stream.data, data.draw(chunkings(len(stream.data))), batched=True)
    assert error == ""
    assert pages_of(expand(items)) == stream.pages


@settings(max_examples=150, deadline=None)
@given(long_run_streams, corruptions, st.data())
def test_corruption_inside_long_runs_fails_like_records(
    stream: RunStream, kind: str, data: st.DataObject
) -> None:
    raw = stream.data
    at = data.draw(st.sampled_from(stream.fields or [len(raw) - 1]))
    if kind == "flip":
        bad = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    else:
        bad = raw[:at]
    cuts = data.draw(chunkings(len(bad)))
    batched, error = read(bad, cuts, batched=True)
    plain, plain_error = read(bad, cuts, batched=False)
    assert error == plain_error
    assert expand(batched) == expand(plain)
