"""Both vm-images guests build, boot under TCG and do what the harness relies on."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.guests import AgentClient, AgentError, LinuxGuest, PatternGuest
from qsnap.harness.sweep import check_sweep, first_bytes
from qsnap.harness.vm import VMFactory

pytestmark = pytest.mark.qemu

LINUX_MIB = 256
REGION_MIB = 64
PATTERN_MIB = 128


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    factory = VMFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture
def agent(vms: VMFactory) -> Iterator[AgentClient]:
    vm = vms.create(name="linux", memory_mib=LINUX_MIB)
    client = LinuxGuest.build().boot(vm)
    yield client
    client.close()


def test_linux_agent_fills_writes_and_verifies(agent: AgentClient) -> None:
    agent.ping()
    pages = agent.fill(REGION_MIB, seed=1234)
    assert pages == REGION_MIB * 256

    fresh = agent.verify()
    assert fresh.ok
    assert (fresh.pages, fresh.k, fresh.g, fresh.bad) == (pages, 0, 0, 0)

    agent.writer_start(2000)
    running = agent.verify()
    stopped = agent.writer_stop()
    assert running.ok, running
    assert running.k > 0, "the writer did not advance"
    assert stopped.k >= running.k or stopped.g > running.g

    after = agent.verify()
    assert after.ok
    assert (after.k, after.g) == (stopped.k, stopped.g)
    first_digest = agent.digest()
    assert re.fullmatch(r"[0-9a-f]{16}", first_digest)
    assert agent.digest() == first_digest, "digest changed with the writer stopped"
    agent.touch("random")
    agent.touch("reverse")


def test_linux_agent_rejects_bad_commands(agent: AgentClient) -> None:
    with pytest.raises(AgentError, match="usage: fill MIB SEED"):
        agent.command("fill many 1")
    with pytest.raises(AgentError, match="no region"):
        agent.command("writer start 10")
    with pytest.raises(AgentError, match="unknown command: frobnicate"):
        agent.command("frobnicate")
    with pytest.raises(AgentError, match="longer than 255 bytes"):
        agent.command("x" * 300)
    agent.ping()


def test_pattern_guest_sweeps_all_ram_above_1mib(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.create(name="pattern", memory_mib=PATTERN_MIB)
    PatternGuest.build().configure(vm)
    vm.launch()
    marker = PatternGuest.MARKER.decode()
    vm.wait_console(marker * 3, timeout=60)
    vm.stop()
    dump = tmp_path / "ram"
    vm.command("pmemsave", val=0, size=PATTERN_MIB << 20, filename=str(dump))
    swept = PatternGuest.swept_range(PATTERN_MIB)
    values = first_bytes(dump.read_bytes(), swept.start, swept.stop)

    report = check_sweep(values, block="pc.ram", start=swept.start)
    assert report.ok, report.violation
    assert len(values) == (PATTERN_MIB - 1) * 256
    # One marker per completed sweep: the pages hold that count, or one more (mod 256).
    trailing = re.search(f"{marker}+$", vm.console_text())
    assert trailing is not None
    sweeps = len(trailing.group(0))
    allowed = {sweeps % 256, (sweeps + 1) % 256}
    assert {values[0], values[-1]} <= allowed, (sweeps, values[0], values[-1])

    before = vm.console_size()
    vm.cont()
    vm.wait_console(marker, timeout=30, start=before)
