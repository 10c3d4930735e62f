"""qsnap revert (precopy) into real QEMU: memory and device state, repeated, converted."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from revert_helpers import qsnap, qsnap_lines, revert_into, saved_paused_guest

from qsnap.harness import analyze, memory
from qsnap.harness.qemu import find_qemu, find_qemu_img, probe_background_snapshot
from qsnap.harness.vm import MigrationStatus, RunState, VMFactory
from qsnap.image.virtqueue import ORDERED_HOST

pytestmark = pytest.mark.qemu


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(str(probe))
    factory = VMFactory(tmp_path / "logs")
    yield factory
    factory.close()


def test_paused_guest_memory_and_device_state(vms: VMFactory, tmp_path: Path) -> None:
    image, reference, raw = saved_paused_guest(vms, tmp_path)

    captured = tmp_path / "reverted.stream"
    with captured.open("wb") as out:
        proc = qsnap("revert", "--json", os.fspath(image), stdout=out)
    assert proc.returncode == 0, proc.stderr
    shared = "shared memory" if ORDERED_HOST else "nbd"  # see qsnap.image.virtqueue
    summary = json.loads(proc.stderr)
    assert (summary["page_reads"], summary["pipe_writes"]) == (shared, "copied")  # a file
    assert analyze.diff_state(analyze.device_state(raw), analyze.device_state(captured)) == []
    diff = memory.compare(reference, memory.reference_from_file(captured))
    assert diff.matches, diff.summary()

    # Pages read over NBD instead of through the memory shared with the daemon: the
    # stream is the same, byte for byte.
    over_nbd = tmp_path / "nbd.stream"
    with over_nbd.open("wb") as out:
        proc = qsnap("revert", "--json", "--nbd-only", os.fspath(image), stdout=out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stderr)["page_reads"] == "nbd"
    assert over_nbd.read_bytes() == captured.read_bytes()

    # Into a pipe, shared-memory pages go by reference (vmsplice): the same stream.
    piped = qsnap("revert", "--json", os.fspath(image))
    assert piped.returncode == 0, piped.stderr
    spliced = "spliced" if ORDERED_HOST else "copied"
    assert json.loads(piped.stderr)["pipe_writes"] == spliced
    assert piped.stdout == captured.read_bytes()

    # the same image again, then a copy made by qemu-img with other clusters (64 KiB)
    converted = tmp_path / "converted copy.qcow2"
    subprocess.run(
        [
            os.fspath(find_qemu_img()),
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
            os.fspath(image),
            os.fspath(converted),
        ],
        check=True,
        timeout=120,
    )
    for run, source in enumerate((image, converted)):
        dst = revert_into(vms, source, name=f"dst{run}")
        result = dst.wait_migration(120)
        assert result.status is MigrationStatus.COMPLETED, result
        assert any(" pages (" in line for line in qsnap_lines(dst)), qsnap_lines(dst)
        assert dst.runstate() is RunState.PAUSED
        diff = memory.compare(reference, memory.take_reference(dst))
        assert diff.matches, diff.summary()
        dst.shutdown()
