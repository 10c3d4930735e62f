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
from collections.abc import Sequence
from pathlib import Path

from qsnap.harness.guests import PatternGuest
from qsnap.harness.vm import VM


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
    image: str | os.PathLike[str], keep_stream: str | os.PathLike[str] | None = None
) -> str:
    """`exec:qsnap save IMAGE`; with `keep_stream`, the stream is also written there (tee)."""
    save = shlex.join([qsnap_program(), "save", os.fspath(image)])
    if keep_stream is None:
        return f"exec:{save}"
    return f"exec:tee {shlex.quote(os.fspath(keep_stream))} | {save}"


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
