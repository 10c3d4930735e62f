"""PageScheduler: every host page exactly once, requests first, locality after requests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.revert.errors import RevertError
from qsnap.revert.scheduler import BlockGeometry, PageScheduler, Run

PAGE = 4096


def make(pages: list[int], zero: list[list[tuple[int, int]]] | None = None) -> PageScheduler:
    blocks = [BlockGeometry(f"b{i}", n * PAGE, PAGE) for i, n in enumerate(pages)]
    return PageScheduler(blocks, zero or [[] for _ in pages])


@given(
    pages=st.lists(st.integers(1, 50), min_size=1, max_size=4),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 49), st.integers(1, 20)),
        max_size=60,
    ),
)
def test_each_page_exactly_once(pages: list[int], ops: list[tuple[bool, int, int, int]]) -> None:
    """Background runs of ``size`` pages and requests of (block, first, count) mixed."""
    sched = make(pages)
    sent: list[tuple[int, int]] = []

    def send(run: Run) -> None:
        sched.mark_sent(run)
        sent.extend((run.block, run.first + i) for i in range(run.count))

    for background, b, first, count in ops:
        if background:
            run = sched.next_run(count * PAGE)
            if run is not None:
                assert run.count <= count
                send(run)
        else:
            block = b % len(pages)
            first = min(first, pages[block] - 1)
            count = min(count, pages[block] - first)
            for run in sched.request(f"b{block}", first * PAGE, count * PAGE):
                send(run)
            nxt = sched.next_run(PAGE)
            if (
                nxt is not None
                and first + count < pages[block]
                and not sched.is_sent(block, first + count)
            ):
                assert (nxt.block, nxt.first) == (block, first + count), "locality"
            if nxt is not None:
                send(nxt)
    while (run := sched.next_run(7 * PAGE)) is not None:
        send(run)
    assert sorted(sent) == [(b, p) for b, n in enumerate(pages) for p in range(n)]
    assert sched.remaining == 0


def test_runs_split_at_zero_extents_and_host_pages() -> None:
    # zero extent covers pages 2..4 fully and page 5 only partly: 5 stays data
    sched = make([8], [[(2 * PAGE, 3 * PAGE + 100)]])
    runs = []
    while (run := sched.next_run(100 * PAGE)) is not None:
        sched.mark_sent(run)
        runs.append(run)
    assert runs == [Run(0, 0, 2, False), Run(0, 2, 3, True), Run(0, 5, 3, False)]
    assert sched.data_pages == 5


def test_request_for_sent_pages_is_empty_and_double_send_is_caught() -> None:
    sched = make([4])
    run = sched.next_run(2 * PAGE)
    assert run == Run(0, 0, 2, False)
    sched.mark_sent(run)
    assert sched.request("b0", PAGE, PAGE) == []
    with pytest.raises(AssertionError):
        sched.mark_sent(Run(0, 1, 1, False))


def test_request_widened_to_host_pages() -> None:
    sched = PageScheduler([BlockGeometry("huge", 8 * 65536, 65536)], [[]])
    assert sched.request("huge", 65536 + 4096, 4096) == [Run(0, 1, 1, False)]


def test_bad_requests_name_the_block() -> None:
    sched = make([4])
    with pytest.raises(RevertError, match="'nope', which is not in the snapshot"):
        sched.request("nope", 0, PAGE)
    with pytest.raises(RevertError, match=r"offset 0x4000 of RAM block 'b0'"):
        sched.request("b0", 4 * PAGE, PAGE)
