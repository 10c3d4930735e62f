"""Both vm-images guests build, boot under TCG and do what the harness relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.guests import AgentClient, AgentError, LinuxGuest, PatternGuest, vm_images_dir
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


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentClient]:
    """One booted linux guest for the module; tests leave its writer stopped."""
    factory = VMFactory(tmp_path_factory.mktemp("linux"))
    vm = factory.create(name="linux", memory_mib=LINUX_MIB)
    client = LinuxGuest.build().boot(vm)
    yield client
    client.close()
    factory.close()


def test_linux_agent_fills_writes_and_verifies(agent: AgentClient) -> None:
    agent.ping()
    pages = agent.fill(REGION_MIB, seed=1234)
    assert pages == REGION_MIB * 256

    fresh = agent.verify()
    assert fresh.ok
    assert (fresh.pages, fresh.k, fresh.g, fresh.bad) == (pages, 0, 0, 0)

    agent.writer_start(2000)
    with pytest.raises(AgentError, match="writer running"):
        agent.command(f"fill {REGION_MIB} 1")
    deadline = time.monotonic() + 30
    while int(agent.command("status")["k"]) < 100:
        assert time.monotonic() < deadline, "the writer does not advance"
        time.sleep(0.1)
    running = agent.verify()
    stopped = agent.writer_stop()
    assert running.ok, running
    assert running.k >= 100
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
    with pytest.raises(AgentError, match="usage: writer start PAGES_PER_SEC"):
        agent.command("writer start 0")
    with pytest.raises(AgentError, match="usage: fill MIB SEED"):
        agent.command("fill 0 1")
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


def run_build(script: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QSNAP_CACHE": str(cache)}
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_build_is_cached_keyed_by_inputs_and_locked(tmp_path: Path) -> None:
    """The pattern recipe (quick to build) in a private copy of vm-images and cache."""
    recipes = tmp_path / "vm-images"
    recipes.mkdir()
    shutil.copy2(vm_images_dir() / "build", recipes / "build")
    shutil.copytree(vm_images_dir() / "pattern", recipes / "pattern")
    cache = tmp_path / "cache"
    script = recipes / "build"

    env = {**os.environ, "QSNAP_CACHE": str(cache)}
    racing = [
        subprocess.Popen(
            [str(script), "pattern"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in racing]
    assert [p.returncode for p in racing] == [0, 0], outputs
    first = Path(outputs[0][0].decode().strip())
    assert Path(outputs[1][0].decode().strip()) == first
    assert first.parent == cache / "vm-images"
    assert (first / "pattern.img").stat().st_size == 1 << 20  # padded: q35 boots it
    assert (first / "pattern.img").read_bytes()[510:512] == b"\x55\xaa"
    entries = sorted(p.name for p in (cache / "vm-images").iterdir())
    memos = [name for name in entries if name.startswith(".pattern-inputs-")]
    assert sorted(set(entries) - set(memos)) == sorted([first.name, "pattern.lock"]), (
        "a racing build left something behind"
    )
    assert len(memos) == 1, entries
    assert (cache / "vm-images" / memos[0]).read_text().strip() == first.name.split("-", 1)[1]

    built_at = (first / ".complete").stat().st_mtime_ns
    again = run_build(script, cache, "pattern")
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == first
    assert (first / ".complete").stat().st_mtime_ns == built_at, "rebuilt without a change"

    boot = recipes / "pattern" / "boot.s"
    boot.write_text(boot.read_text() + "# changed\n")
    changed = run_build(script, cache, "pattern")
    assert changed.returncode == 0, changed.stderr
    assert Path(changed.stdout.strip()) != first


def test_build_rejects_unknown_guest(tmp_path: Path) -> None:
    bad = run_build(vm_images_dir() / "build", tmp_path, "windows")
    assert bad.returncode != 0
    assert bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "vm-images/build: unknown guest 'windows' (usage: vm-images/build [linux|pattern|all])"
    ]
