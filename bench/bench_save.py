#!/usr/bin/env python3
"""``qsnap save`` against ``exec:cat > FILE`` on the same paused pattern guest.

Prints, for one guest in one run: the time and MiB/s of a background snapshot into
``qsnap save`` and into ``cat``, their ratio (qsnap / cat throughput), the host file
size of the image against the guest's non-zero RAM, and qsnap's peak RSS.  Numbers only:
it never fails on time.  Targets from issue 4: ratio >= 0.8, file <= 1.15 x non-zero
data + 16 MiB, peak RSS <= 100 MiB for a 2 GiB guest.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from qsnap.harness.guests import PatternGuest
from qsnap.harness.vm import VM

MiB = 1 << 20
QSNAP = str(Path(sys.executable).with_name("qsnap"))


def snapshot(vm: VM, command: str, status: Path, timeout: float) -> float:
    """Seconds until the exec: command has exited (QEMU says completed a bit earlier)."""
    status.unlink(missing_ok=True)
    start = time.monotonic()
    vm.background_snapshot(f"exec:{command}; echo $? >{shlex.quote(str(status))}", timeout)
    while not (status.exists() and status.read_text().endswith("\n")):
        if time.monotonic() - start > timeout:
            raise SystemExit(f"{command}: did not exit")
        time.sleep(0.005)
    elapsed = time.monotonic() - start
    if status.read_text() != "0\n":
        raise SystemExit(f"{command}: exit status {status.read_text().strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-save-") as tmp_dir:
        tmp = Path(tmp_dir)
        vm = VM(name="bench", memory_mib=args.memory_mib, log_dir=tmp)
        try:
            PatternGuest.build().configure(vm)
            vm.launch()
            vm.wait_console(PatternGuest.MARKER.decode(), timeout=args.timeout)
            vm.stop()
            cat_times, save_times = [], []
            raw = tmp / "raw.bin"
            image = tmp / "snap.qcow2"
            summary: dict[str, float] = {}
            for _ in range(args.rounds):
                raw.unlink(missing_ok=True)
                cat = f"cat > {shlex.quote(str(raw))}"
                cat_times.append(snapshot(vm, cat, tmp / "rc", args.timeout))
                stream_bytes = raw.stat().st_size
                raw.unlink()
                image.unlink(missing_ok=True)
                os.system(f"{shlex.quote(QSNAP)} create {shlex.quote(str(image))} "
                          f"--ram-size {args.memory_mib}M >/dev/null")  # fmt: skip
                err = tmp / "save.json"
                cmd = (f"{shlex.quote(QSNAP)} save --json {shlex.quote(str(image))} "
                       f"2>{shlex.quote(str(err))}")  # fmt: skip
                save_times.append(snapshot(vm, cmd, tmp / "rc", args.timeout))
                summary = json.loads(err.read_text())
        finally:
            vm.shutdown()
        cat_t, save_t = min(cat_times), min(save_times)
        cat_rate = stream_bytes / MiB / cat_t
        save_rate = summary["stream_bytes"] / MiB / save_t
        nonzero = summary["data_pages"] * 4096
        host = image.stat().st_blocks * 512
        print(f"guest RAM              {args.memory_mib} MiB (pattern guest, paused)")
        print(f"stream                 {stream_bytes / MiB:.1f} MiB")
        print(f"exec:cat > FILE        {cat_t:.2f} s  {cat_rate:.1f} MiB/s")
        print(f"exec:qsnap save        {save_t:.2f} s  {save_rate:.1f} MiB/s")
        print(f"ratio qsnap/cat        {save_rate / cat_rate:.2f}")
        print(f"non-zero RAM           {nonzero / MiB:.1f} MiB")
        print(f"image host file        {host / MiB:.1f} MiB  ({host / max(nonzero, 1):.3f} x)")
        print(f"qsnap peak RSS         {summary['peak_rss_kib'] / 1024:.1f} MiB")
        gib = summary["stream_bytes"] / (1 << 30)
        print(f"qsnap CPU              {summary['cpu_seconds'] / gib:.2f} s per GiB of stream")
        print(f"storage daemon CPU     {summary['daemon_cpu_seconds'] / gib:.2f} s per GiB")
        print(f"load average           {os.getloadavg()[0]:.1f} (CPU time is what to compare)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
