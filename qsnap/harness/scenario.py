"""Building blocks of save and revert scenarios: the qsnap command as QEMU runs it.

The iotests use these (they run both from this repository and from a QEMU tree, where
only the installed qsnap package is importable), and so can any test or script that
drives `exec:qsnap save` / `exec:qsnap revert` through a real QEMU.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qsnap.harness.guests import PatternGuest
from qsnap.harness.vm import FINAL_STATUSES, VM, MigrationStatus, VMError, VMTimeout


def qsnap_program() -> str:
    """The `qsnap` command of this interpreter's environment (QEMU's PATH may lack it)."""
    beside = Path(sys.executable).parent / "qsnap"
    if beside.is_file():
        return os.fspath(beside)
    found = shutil.which("qsnap")
    if found is None:
        raise FileNotFoundError(f"no qsnap command beside {sys.executable} nor in PATH")
    return found


def save_uri(
    image: str | os.PathLike[str],
    *options: str,
    keep_stream: str | os.PathLike[str] | None = None,
    exit_status: str | os.PathLike[str] | None = None,
    stderr: str | os.PathLike[str] | None = None,
) -> str:
    """`exec:qsnap save [OPTIONS] IMAGE`.

    With `keep_stream`, the stream is also written there (tee). With `exit_status`, qsnap's
    exit status is written to that file when it exits (see `wait_exit_status`): QEMU may
    report the migration completed while the command is still finishing its work. With
    `stderr`, qsnap's messages are appended to that file instead of QEMU's stderr.
    """
    command = shlex.join([qsnap_program(), "save", *options, os.fspath(image)])
    if stderr is not None:
        command += f" 2>>{shlex.quote(os.fspath(stderr))}"
    if keep_stream is not None:
        command = f"tee {shlex.quote(os.fspath(keep_stream))} | {command}"
    if exit_status is not None:
        # A status left by an earlier run would be taken for this save's.
        Path(exit_status).unlink(missing_ok=True)
        final = shlex.quote(os.fspath(exit_status))
        part = shlex.quote(os.fspath(exit_status) + ".part")
        command = f"{command}; echo $? > {part} && mv {part} {final}"
    return f"exec:{command}"


def wait_exit_status(path: str | os.PathLike[str], timeout: float) -> int:
    """The exit status a `save_uri(..., exit_status=path)` command wrote, once it exists."""
    status = Path(path)
    deadline = time.monotonic() + timeout
    while not status.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{status}: qsnap did not exit within {timeout:g} s")
        time.sleep(0.02)
    return int(status.read_text().strip())


def start_throttled_save(vm: VM, uri: str, *, bandwidth: int, started: int, timeout: float) -> None:
    """Start a background snapshot of `vm` into `uri` and return while it is still running.

    `max-bandwidth` (bytes/s) slows the migration down and the call returns once `started`
    bytes of RAM went out, so that a failure case (QEMU killed, `migrate_cancel`) can cut
    the save short in the middle of the RAM, where a real interruption is most likely.
    """
    vm.set_migration_capabilities({"background-snapshot": True})
    vm.set_migration_parameters({"max-bandwidth": bandwidth})
    vm.migrate(uri)
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate()
        if info.get("ram", {}).get("transferred", 0) >= started:
            return
        status = MigrationStatus(info.get("status", "none"))
        if status in FINAL_STATUSES:
            raise VMError(f"{vm.name}: migration {status.value} before {started} bytes were sent")
        if time.monotonic() > deadline:
            raise VMTimeout(f"{vm.name}: fewer than {started} bytes sent within {timeout:g} s")
        time.sleep(0.05)


def revert_uri(image: str | os.PathLike[str], *options: str) -> str:
    """`exec:qsnap revert [OPTIONS] IMAGE`, for `migrate-incoming`."""
    return "exec:" + shlex.join([qsnap_program(), "revert", *options, os.fspath(image)])


def pattern_vm(
    name: str,
    *,
    qemu: str | os.PathLike[str] | None = None,
    memory_mib: int = 128,
    machine: str = "pc",
    smp: int = 1,
    incoming: bool = False,
    paused: bool | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
) -> VM:
    """A VM (not launched) booting the pattern guest; `incoming` makes it a revert target.

    A revert target is paused (`-S`) unless `paused=False` asks for it to run as soon as
    the migration lets it.
    """
    vm = VM(
        qemu=qemu,
        memory_mib=memory_mib,
        machine=machine,
        smp=smp,
        name=name,
        log_dir=log_dir,
        args=args,
        incoming_defer=incoming,
        paused=incoming if paused is None else paused,
    )
    PatternGuest.build().configure(vm)
    return vm
