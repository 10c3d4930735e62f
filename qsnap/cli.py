"""Command line entry points (filled in by the save/revert work)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("qsnap: not implemented yet", file=sys.stderr)
    return 2


def qemu_snapshot_main(argv: list[str] | None = None) -> int:
    return main(argv)
