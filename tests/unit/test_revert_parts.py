"""The revert's small parts: percentiles, the sink, the return-path thread, arguments."""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.revert.command import add_arguments
from qsnap.revert.errors import RevertError
from qsnap.revert.return_path import Outcome, ReturnPath
from qsnap.revert.sink import StreamSink
from qsnap.revert.stats import percentile
from qsnap.stream import encode_message
from qsnap.stream.return_path import Pong, ReqPages, ReqPagesId, Shut


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=200), st.integers(1, 100))
def test_percentile_is_nearest_rank(values: list[int], pct: int) -> None:
    ordered = sorted(values)
    got = percentile(ordered, pct)
    at_most = sum(1 for v in ordered if v <= got)
    below = sum(1 for v in ordered if v < got)
    assert got in ordered
    assert at_most * 100 >= pct * len(ordered)  # at least pct % are <= it
    assert below * 100 < pct * len(ordered)  # and it is the smallest such value


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile([], 50) == 0


@given(st.lists(st.binary(max_size=70000), max_size=12))
def test_sink_writes_every_byte_in_order_through_a_small_pipe(parts: list[bytes]) -> None:
    rfd, wfd = os.pipe()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(rfd, 4096), b"")))
    reader.start()
    sink = StreamSink(wfd, stall_timeout=10)
    try:
        sink.write(parts)
    finally:
        sink.close()
        os.close(wfd)
        reader.join(10)
        os.close(rfd)
    assert b"".join(got) == b"".join(parts)
    assert sink.bytes_written == sum(map(len, parts))


def test_sink_gives_up_on_a_reader_that_never_reads() -> None:
    rfd, wfd = os.pipe()
    sink = StreamSink(wfd, stall_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RevertError, match=r"read nothing for 0\.3 s"):
        sink.write([bytes(1 << 20)])
    assert time.monotonic() - start < 5
    sink.close()
    os.close(wfd)
    os.close(rfd)


def test_sink_reports_a_closed_reader() -> None:
    rfd, wfd = os.pipe()
    os.close(rfd)
    sink = StreamSink(wfd)
    with pytest.raises(RevertError, match="broken pipe"):
        sink.write([b"x"])
    sink.close()
    os.close(wfd)


def test_sink_stops_waiting_when_the_destination_gave_up() -> None:
    rfd, wfd = os.pipe()
    sink = StreamSink(wfd, stall_timeout=30, abort_check=lambda: "QEMU said no")
    with pytest.raises(RevertError, match="QEMU said no"):
        sink.write([bytes(1 << 20)])
    sink.close()
    os.close(wfd)
    os.close(rfd)


def run_return_path(data: bytes, close: bool = True) -> ReturnPath:
    rfd, wfd = os.pipe()
    rp = ReturnPath(rfd)
    rp.start()
    os.write(wfd, data)
    if close:
        os.close(wfd)
    rp.wait(5)
    if not close:
        os.close(wfd)
    rp.join(5)
    os.close(rfd)
    return rp


def test_return_path_requests_resolve_the_block_and_shut_ends() -> None:
    rp = run_return_path(
        encode_message(Pong(1))
        + encode_message(ReqPagesId(0x1000, 4096, "pc.ram"))
        + encode_message(ReqPages(0x2000, 4096))
        + encode_message(Shut(0)),
        close=False,
    )
    assert rp.outcome is Outcome.SHUT_OK
    assert rp.pongs == [1]
    got = [rp.requests.get_nowait() for _ in range(rp.requests.qsize())]
    assert [(r.block, r.offset, r.length) for r in got] == [
        ("pc.ram", 0x1000, 4096),
        ("pc.ram", 0x2000, 4096),
    ]
    assert all(r.received_ns > 0 for r in got)


@pytest.mark.parametrize(
    ("data", "outcome", "detail"),
    [
        (encode_message(Shut(1)), Outcome.SHUT_ERROR, ""),
        (b"", Outcome.EOF, ""),
        (encode_message(Shut(0))[:3], Outcome.CORRUPT, "truncated"),
        (b"\x00\x63\x00\x00", Outcome.CORRUPT, "unknown return-path message"),
        (encode_message(ReqPages(0, 4096)), Outcome.CORRUPT, "REQ_PAGES before"),
    ],
)
def test_return_path_outcomes(data: bytes, outcome: Outcome, detail: str) -> None:
    rp = run_return_path(data)
    assert rp.outcome is outcome
    assert detail in rp.describe()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "pct", "image"),
    [
        (("img",), None, "img"),
        (("--postcopy", "img"), 0, "img"),
        (("img", "--postcopy"), 0, "img"),
        (("--postcopy=40", "img"), 40, "img"),
        (("--postcopy", "100", "a b.qcow2"), 100, "a b.qcow2"),
    ],
)
def test_postcopy_option_and_image(argv: tuple[str, ...], pct: int | None, image: str) -> None:
    args = parse(*argv)
    assert args.postcopy == pct
    assert (args.image or args.image_after_postcopy) == image


def test_postcopy_percentage_range() -> None:
    with pytest.raises(SystemExit):
        parse("--postcopy=101", "img")


def test_grow_pipe_only_for_pipes(tmp_path: Path) -> None:
    rfd, wfd = os.pipe()
    try:
        assert StreamSink(wfd).grow_pipe(1 << 20) == 1 << 20
    finally:
        os.close(rfd)
        os.close(wfd)
    with (tmp_path / "f").open("wb") as f:
        assert StreamSink(f.fileno()).grow_pipe(1 << 20) == 0
