"""qsnap revert (precopy) into real QEMU: memory, device state, failures."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from qsnap.harness import analyze, memory
from qsnap.harness.qemu import find_qemu, probe_background_snapshot
from qsnap.harness.vm import VM, MigrationStatus, RunState, VMFactory

pytestmark = pytest.mark.qemu

QSNAP = os.fspath(Path(sys.executable).parent / "qsnap")
MIB = 128


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(str(probe))
    factory = VMFactory(tmp_path / "logs")
    yield factory
    factory.close()


def qsnap(
    *args: str,
    stdin: int | IO[bytes] = subprocess.DEVNULL,
    stdout: int | IO[bytes] = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    """Run the qsnap command (stdin from /dev/null by default: no return path)."""
    return subprocess.run(
        [QSNAP, *args],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=120,
        check=False,
    )


def saved_paused_guest(vms: VMFactory, tmp_path: Path) -> tuple[Path, memory.MemoryReference, Path]:
    """A seabios guest, run then paused: its image, reference and raw stream.

    The image is saved from the very stream the reference comes from, so the device state
    of a revert can be compared with it.
    """
    src = vms(name="src", memory_mib=MIB)
    src.cont()
    src.stop()
    raw = tmp_path / "raw.stream"
    reference = memory.take_reference(src, stream_path=raw)
    image = tmp_path / "snap.qcow2"
    created = qsnap("create", os.fspath(image), "--ram-size", f"{MIB}M")
    assert created.returncode == 0, created.stderr
    with raw.open("rb") as stream:
        saved = qsnap("save", os.fspath(image), stdin=stream)
    assert saved.returncode == 0, saved.stderr
    return image, reference, raw


def revert_into(vms: VMFactory, image: Path, name: str, **vm_args: object) -> VM:
    """A -S destination loaded by migrate_incoming exec:qsnap revert IMAGE."""
    dst = vms(name=name, memory_mib=MIB, incoming_defer=True, paused=True, **vm_args)
    dst.migrate_incoming(f"exec:{shlex.quote(QSNAP)} revert {shlex.quote(os.fspath(image))}")
    return dst


def test_paused_guest_memory_and_device_state(vms: VMFactory, tmp_path: Path) -> None:
    image, reference, raw = saved_paused_guest(vms, tmp_path)
    dst = revert_into(vms, image, "dst")
    result = dst.wait_migration(120)
    assert result.status is MigrationStatus.COMPLETED, result
    assert "qsnap revert: " in dst.stderr_log.read_text()
    captured = tmp_path / "reverted.stream"
    with captured.open("wb") as out:
        proc = qsnap("revert", os.fspath(image), stdout=out)
    assert proc.returncode == 0, proc.stderr
    assert analyze.diff_state(analyze.device_state(raw), analyze.device_state(captured)) == []
    diff = memory.compare(reference, memory.reference_from_file(captured))
    assert diff.matches, diff.summary()

    assert dst.runstate() is RunState.PAUSED
    diff = memory.compare(reference, memory.take_reference(dst))
    assert diff.matches, diff.summary()
