#!/usr/bin/env python3
"""``qsnap revert --postcopy`` against precopy revert, for guests of several sizes.

For each size (default 256 MiB, 1 GiB, 2 GiB; a quarter of RAM filled with data): time
from migrate-incoming to the guest running (QMP RESUME), total time until postcopy
completes, the precopy revert time of the same image, and qsnap's page-request latency
p50/p99 while the guest runs.  Targets from issue 6: time to running <= 0.5 s and flat
(2 GiB / 256 MiB <= 1.5), p50 <= 1 ms, completion throughput >= 0.5 x precopy.
Numbers only: it never fails on time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench_revert import load_average, measure, qsnap_json, revert_uri, saved_guest, timed_load

from qsnap.harness.vm import VM

Row = tuple[int, float, float, float, dict[str, object]]


def bench_size(ram: int) -> Row:
    """(RAM, time to running, postcopy total, precopy total, qsnap's postcopy summary)."""
    with tempfile.TemporaryDirectory(prefix="bench-postcopy-") as tmp:
        work = Path(tmp)
        _, image, guest = saved_guest(work, ram, ram // 4)
        precopy, _, _ = measure(
            work, "precopy", lambda vm: timed_load(vm, revert_uri(image)), guest, ram
        )

        def postcopy(vm: VM) -> tuple[float, float | None]:
            vm.set_migration_capabilities({"postcopy-ram": True})
            return timed_load(vm, revert_uri(image, "--postcopy"), until_resume=True)

        total, running, vm = measure(work, "postcopy", postcopy, guest, ram, paused=False)
        return ram, running or 0.0, total, precopy, qsnap_json(vm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="256,1024,2048", help="guest RAM sizes, MiB")
    args = parser.parse_args()
    print(f"load average at the start: {load_average()}", flush=True)
    rows = []
    for ram in (int(s) for s in args.sizes.split(",")):
        row = bench_size(ram)
        _, running, total, precopy, summary = row
        rows.append(row)
        print(
            f"{ram:5d} MiB  running after {running:.3f} s  postcopy total {total:.3f} s  "
            f"precopy {precopy:.3f} s  requests {summary.get('requests')}  "
            f"p50 {summary.get('latency_p50_ms')} ms  p99 {summary.get('latency_p99_ms')} ms  "
            f"RUN sent at {summary.get('run_s')} s",
            flush=True,
        )
    if len(rows) > 1 and rows[0][1]:
        print(f"time to running, largest / smallest guest: {rows[-1][1] / rows[0][1]:.2f}")
    for ram, _, total, precopy, _ in rows:
        print(f"{ram:5d} MiB  postcopy completion throughput / precopy: {precopy / total:.2f}")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    os.environ.setdefault("QSNAP_ACCEL", "tcg")
    main()
