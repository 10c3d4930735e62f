"""Discovery and probes against the installed QEMU programs."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from qsnap.harness.qemu import (
    Probe,
    QemuProbeError,
    QemuVersion,
    find_qemu,
    find_qemu_img,
    find_storage_daemon,
    machine_types,
    probe_background_snapshot,
    probe_machine,
    probe_postcopy_ram,
    qemu_version,
    qmp_stdio,
    userfaultfd_available,
)
from qsnap.harness.vm import VM, VMCommandError

pytestmark = pytest.mark.qemu


def test_programs_and_versions_agree() -> None:
    programs = [find_qemu(), find_qemu_img(), find_storage_daemon()]
    versions = {qemu_version(program) for program in programs}
    assert len(versions) == 1, f"mixed QEMU installation: {versions}"
    (version,) = versions
    first_line = subprocess.run(
        [str(programs[0]), "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    assert first_line.startswith(f"QEMU emulator version {version}")


def test_qmp_stdio_reports_the_same_version() -> None:
    qemu = find_qemu()
    (reply,) = qmp_stdio(qemu, ["-machine", "none"], [{"execute": "query-version"}])
    numbers = reply["return"]["qemu"]
    assert QemuVersion(numbers["major"], numbers["minor"], numbers["micro"]) == qemu_version(qemu)
    (error,) = qmp_stdio(qemu, ["-machine", "none"], [{"execute": "no-such-command"}])
    assert error["error"]["class"] == "CommandNotFound"


def test_machine_types() -> None:
    qemu = find_qemu()
    assert {"pc", "q35", "none"} <= machine_types(qemu)
    assert probe_machine(qemu, "q35")
    missing = probe_machine(qemu, "no-such-machine")
    assert not missing
    assert missing.reason == f"{qemu.name} has no machine type 'no-such-machine'"


@pytest.mark.parametrize(
    ("capability", "probe", "incoming"),
    [
        ("background-snapshot", probe_background_snapshot, False),
        ("postcopy-ram", probe_postcopy_ram, True),
    ],
)
def test_probe_agrees_with_qemu(
    tmp_path: Path, capability: str, probe: Callable[[Path], Probe], incoming: bool
) -> None:
    qemu = find_qemu()
    result = probe(qemu)
    uffd = userfaultfd_available()
    if not uffd:
        assert not result
        assert result.reason == uffd.reason
    with VM(log_dir=tmp_path, memory_mib=32, paused=True, incoming_defer=incoming) as vm:
        if result:
            vm.set_migration_capabilities({capability: True})
            assert vm.migration_capabilities()[capability] is True
        else:
            assert result.reason, "an unavailable feature must say why"
            with pytest.raises(VMCommandError):
                vm.set_migration_capabilities({capability: True})


def test_a_broken_binary_is_reported(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'qemu-system-x86_64: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(QemuProbeError, match="exit status 3: qemu-system-x86_64: cannot start"):
        qemu_version(fake)
