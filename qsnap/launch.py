"""The console scripts: the migration stream is taken off stdin before qsnap loads.

QEMU writes the stream as soon as it has started ``exec:qsnap save``, and waits on a
64 KiB pipe, the guest's memory write-protected, until something reads.  Importing the
command line (argparse, logging, the subcommands' helpers) took 30-50 ms of that wait,
``cat`` starts reading within 4 ms.  So nothing is imported here before the read-ahead
child is forked but what the interpreter has loaded anyway and :mod:`qsnap.read_ahead`
(C modules only).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qsnap.read_ahead import ReadAhead


def command_of(argv: list[str]) -> str | None:
    """The subcommand of a ``qsnap`` command line: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _read_ahead(saving: bool, argv: list[str]) -> ReadAhead | None:
    if not saving or "-h" in argv or "--help" in argv or sys.stdin is None or os.isatty(0):
        return None  # (no stdin at all: fd 0 may be anything qsnap opens next)
    from qsnap.read_ahead import ReadAhead

    return ReadAhead.start(0)


def main() -> int:
    """``qsnap``."""
    argv = sys.argv[1:]
    ahead = _read_ahead(command_of(argv) == "save", argv)
    from qsnap.cli import main as run

    return run(argv, ahead=ahead)


def qemu_snapshot_main() -> int:
    """``qemu-snapshot``: a save unless ``-r``/``--revert``."""
    argv = sys.argv[1:]
    ahead = _read_ahead(not {"-r", "--revert"} & set(argv), argv)
    from qsnap.cli import qemu_snapshot_main as run

    return run(argv, ahead=ahead)
