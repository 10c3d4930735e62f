"""Shared set-up of the revert integration tests: saved guests and reverting destinations."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from qsnap.harness import memory
from qsnap.harness.vm import VM, VMFactory

QSNAP = os.fspath(Path(sys.executable).parent / "qsnap")
MIB = 128


def qsnap(
    *args: str,
    stdin: int | IO[bytes] = subprocess.DEVNULL,
    stdout: int | IO[bytes] = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    """Run the qsnap command (stdin from /dev/null by default: no return path)."""
    return subprocess.run(
        [QSNAP, *args], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, timeout=120, check=False
    )


def create_image(path: Path, mib: int = MIB) -> None:
    created = qsnap("create", os.fspath(path), "--ram-size", f"{mib}M")
    assert created.returncode == 0, created.stderr


def saved_paused_guest(
    vms: VMFactory, tmp_path: Path, mib: int = MIB, **vm_args: object
) -> tuple[Path, memory.MemoryReference, Path]:
    """A seabios guest, run then paused: its image, reference and raw stream.

    The image is saved from the very stream the reference comes from, so the device state
    of a revert can be compared with it.
    """
    src = vms(name="src", memory_mib=mib, **vm_args)
    src.cont()
    src.stop()
    raw = tmp_path / "raw.stream"
    reference = memory.take_reference(src, stream_path=raw)
    image = tmp_path / "snap.qcow2"
    create_image(image, mib)
    with raw.open("rb") as stream:
        saved = qsnap("save", os.fspath(image), stdin=stream)
    assert saved.returncode == 0, saved.stderr
    src.shutdown()
    return image, reference, raw


def revert_uri(image: Path | str, *options: str) -> str:
    return "exec:" + shlex.join([QSNAP, "revert", *options, os.fspath(image)])


def revert_into(
    vms: VMFactory,
    image: Path | str,
    name: str = "dst",
    options: tuple[str, ...] = (),
    postcopy: bool = False,
    mib: int = MIB,
    **vm_args: object,
) -> VM:
    """A destination (-S unless ``paused=False``) loading IMAGE by exec:qsnap revert."""
    vm_args.setdefault("paused", True)
    dst = vms(name=name, memory_mib=mib, incoming_defer=True, **vm_args)
    if postcopy:
        dst.set_migration_capabilities({"postcopy-ram": True})
    dst.migrate_incoming(revert_uri(image, *options))
    return dst


def descendants(pid: int) -> Iterator[int]:
    """Every process below ``pid`` (QEMU's exec: commands and their children)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in children:
            yield int(child)
            yield from descendants(int(child))


def wait_children_gone(vm: VM, timeout: float = 60.0) -> None:
    """Wait until QEMU's exec: command has exited.

    QEMU reports a migration "completed" before its cleanup closes the channel and waits
    for the command, so an ``exec:qsnap save`` may still be finishing the image then.
    """
    assert vm.pid is not None
    deadline = time.monotonic() + timeout
    while list(descendants(vm.pid)):
        assert time.monotonic() < deadline, f"{vm.name}: exec: command still running"
        time.sleep(0.05)


def qsnap_lines(vm: VM) -> list[str]:
    """The lines qsnap wrote to the destination's stderr (QEMU passes it through)."""
    return [line for line in vm.stderr_log.read_text().splitlines() if line.startswith("qsnap")]
