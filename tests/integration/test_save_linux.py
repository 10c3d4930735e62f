"""``qsnap save`` of the linux guest: running with its memory writer, then paused.

Running: the agent's pages carry (index, generation); the writer bumps the generation
page by page in index order, so memory frozen at one instant shows generation g + 1 for
indexes [0, k) and g for [k, n).  Paused: the image equals the harness memory reference
(a separate background snapshot, cross-checked with pmemsave).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.guests import AgentClient, AgentPageHeader, LinuxGuest
from qsnap.harness.memory import compare, reference_from_pages, take_reference
from qsnap.harness.vm import VM
from qsnap.image.snapshot import SnapshotImage

pytestmark = pytest.mark.qemu

MIB = 256
REGION_MIB = 32
PAGE = 4096
QSNAP = str(Path(sys.executable).with_name("qsnap"))


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VM, AgentClient, Path]]:
    tmp = tmp_path_factory.mktemp("linux")
    vm = VM(name="linux", memory_mib=MIB, log_dir=tmp)
    try:
        agent = LinuxGuest.build().boot(vm)
        yield vm, agent, tmp
        agent.close()
    finally:
        vm.shutdown()


def save(vm: VM, image: Path) -> str:
    err = image.with_suffix(".err")
    done = subprocess.run(
        [QSNAP, "create", str(image), "--ram-size", f"{MIB}M"], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rc = image.with_suffix(".rc")
    q = shlex.quote
    cmd = f"{q(QSNAP)} save {q(str(image))} 2>{q(str(err))}; echo $? >{q(str(rc))}"
    vm.background_snapshot(f"exec:{cmd}", timeout=180)
    # QEMU says "completed" before it reaps the command: wait for qsnap's status
    deadline = time.monotonic() + 60
    while not (rc.exists() and rc.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "qsnap save did not exit"
        time.sleep(0.02)
    assert rc.read_text() == "0\n", err.read_text()
    return err.read_text()


def image_pages(image: Path) -> Iterator[tuple[str, int, bytes]]:
    with SnapshotImage.open(str(image)) as snap:
        for block in snap.complete_header().blocks:
            for pos in range(0, block.used_length, 1 << 20):
                chunk = snap.read(block, pos, min(1 << 20, block.used_length - pos))
                for i in range(0, len(chunk), PAGE):
                    yield block.idstr, pos + i, bytes(chunk[i : i + PAGE])


def test_running_writer_is_frozen_at_one_instant(guest: tuple[VM, AgentClient, Path]) -> None:
    vm, agent, tmp = guest
    pages = agent.fill(REGION_MIB, seed=77)
    agent.writer_start(5000)
    try:
        text = save(vm, tmp / "running.qcow2")
    finally:
        agent.writer_stop()
    assert text.endswith("; image complete\n"), text
    gens: dict[int, int] = {}
    for block, _, data in image_pages(tmp / "running.qcow2"):
        head = AgentPageHeader.parse(data)
        if block == "pc.ram" and head is not None and head.seed == 77:
            assert head.index not in gens, f"agent page {head.index} found twice"
            gens[head.index] = head.generation
    assert sorted(gens) == list(range(pages))
    values = [gens[i] for i in range(pages)]
    high, low = max(values), min(values)
    assert high - low <= 1, (high, low)
    k = values.index(low) if high != low else pages
    assert values == [high] * k + [low] * (pages - k), "generations mix two instants"


def test_paused_image_equals_the_harness_reference(guest: tuple[VM, AgentClient, Path]) -> None:
    vm, agent, tmp = guest
    agent.fill(REGION_MIB, seed=78)
    vm.stop()
    try:
        reference = take_reference(vm)
        text = save(vm, tmp / "paused.qcow2")
    finally:
        vm.cont()
    assert text.endswith("; image complete\n"), text
    with SnapshotImage.open(str(tmp / "paused.qcow2")) as snap:
        blocks = [(b.idstr, b.used_length) for b in snap.complete_header().blocks]
    ours = reference_from_pages(
        blocks, ((b, off, data) for b, off, data in image_pages(tmp / "paused.qcow2"))
    )
    diff = compare(reference, ours)
    assert diff.matches, diff.summary()
    assert diff.pages == sum(length for _, length in blocks) // PAGE
