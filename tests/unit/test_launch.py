"""The console scripts start the read-ahead for saves only, before the heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import qsnap.read_ahead

def start(fd=0, limit=0):
    heavy = ("argparse", "logging", "qsnap.cli", "qsnap.save", "qsnap.image.daemon")
    print("read-ahead, loaded:", json.dumps([m for m in heavy if m in sys.modules]))
    raise SystemExit(0)

qsnap.read_ahead.ReadAhead.start = start
sys.argv = sys.argv[1:]
from qsnap import launch
getattr(launch, sys.argv.pop(1))()
"""


def launch(entry: str, *argv: str) -> str:
    """Run an entry point of qsnap.launch with stdin a pipe: the heavy modules loaded
    when the read-ahead started, or what the command printed without one."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "qsnap", entry, *argv],
        input=b"",
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.stdout.decode().splitlines()[0] if done.stdout else done.stderr.decode()


@pytest.mark.parametrize(
    ("entry", "argv"),
    [
        ("main", ["save", "img.qcow2"]),
        ("main", ["-v", "save", "--json", "img.qcow2"]),
        ("qemu_snapshot_main", ["img.qcow2"]),
        ("qemu_snapshot_main", ["--save-vmstate", "img.qcow2"]),
    ],
)
def test_a_save_forks_the_read_ahead_before_the_command_line_loads(
    entry: str, argv: list[str]
) -> None:
    assert launch(entry, *argv) == "read-ahead, loaded: []"


@pytest.mark.parametrize(
    ("entry", "argv"),
    [
        ("main", ["info", "img.qcow2"]),
        ("main", ["save", "--help"]),
        ("qemu_snapshot_main", ["-r", "img.qcow2"]),
        ("qemu_snapshot_main", ["--revert", "--postcopy", "img.qcow2"]),
    ],
)
def test_other_commands_leave_stdin_alone(entry: str, argv: list[str]) -> None:
    assert not launch(entry, *argv).startswith("read-ahead")


def test_a_save_without_stdin_says_so() -> None:
    """With fd 0 closed, the first file qsnap opened became its "stdin"."""
    code = "import sys; from qsnap.launch import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "save", "img.qcow2"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "qsnap save: error: stdin is closed: pipe a migration stream into it (exec:)\n"
    )
