"""qsnap revert of running guests that check themselves: linux (agent) and pattern (sweep).

The linux guest's agent verifies its own memory with its writer running; the pattern
guest is checked on the host with QEMU's check_guests_ram rule.  Both are saved while
running (background snapshot into ``exec:qsnap save``) and reverted into running
destinations, by precopy and by postcopy.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from revert_helpers import (
    QSNAP,
    create_image,
    qsnap,
    qsnap_lines,
    revert_uri,
    wait_children_gone,
)

from qsnap.harness import memory
from qsnap.harness.guests import AgentClient, LinuxGuest, PatternGuest
from qsnap.harness.qemu import find_qemu, probe_background_snapshot, probe_postcopy_ram
from qsnap.harness.sweep import check_sweep, first_bytes
from qsnap.harness.vm import VM, MigrationStatus, VMFactory

pytestmark = pytest.mark.qemu

LINUX_MIB = 256
REGION_MIB = 64
WRITER_RATE = 2000
PATTERN_MIB = 128


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMFactory]:
    qemu = find_qemu()
    for probe in (probe_background_snapshot(qemu), probe_postcopy_ram(qemu)):
        if not probe:
            pytest.skip(str(probe))
    factory = VMFactory(tmp_path_factory.mktemp("logs"))
    yield factory
    factory.close()


def save_running(vm: VM, image: Path, mib: int) -> None:
    create_image(image, mib)
    vm.background_snapshot("exec:" + shlex.join([QSNAP, "save", os.fspath(image)]), 120)
    wait_children_gone(vm)


@dataclass(frozen=True)
class SavedLinux:
    guest: LinuxGuest
    image: Path


@pytest.fixture(scope="module")
def saved_linux(vms: VMFactory, tmp_path_factory: pytest.TempPathFactory) -> SavedLinux:
    """The linux guest saved with its writer running, in an image on a path with spaces."""
    guest = LinuxGuest.build()
    image = tmp_path_factory.mktemp("linux") / "snap with spaces.qcow2"
    src = vms.create(name="linux-src", memory_mib=LINUX_MIB)
    with guest.boot(src) as agent:
        agent.fill(REGION_MIB, seed=0x5EED)
        agent.writer_start(WRITER_RATE)
        time.sleep(0.5)
        save_running(src, image, LINUX_MIB)
    src.shutdown()
    return SavedLinux(guest, image)


def linux_destination(vms: VMFactory, saved: SavedLinux, name: str) -> tuple[VM, AgentClient]:
    dst = vms.create(name=name, memory_mib=LINUX_MIB, incoming_defer=True)
    socket_path = saved.guest.configure(dst)
    dst.launch()
    return dst, AgentClient.connect(socket_path)


def test_linux_precopy_running_guest_verifies(vms: VMFactory, saved_linux: SavedLinux) -> None:
    dst, agent = linux_destination(vms, saved_linux, "linux-pre")
    with agent:
        dst.migrate_incoming(revert_uri(saved_linux.image))
        result = dst.wait_migration(120)
        assert result.status is MigrationStatus.COMPLETED, f"{result}\n{qsnap_lines(dst)}"
        report = agent.verify(timeout=60)
        assert report.ok and report.pages == REGION_MIB * 256, report
    dst.shutdown()


def test_linux_postcopy_resumes_at_once_and_verifies(
    vms: VMFactory, saved_linux: SavedLinux
) -> None:
    dst, agent = linux_destination(vms, saved_linux, "linux-post")
    dst.set_migration_capabilities({"postcopy-ram": True})
    with agent:
        dst.migrate_incoming(revert_uri(saved_linux.image, "--postcopy", "--max-bandwidth=24"))
        dst.wait_event("RESUME", timeout=30)
        assert dst.query_migrate()["status"] == MigrationStatus.POSTCOPY_ACTIVE
        agent.touch("random")  # faults all over the region: real page requests
        report = agent.verify(timeout=120)
        assert report.ok and report.pages == REGION_MIB * 256, report
        result = dst.wait_migration(120)
        assert result.status is MigrationStatus.COMPLETED, f"{result}\n{qsnap_lines(dst)}"
        summary = next(line for line in qsnap_lines(dst) if "postcopy:" in line)
        match = re.search(r"(\d+) on request \((\d+) requests", summary)
        assert match and int(match[1]) > 0, summary
        assert agent.verify(timeout=60).ok
    dst.shutdown()


def test_pattern_postcopy_keeps_sweeping(vms: VMFactory, tmp_path: Path) -> None:
    guest = PatternGuest.build()
    src = vms.create(name="pattern-src", memory_mib=PATTERN_MIB)
    guest.configure(src)
    src.launch()
    src.wait_console(PatternGuest.MARKER.decode(), timeout=30)
    image = tmp_path / "pattern.qcow2"
    save_running(src, image, PATTERN_MIB)
    src.shutdown()

    dst = vms.create(name="pattern-dst", memory_mib=PATTERN_MIB, incoming_defer=True)
    guest.configure(dst)
    dst.launch()
    dst.set_migration_capabilities({"postcopy-ram": True})
    dst.migrate_incoming(revert_uri(image, "--postcopy", "--max-bandwidth=32"))
    result = dst.wait_migration(120)
    assert result.status is MigrationStatus.COMPLETED, f"{result}\n{qsnap_lines(dst)}"
    start = dst.console_size()
    dst.wait_console(PatternGuest.MARKER.decode() * 2, timeout=60, start=start)
    dst.stop()
    dump = tmp_path / "ram.bin"
    dst.command("pmemsave", val=0, size=PATTERN_MIB << 20, filename=str(dump))
    swept = PatternGuest.swept_range(PATTERN_MIB)
    report = check_sweep(
        first_bytes(dump.read_bytes(), swept.start, swept.stop), block="pc.ram", start=swept.start
    )
    assert report.ok, str(report.violation)
    summary = next(line for line in qsnap_lines(dst) if "postcopy:" in line)
    assert re.search(r"[1-9]\d* on request", summary), summary
    dst.shutdown()


def test_linux_paused_exact_memory_then_runs_and_verifies(vms: VMFactory, tmp_path: Path) -> None:
    """Paused linux guest: every page as before the save; then it runs and verifies."""
    guest = LinuxGuest.build()
    src = vms.create(name="linux-paused-src", memory_mib=LINUX_MIB)
    with guest.boot(src) as agent:
        agent.fill(REGION_MIB, seed=7)
        agent.writer_start(WRITER_RATE)
        time.sleep(0.3)
        src.stop()
        raw = tmp_path / "raw.stream"
        reference = memory.take_reference(src, stream_path=raw)
    src.shutdown()
    image = tmp_path / "paused.qcow2"
    create_image(image, LINUX_MIB)
    with raw.open("rb") as stream:
        assert qsnap("save", os.fspath(image), stdin=stream).returncode == 0

    dst = vms.create(
        name="linux-paused-dst", memory_mib=LINUX_MIB, incoming_defer=True, paused=True
    )
    socket_path = guest.configure(dst)
    dst.launch()
    with AgentClient.connect(socket_path) as agent:
        dst.migrate_incoming(revert_uri(image))
        result = dst.wait_migration(120)
        assert result.status is MigrationStatus.COMPLETED, f"{result}\n{qsnap_lines(dst)}"
        diff = memory.compare(reference, memory.take_reference(dst))
        assert diff.matches, diff.summary()
        agent.send("verify")  # queued on the serial port until the guest runs
        dst.cont()
        report = agent.parse_verify(agent.answer("verify", timeout=60))
        assert report.ok and report.pages == REGION_MIB * 256, report
    dst.shutdown()
