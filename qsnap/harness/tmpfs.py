"""A small tmpfs of its own, for the cases that need a filesystem to misbehave.

A full disk and a read-only filesystem cannot be faked with file modes when the tests run
as root (root ignores them): a tmpfs mounted for the test, sized in MiB and remountable
read-only, gives the real errors (ENOSPC, EROFS) without touching any other filesystem.
Mounting needs root; `TmpfsError` says so, and a test turns it into a skip or "not run"
with that reason.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0


class TmpfsError(Exception):
    """The tmpfs could not be mounted, remounted or unmounted; the message says why."""


class Tmpfs:
    """A tmpfs mounted at `path` (created if missing) while the context is active."""

    def __init__(self, path: str | os.PathLike[str], size_mib: int) -> None:
        self.path = Path(path)
        self.size_mib = size_mib
        self._mounted = False

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise TmpfsError("mounting a tmpfs needs root")
        self.path.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={self.size_mib}M,mode=0700", "tmpfs")
        self._mounted = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._mounted:
            self._mounted = False
            # Lazy: a process still holding a file there must not keep the mount alive.
            self._run("umount", "-l", os.fspath(self.path))

    def remount(self, *, size_mib: int | None = None, read_only: bool = False) -> None:
        """Change the size and/or make the filesystem read-only (or writable again)."""
        if size_mib is not None:
            self.size_mib = size_mib
        mode = "ro" if read_only else "rw"
        self._mount("-o", f"remount,{mode},size={self.size_mib}M")

    def used_bytes(self) -> int:
        """Bytes in use (what the files there hold, open but deleted ones included)."""
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _mount(self, *options: str) -> None:
        self._run("mount", *options, os.fspath(self.path))

    def _run(self, *argv: str) -> None:
        log.debug("%s", " ".join(argv))
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TmpfsError(f"{argv[0]} {self.path}: {exc}") from None
        if done.returncode != 0:
            message = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise TmpfsError(f"{argv[0]} {self.path}: {message[0]}")
