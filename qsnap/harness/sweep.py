"""The host-side check of the pattern guest: QEMU's check_guests_ram rule.

The pattern guest increments the first byte of every page of its swept range, in
ascending order, forever. Memory frozen at one instant therefore reads, upwards, as a run
of value v + 1 followed by a run of value v (mod 256): all neighbours equal except at most
one place where the value steps down by one. Memory that mixes instants, loses a page,
moves a page or flips a byte breaks that rule somewhere; `check_sweep` names where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class SweepViolation:
    """The first page whose value the rule does not allow, given the pages below it."""

    block: str
    offset: int
    found: int
    previous: int

    def __str__(self) -> str:
        return (
            f"{self.block} offset {self.offset:#x}: first byte {self.found:#04x} after "
            f"{self.previous:#04x} (only equal, or one less once per sweep, is allowed)"
        )


@dataclass(frozen=True, slots=True)
class SweepReport:
    """The outcome of `check_sweep` over `pages` pages of `block` from offset `start`."""

    block: str
    start: int
    pages: int
    edge: int | None
    """Offset of the first page of the lower run (where the sweep stood), if any."""
    violation: SweepViolation | None

    @property
    def ok(self) -> bool:
        return self.violation is None


def check_sweep(
    values: Sequence[int] | bytes,
    *,
    block: str,
    start: int,
    page_size: int = PAGE_SIZE,
) -> SweepReport:
    """Check the first bytes `values` of consecutive pages of `block` from offset `start`.

    The rule is QEMU's (tests/qtest/migration-test.c, check_guests_ram): going up, a page
    equals the one below it, except that once the value may drop by one (mod 256).
    """
    if not values:
        return SweepReport(block, start, 0, None, None)
    edge: int | None = None
    previous = values[0]
    for i in range(1, len(values)):
        value = values[i]
        if value == previous:
            continue
        offset = start + i * page_size
        if edge is None and (value + 1) % 256 == previous:
            edge = offset
        else:
            violation = SweepViolation(block, offset, value, previous)
            return SweepReport(block, start, len(values), edge, violation)
        previous = value
    return SweepReport(block, start, len(values), edge, None)


def first_bytes(memory: bytes | memoryview, start: int, end: int) -> bytes:
    """The first byte of every page in [start, end) of a RAM image."""
    return bytes(memory[start:end:PAGE_SIZE])
