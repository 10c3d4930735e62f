"""The QEMU built with qsnap's own patch series (qemu-patches/, built by ci/build-qemu).

The series adds the migration parameter `stream-content-list`: an outgoing migration then
carries only the listed parts of the state. The seed's two-pass save needs it (device
state, then RAM, of a paused VM: a background snapshot returns the VM to its run state,
so the two passes describe the same instant). This module finds or builds that QEMU and
drives the parameter; it knows nothing of qsnap's own save or revert.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qsnap.harness.project_scripts import SOURCE_TREE, ScriptError, run_for_path
from qsnap.harness.qemu import Probe, find_qemu, qmp_stdio
from qsnap.harness.vm import VM, MigrationResult, VMError

log = logging.getLogger(__name__)

BUILD_TIMEOUT = 3600.0
"""Seconds ci/build-qemu may take: a first build is 4-8 minutes, far more on a busy host."""

STREAM_CONTENT_PARAMETER = "stream-content-list"


class StreamContent(enum.StrEnum):
    """The parts `stream-content-list` names (QAPI enum `MigrationStreamContent`)."""

    VMSTATE = "vmstate"
    RAM = "ram"
    DIRTY_BITMAPS = "dirty-bitmaps"


class PatchedQemuError(Exception):
    """ci/build-qemu failed or printed something that is not a usable QEMU."""


@dataclass(frozen=True, slots=True)
class PatchedQemu:
    """Where the build put things.

    `qemu` is a drop-in qemu-system-x86_64 (a wrapper adding Debian's firmware paths, fit
    for `QSNAP_QEMU`); `source` is the patched QEMU source tree.
    """

    qemu: Path
    source: Path

    @property
    def analyze_migration(self) -> Path:
        """The patched scripts/analyze-migration.py (it knows `--ram-only`)."""
        return self.source / "scripts" / "analyze-migration.py"

    @property
    def iotests(self) -> Path:
        """QEMU's tests/qemu-iotests of the patched tree (with the series' own test)."""
        return self.source / "tests" / "qemu-iotests"


def build_script() -> Path:
    """ci/build-qemu of this source tree."""
    return SOURCE_TREE / "ci" / "build-qemu"


@functools.cache
def build_patched_qemu(timeout: float = BUILD_TIMEOUT) -> PatchedQemu:
    """Run ci/build-qemu (cached: only the first build of a series is slow).

    Cached per process too, since the script's answer cannot change while its inputs do
    not.
    """
    script = build_script()
    log.info("building the patched QEMU with %s", script)
    try:
        qemu = run_for_path([script], timeout)
    except ScriptError as exc:
        raise PatchedQemuError(str(exc)) from None
    if not os.access(qemu, os.X_OK):
        raise PatchedQemuError(f"{script}: printed no executable QEMU path")
    patched = PatchedQemu(qemu=qemu, source=qemu.parent / "src")
    if not patched.analyze_migration.is_file():
        raise PatchedQemuError(f"{script}: no patched source tree at {patched.source}")
    return patched


@functools.cache
def probe_stream_content(binary: str | os.PathLike[str] | None = None) -> Probe:
    """Whether the QEMU `binary` (else `QSNAP_QEMU`, else PATH) has `stream-content-list`.

    The parameter is absent from query-migrate-parameters while unset, so the probe sets
    it and reads it back.
    """
    qemu = find_qemu(binary)
    parts = [StreamContent.VMSTATE.value, StreamContent.RAM.value]
    setting, query = qmp_stdio(
        qemu,
        ["-machine", "none"],
        [
            {"execute": "migrate-set-parameters", "arguments": {STREAM_CONTENT_PARAMETER: parts}},
            {"execute": "query-migrate-parameters"},
        ],
    )
    if "error" in setting or query.get("return", {}).get(STREAM_CONTENT_PARAMETER) != parts:
        why = setting.get("error", {}).get("desc", "not reported by query-migrate-parameters")
        return Probe(False, f"{qemu.name} has no {STREAM_CONTENT_PARAMETER} parameter: {why}")
    return Probe(True)


def stream_content(vm: VM) -> tuple[StreamContent, ...] | None:
    """The VM's `stream-content-list`, None when unset (every part is sent)."""
    value = vm.migration_parameters().get(STREAM_CONTENT_PARAMETER)
    return None if value is None else tuple(StreamContent(part) for part in value)


def set_stream_content(vm: VM, parts: Iterable[StreamContent]) -> None:
    """Set `stream-content-list`; no parts restores the default (every part)."""
    vm.set_migration_parameters({STREAM_CONTENT_PARAMETER: [p.value for p in parts]})


def background_snapshot_parts(
    vm: VM, parts: Iterable[StreamContent], path: str | os.PathLike[str], timeout: float
) -> MigrationResult:
    """One background-snapshot pass carrying only `parts`, into the file `path`.

    QEMU reports the migration completed before the `exec:` command has written
    everything, so the command writes to `path` + ".part" and renames it when done;
    this waits for the rename. Once the pass succeeded, the parameter is reset to the
    default, so that a later migration of the same VM is whole unless asked otherwise
    (after a failure it stays set: the migration may still be ending). Raises `VMError`
    as `VM.background_snapshot` does (failure, or a run state that changed).
    """
    final = Path(path)
    part = final.with_name(final.name + ".part")
    command = f"cat > {shlex.quote(os.fspath(part))} && mv {shlex.quote(os.fspath(part))} "
    command += shlex.quote(os.fspath(final))
    deadline = time.monotonic() + timeout
    set_stream_content(vm, parts)
    result = vm.background_snapshot(f"exec:{command}", timeout)
    while not final.exists():
        if time.monotonic() > deadline:
            raise VMError(f"{vm.name}: {final} not complete within {timeout:g} s")
        time.sleep(0.02)
    set_stream_content(vm, ())
    return result
