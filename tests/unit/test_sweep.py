"""check_sweep against an independent statement of the rule: v+1 for a prefix, v after."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qsnap.harness.sweep import PAGE_SIZE, check_sweep, first_bytes

BLOCK = "pc.ram"
START = 0x100000


def frozen_sweep(value: int, boundary: int, pages: int) -> list[int]:
    return [(value + 1) % 256] * boundary + [value] * (pages - boundary)


def is_frozen_sweep(values: list[int]) -> bool:
    """True when `values` is frozen_sweep(v, p, n) for some v and p."""
    if not values:
        return True
    value = values[-1]
    boundary = 0
    while boundary < len(values) and values[boundary] == (value + 1) % 256:
        boundary += 1
    return values == frozen_sweep(value, boundary, len(values))


def first_bad_index(values: list[int]) -> int | None:
    for end in range(1, len(values) + 1):
        if not is_frozen_sweep(values[:end]):
            return end - 1
    return None


sweeps = st.integers(1, 300).flatmap(
    lambda pages: st.tuples(st.integers(0, 255), st.integers(0, pages), st.just(pages))
)
"""(value, boundary, pages): pages [0, boundary) hold value + 1, the others value."""


@given(sweeps)
def test_frozen_sweeps_pass(sweep: tuple[int, int, int]) -> None:
    value, boundary, pages = sweep
    report = check_sweep(frozen_sweep(value, boundary, pages), block=BLOCK, start=START)
    assert report.ok
    assert report.violation is None
    assert report.pages == pages
    expected_edge = START + boundary * PAGE_SIZE if 0 < boundary < pages else None
    assert report.edge == expected_edge


@given(sweeps, st.data())
def test_single_page_change_is_caught_and_named(
    sweep: tuple[int, int, int], data: st.DataObject
) -> None:
    value, boundary, pages = sweep
    values = frozen_sweep(value, boundary, pages)
    index = data.draw(st.integers(0, pages - 1), label="page")
    new = data.draw(st.integers(0, 255).filter(lambda v: v != values[index]), label="value")
    values[index] = new

    report = check_sweep(values, block=BLOCK, start=START)

    bad = first_bad_index(values)
    if bad is None:
        assert report.ok, report.violation
        return
    assert not report.ok
    violation = report.violation
    assert violation is not None
    assert violation.block == BLOCK
    assert violation.offset == START + bad * PAGE_SIZE
    assert violation.found == values[bad]
    assert violation.previous == values[bad - 1]
    assert BLOCK in str(violation)
    assert f"{START + bad * PAGE_SIZE:#x}" in str(violation)


@given(st.integers(0, 255), st.integers(3, 200), st.data())
def test_change_inside_a_run_is_caught_at_that_page(
    value: int, pages: int, data: st.DataObject
) -> None:
    """A page in the middle of an equal run can only take the run's value."""
    values = [value] * pages
    index = data.draw(st.integers(1, pages - 2), label="page")
    values[index] = data.draw(st.integers(0, 255).filter(lambda v: v != value), label="value")

    report = check_sweep(values, block=BLOCK, start=START)

    assert report.violation is not None
    # The drop by one is a legal edge; then the next page (back to `value`) is the violation.
    expected = index + 1 if values[index] == (value - 1) % 256 else index
    assert report.violation.offset == START + expected * PAGE_SIZE


def test_wrap_around_at_256() -> None:
    report = check_sweep([0, 0, 255, 255], block=BLOCK, start=0)
    assert report.ok
    assert report.edge == 2 * PAGE_SIZE


def test_rising_step_is_a_violation() -> None:
    report = check_sweep([5, 5, 6, 6], block="b", start=0x2000)
    assert report.violation is not None
    assert report.violation.offset == 0x2000 + 2 * PAGE_SIZE


def test_second_edge_is_a_violation() -> None:
    report = check_sweep([7, 6, 6, 5], block="b", start=0)
    assert report.edge == PAGE_SIZE
    assert report.violation is not None
    assert report.violation.offset == 3 * PAGE_SIZE


@given(st.lists(st.integers(0, 255), min_size=2, max_size=8), st.integers(0, 255))
def test_first_bytes_takes_one_byte_per_page(firsts: list[int], filler: int) -> None:
    memory = b"".join(bytes([v]) + bytes([filler]) * (PAGE_SIZE - 1) for v in firsts)
    assert first_bytes(memory, PAGE_SIZE, len(memory)) == bytes(firsts[1:])
