"""Watching processes the tests start, from /proc."""

from __future__ import annotations

import time
from pathlib import Path


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process `pid` ends (or is only a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
