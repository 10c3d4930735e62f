"""Postcopy revert against a simulated destination: stream on one pipe, return path on another."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from revert_memory import MemorySource

from qsnap.revert.errors import RevertError
from qsnap.revert.postcopy import PostcopySender
from qsnap.revert.return_path import ReturnPath
from qsnap.revert.session import AbortCheck, RevertOptions
from qsnap.revert.sink import StreamSink
from qsnap.revert.source import SourceBlock
from qsnap.revert.stats import RevertStats
from qsnap.stream import StreamReader, encode_message
from qsnap.stream import records as r
from qsnap.stream.return_path import ReqPages, ReqPagesId, Shut

PAGE = 4096


def image(pages: int = 300) -> MemorySource:
    """pc.ram with data and a zero extent, plus a small ROM-like block."""
    ram = bytearray()
    for i in range(pages):
        ram += bytes(PAGE) if 100 <= i < 150 else bytes([i % 250 + 1]) * PAGE
    rom = b"\xaa" * (4 * PAGE)
    return MemorySource(
        [("pc.ram", bytes(ram)), ("pc.rom", rom)], {"pc.ram": [(100 * PAGE, 50 * PAGE)]}
    )


@dataclass
class Destination:
    """Reads the stream, answers EOF with SHUT(status); records what it saw."""

    records: list[r.Record] = field(default_factory=list)
    error: BaseException | None = None


def run_postcopy(
    source: MemorySource,
    options: RevertOptions,
    requests: list[bytes],
    shut_status: int | None = 0,
) -> tuple[RevertStats, Destination]:
    out_r, out_w = os.pipe()
    rp_r, rp_w = os.pipe()
    dest = Destination()

    def destination() -> None:
        reader = StreamReader()
        raw = 0  # device state bytes of a stream that ended as precopy
        try:
            while data := os.read(out_r, 1 << 16):
                reader.feed(data)
                for rec in reader.records():
                    dest.records.append(rec)
                    if isinstance(rec, r.DeviceStateChunk):
                        raw += len(rec.data)
                    ended = isinstance(rec, r.Eof) or raw == source.device_state_length
                    if ended and shut_status is not None:
                        os.write(rp_w, encode_message(Shut(shut_status)))
            reader.close()
        except BaseException as exc:  # reported by the test
            dest.error = exc

    thread = threading.Thread(target=destination)
    thread.start()
    rp = ReturnPath(rp_r)
    sink = StreamSink(out_w, stall_timeout=10, abort_check=AbortCheck(rp))
    options = replace(options, shut_timeout=5)
    try:
        sender = PostcopySender(source, sink, rp, options)
        for message in requests:
            os.write(rp_w, message)
        rp.start()
        deadline = time.monotonic() + 5
        while rp.requests.qsize() < len(requests) and time.monotonic() < deadline:
            time.sleep(0.001)
        stats = sender.run()
    finally:
        sink.close()
        os.close(out_w)
        thread.join(10)
        for fd in (out_r, rp_r, rp_w):
            os.close(fd)
    assert dest.error is None, dest.error
    return stats, dest


def pages_of(records: list[r.Record]) -> list[tuple[str, int, bytes]]:
    return [
        (rec.block, rec.offset, rec.data if isinstance(rec, r.RamPage) else bytes(PAGE))
        for rec in records
        if isinstance(rec, (r.RamPage, r.RamZero))
    ]


def test_stream_layout_requests_first_every_page_once() -> None:
    source = image()
    requests = [
        encode_message(ReqPagesId(250 * PAGE, PAGE, "pc.ram")),
        encode_message(ReqPages(120 * PAGE, PAGE)),
        encode_message(ReqPagesId(2 * PAGE, PAGE, "pc.rom")),
        encode_message(ReqPagesId(250 * PAGE, PAGE, "pc.ram")),
    ]
    stats, dest = run_postcopy(source, RevertOptions(postcopy_pct=0), requests)
    recs = dest.records
    kinds = [type(x).__name__ for x in recs if not isinstance(x, (r.RamPage, r.RamZero))]
    assert kinds[:6] == [
        "StreamHeader",
        "Configuration",
        "OpenReturnPath",
        "Ping",
        "PostcopyAdvise",
        "SectionStart",
    ]
    assert kinds[-4:] == ["SectionEnd", "RamEos", "SectionFooter", "Eof"]
    advise = next(x for x in recs if isinstance(x, r.PostcopyAdvise))
    assert (advise.ram_pagesize_summary, advise.target_page_size) == (PAGE, PAGE)
    pings = [x.value for x in recs if isinstance(x, r.Ping)]
    assert pings == [1, 2, 4]
    package = next(x for x in recs if isinstance(x, r.Packaged))
    assert package.payload == (
        bytes.fromhex("0800040000")
        + source.device[: source.device_sections_length]
        + bytes.fromhex("080002000400000003")
        + bytes.fromhex("0800050000")
    )
    after = recs[recs.index(package) :]
    assert [(b, o) for b, o, _ in pages_of(after)[:3]] == [
        ("pc.ram", 250 * PAGE),
        ("pc.ram", 120 * PAGE),
        ("pc.rom", 2 * PAGE),
    ]
    # background resumes right after the last request (locality), even an ignored one
    assert pages_of(after)[3][:2] == ("pc.ram", 251 * PAGE)
    sent = pages_of(recs)
    assert len(sent) == len({(b, o) for b, o, _ in sent}), "a page was sent twice"
    assert {(b, o): d for b, o, d in sent} == {
        (name, off): data[off : off + PAGE]
        for name, data in source.data.items()
        for off in range(0, len(data), PAGE)
    }
    assert source.read_zero_pages() == []
    assert (stats.requests, stats.ignored_requests, stats.request_pages) == (4, 1, 3)
    assert stats.request_pages + stats.background_pages == 304
    assert len(stats.latencies_ns) == 3 and min(stats.latencies_ns) > 0


@pytest.mark.parametrize("pct", [0, 50, 100])
def test_precopy_phase_sends_pct_of_data_pages_before_listen(pct: int) -> None:
    source = image()
    stats, dest = run_postcopy(source, RevertOptions(postcopy_pct=pct), [])
    if pct == 100:  # the ROM block at the end has data: every page goes before LISTEN
        assert not any(isinstance(x, (r.Packaged, r.PostcopyListen)) for x in dest.records)
        assert (
            b"".join(x.data for x in dest.records if isinstance(x, r.DeviceStateChunk))
            == source.device
        )
        assert stats.precopy_pages == 304
        return
    package = next(i for i, x in enumerate(dest.records) if isinstance(x, r.Packaged))
    discards = [x for x in dest.records[:package] if isinstance(x, r.PostcopyRamDiscard)]
    sent = {
        (x.block, x.offset) for x in dest.records[:package] if isinstance(x, (r.RamPage, r.RamZero))
    }
    discarded = {
        (x.block, start + pos)
        for x in discards
        for start, length in x.ranges
        for pos in range(0, length, PAGE)
    }
    assert not sent & discarded
    assert len(sent | discarded) == 304
    before = [x for x in dest.records[:package] if isinstance(x, r.RamPage)]
    data_pages = 250 + 4
    assert len(before) == -(-data_pages * pct // 100)
    assert stats.precopy_pages + stats.background_pages == 304
    assert all(len(x.ranges) <= 12 for x in discards)


def test_request_outside_the_snapshot_is_an_error_naming_it() -> None:
    with pytest.raises(RevertError, match=r"'pc\.ram'.*outside"):
        run_postcopy(
            image(),
            RevertOptions(postcopy_pct=0),
            [encode_message(ReqPagesId(300 * PAGE, PAGE, "pc.ram"))],
            shut_status=None,
        )


def test_shut_error_is_reported() -> None:
    with pytest.raises(RevertError, match="SHUT 1"):
        run_postcopy(image(), RevertOptions(postcopy_pct=0), [], shut_status=1)


def test_hugepage_blocks_refused_before_anything_is_sent() -> None:
    source = image()
    source.blocks = (SourceBlock("pc.ram", 2 << 20, 2 << 20),)
    out_r, out_w = os.pipe()
    try:
        with pytest.raises(
            RevertError, match=r"'pc\.ram' was saved with 2097152-byte pages.*hugepage"
        ):
            PostcopySender(source, StreamSink(out_w), ReturnPath(0), RevertOptions(postcopy_pct=0))
        os.close(out_w)
        assert os.read(out_r, 10) == b"", "nothing may be written"
    finally:
        os.close(out_r)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    zero_every=st.integers(2, 5),
    picks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 39)), max_size=15),
    pct=st.sampled_from([0, 30, 99]),
)
def test_requested_pages_first_and_every_page_once(
    sizes: list[int], zero_every: int, picks: list[tuple[int, int]], pct: int
) -> None:
    names = ["pc.ram", "vga.vram", "pc.rom"][: len(sizes)]
    blocks, zero = [], {}
    for b, (name, pages) in enumerate(zip(names, sizes, strict=True)):
        data = b"".join(
            bytes(PAGE) if i % zero_every == 0 else bytes([i + 1, b + 1]) * (PAGE // 2)
            for i in range(pages)
        )
        blocks.append((name, data))
        zero[name] = [(i * PAGE, PAGE) for i in range(0, pages, zero_every * 2)]
    source = MemorySource(blocks, zero)
    wanted = [(names[b % len(names)], p % sizes[b % len(names)]) for b, p in picks]
    requests = [encode_message(ReqPagesId(p * PAGE, PAGE, name)) for name, p in wanted]
    stats, dest = run_postcopy(source, RevertOptions(postcopy_pct=pct), requests)
    sent = pages_of(dest.records)
    assert sorted((b, o) for b, o, _ in sent) == sorted(
        (name, off) for name, data in source.data.items() for off in range(0, len(data), PAGE)
    )
    assert all(d == source.data[b][o : o + PAGE] for b, o, d in sent)
    packaged = [i for i, x in enumerate(dest.records) if isinstance(x, r.Packaged)]
    if not packaged:  # everything went before LISTEN
        return
    before = {(b, o) for b, o, _ in pages_of(dest.records[: packaged[0]])}
    expected: list[tuple[str, int]] = []
    for name, p in wanted:
        if (name, p * PAGE) not in before and (name, p * PAGE) not in expected:
            expected.append((name, p * PAGE))
    after = [(b, o) for b, o, _ in pages_of(dest.records[packaged[0] :])]
    assert after[: len(expected)] == expected
    assert stats.requests == len(wanted)
