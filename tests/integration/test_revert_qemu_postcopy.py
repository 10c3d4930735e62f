"""qsnap revert --postcopy into real QEMU: all memory arrives, requests are served."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from revert_helpers import MIB, qsnap_lines, revert_into, saved_paused_guest

from qsnap.harness import memory
from qsnap.harness.qemu import find_qemu, probe_background_snapshot, probe_postcopy_ram
from qsnap.harness.vm import FINAL_STATUSES, MigrationStatus, RunState, VMFactory

pytestmark = pytest.mark.qemu

PAGE = 4096


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    qemu = find_qemu()
    for probe in (probe_background_snapshot(qemu), probe_postcopy_ram(qemu)):
        if not probe:
            pytest.skip(str(probe))
    factory = VMFactory(tmp_path / "logs")
    yield factory
    factory.close()


@pytest.mark.parametrize("pct", [0, 50, 100])
def test_paused_destination_gets_every_page(vms: VMFactory, tmp_path: Path, pct: int) -> None:
    image, reference, _ = saved_paused_guest(vms, tmp_path)
    dst = revert_into(vms, image, options=(f"--postcopy={pct}",), postcopy=True)
    result = dst.wait_migration(120)
    assert result.status is MigrationStatus.COMPLETED, f"{result}\n{qsnap_lines(dst)}"
    if pct < 100:  # at 100 % every page of this small guest goes before LISTEN
        assert any("postcopy:" in line for line in qsnap_lines(dst)), qsnap_lines(dst)
    assert dst.runstate() is RunState.PAUSED
    dst.set_migration_capabilities({"postcopy-ram": False})  # background-snapshot refuses it
    diff = memory.compare(reference, memory.take_reference(dst))
    assert diff.matches, diff.summary()


def test_requests_from_reading_guest_memory(vms: VMFactory, tmp_path: Path) -> None:
    """pmemsave on the destination faults on pages not there yet: qsnap serves them."""
    image, reference, _ = saved_paused_guest(vms, tmp_path)
    dst = revert_into(vms, image, options=("--postcopy", "--max-bandwidth=16"), postcopy=True)
    dst.wait_migration(30, until={MigrationStatus.POSTCOPY_ACTIVE, *FINAL_STATUSES})
    start, size = (MIB - 8) << 20, 4 << 20
    dump = tmp_path / "dump.bin"
    dst.command("pmemsave", val=start, size=size, filename=str(dump))
    result = dst.wait_migration(120)
    assert result.status is MigrationStatus.COMPLETED, f"{result}\n{qsnap_lines(dst)}"
    data = dump.read_bytes()
    ram = reference.block("pc.ram")
    bad = [
        hex(start + pos)
        for pos in range(0, size, PAGE)
        if memory.page_digest(data[pos : pos + PAGE]) != ram.digest((start + pos) // PAGE)
    ]
    assert bad == []
    summary = next(line for line in qsnap_lines(dst) if "postcopy:" in line)
    match = re.search(r"(\d+) on request \((\d+) requests", summary)
    assert match and int(match[1]) > 0 and int(match[2]) > 0, summary
    dst.set_migration_capabilities({"postcopy-ram": False})
    diff = memory.compare(reference, memory.take_reference(dst))
    assert diff.matches, diff.summary()
