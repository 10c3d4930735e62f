"""qsnap revert failures: refused images, wrong destinations, qsnap killed mid-postcopy.

Each case must end quickly with one clear error line and a non-zero status (or a failed
migration on QEMU's side), never a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from revert_helpers import (
    MIB,
    QSNAP,
    create_image,
    descendants,
    qsnap,
    qsnap_lines,
    revert_uri,
    saved_paused_guest,
)

from qsnap.harness.qemu import (
    find_qemu,
    find_qemu_img,
    probe_background_snapshot,
    probe_postcopy_ram,
)
from qsnap.harness.vm import FINAL_STATUSES, VM, MigrationStatus, VMFactory

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMFactory]:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(str(probe))
    factory = VMFactory(tmp_path_factory.mktemp("logs"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def saved(vms: VMFactory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved seabios guest for all the wrong destinations."""
    return saved_paused_guest(vms, tmp_path_factory.mktemp("saved"))[0]


def incoming_no_exit(vm: VM, uri: str) -> None:
    """migrate-incoming that leaves QEMU alive on failure, so its error can be queried."""
    vm.command("migrate-incoming", uri=uri, **{"exit-on-error": False})


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
def test_incomplete_image_refused_before_anything_is_sent(tmp_path: Path, postcopy: bool) -> None:
    image = tmp_path / "never saved.qcow2"
    create_image(image)
    out_file = tmp_path / "out"
    with (
        out_file.open("wb") as out,
        subprocess.Popen(
            [QSNAP, "revert", *(["--postcopy"] if postcopy else []), os.fspath(image)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.PIPE,
        ) as proc,
    ):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert out_file.read_bytes() == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qsnap revert: error: "), lines
    assert "not a qsnap image" in lines[0] or "incomplete" in lines[0], lines


def test_failed_load_is_reported_by_qemu_and_qsnap(vms: VMFactory, tmp_path: Path) -> None:
    empty = tmp_path / "empty.qcow2"
    create_image(empty)
    dst = vms(name="dst-empty", memory_mib=MIB, incoming_defer=True, paused=True)
    incoming_no_exit(dst, revert_uri(empty))
    result = dst.wait_migration(60)
    assert result.status is MigrationStatus.FAILED
    assert any("qsnap revert: error: not a qsnap image" in line for line in qsnap_lines(dst)), (
        qsnap_lines(dst)
    )


@pytest.mark.parametrize(
    ("what", "vm_args", "qemu_says"),
    [
        ("ram size", {"memory_mib": 2 * MIB}, "Size mismatch: pc.ram"),
        ("machine type", {"machine": "q35"}, "Machine type received"),
    ],
)
def test_wrong_destination(
    vms: VMFactory,
    saved: Path,
    what: str,
    vm_args: dict[str, object],
    qemu_says: str,
) -> None:
    args: dict[str, object] = {"memory_mib": MIB, **vm_args}
    dst = vms(name=f"dst-{what.replace(' ', '-')}", incoming_defer=True, paused=True, **args)
    incoming_no_exit(dst, revert_uri(saved))
    result = dst.wait_migration(60)
    assert result.status is MigrationStatus.FAILED, f"{what}: {result}"
    log = dst.stderr_log.read_text()
    assert qemu_says in log, log
    # qsnap saw the failure (SHUT 1, or the channel closing) and said so in one line
    deadline = time.monotonic() + 10
    while not any("error:" in line for line in qsnap_lines(dst)):
        assert time.monotonic() < deadline, f"no qsnap error line: {log}"
        time.sleep(0.1)


def _qsnap_revert_pid(qemu_pid: int) -> int:
    """The qsnap revert process QEMU started (under /bin/sh -c, or exec'd by it)."""
    found = [
        pid
        for pid in descendants(qemu_pid)
        if b"revert" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        and Path(f"/proc/{pid}/exe").resolve().name.startswith("python")
    ]
    assert len(found) == 1, found
    return found[0]


def test_qsnap_killed_during_postcopy(vms: VMFactory, saved: Path) -> None:
    probe = probe_postcopy_ram(find_qemu())
    if not probe:
        pytest.skip(str(probe))
    dst = vms(name="dst-killed", memory_mib=MIB, incoming_defer=True, paused=True)
    dst.set_migration_capabilities({"postcopy-ram": True})
    incoming_no_exit(dst, revert_uri(saved, "--postcopy", "--max-bandwidth=4"))
    dst.wait_migration(30, until={MigrationStatus.POSTCOPY_ACTIVE, *FINAL_STATUSES})
    assert dst.pid is not None
    os.kill(_qsnap_revert_pid(dst.pid), signal.SIGKILL)
    result = dst.wait_migration(30, until={MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.FAILED})
    assert result.status is MigrationStatus.POSTCOPY_PAUSED, result
    assert "Detected IO failure for postcopy" in dst.stderr_log.read_text()
    qsnap_done = qsnap("--help")  # the command itself is still fine afterwards
    assert qsnap_done.returncode == 0


def test_corrupted_device_state_refused_before_anything_is_sent(
    saved: Path, tmp_path: Path
) -> None:
    image = tmp_path / "corrupted.qcow2"
    shutil.copyfile(saved, image)
    info = json.loads(qsnap("info", "--json", os.fspath(image)).stdout)
    where = info["device_state"]["offset"] + info["device_state"]["length"] // 2
    qemu_io = Path(find_qemu_img()).with_name("qemu-io")
    subprocess.run(
        [os.fspath(qemu_io), "-f", "qcow2", "-c", f"write -P 0x55 {where} 1", os.fspath(image)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    out_file = tmp_path / "out"
    with out_file.open("wb") as out:
        proc = qsnap("revert", os.fspath(image), stdout=out)
    assert proc.returncode == 1
    assert out_file.read_bytes() == b""
    assert proc.stderr.decode().splitlines() == [
        "qsnap revert: error: corrupted image: the device state does not match its digest"
    ]
