"""The project's own set-up scripts (ci/, vm-images/) as the harness runs them.

Each of them builds or fetches something into the cache, idempotently, and prints the path
of the result on its last line of stdout; logs go to stderr.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parents[2]
"""The qsnap source tree this package runs from (its ci/ and vm-images/ scripts)."""


class ScriptError(Exception):
    """A set-up script failed, hung, or printed no path; the text names it and says why."""


def run_for_path(argv: Sequence[str | os.PathLike[str]], timeout: float) -> Path:
    """Run a script that prints a path last; return that path (not checked further)."""
    command = " ".join(os.fspath(arg) for arg in argv)
    try:
        done = subprocess.run(
            [os.fspath(arg) for arg in argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ScriptError(f"{command}: still running after {timeout:g} s") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise ScriptError(f"{command}: exit status {done.returncode}: {tail[0]}")
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise ScriptError(f"{command}: printed no path")
    return Path(lines[-1])
