#!/usr/bin/env python3
"""``qsnap revert`` (precopy) against ``migrate_incoming "exec:cat FILE"``, same snapshot.

One linux guest is filled with data and snapshotted once to a raw stream file, which is
also saved into a qsnap image.  Each is then loaded into fresh ``-S`` destinations,
alternately, ``--repeat`` times (the machine is shared: the best of each is compared):
time from migrate-incoming to "completed", MiB/s of guest RAM, and the ratio of the two
throughputs (target >= 0.8).  Numbers only: it never fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qsnap.harness.guests import LinuxGuest
from qsnap.harness.vm import VM, MigrationStatus

MiB = 1 << 20
QSNAP = str(Path(sys.executable).with_name("qsnap"))


def saved_guest(work: Path, ram_mib: int, fill_mib: int) -> tuple[Path, Path, LinuxGuest]:
    """Boot the linux guest, fill ``fill_mib`` of it, snapshot to a raw file and an image."""
    guest = LinuxGuest.build()
    raw, image = work / "raw.stream", work / "snap.qcow2"
    src = VM(name="bench-src", memory_mib=ram_mib, log_dir=work)
    with guest.boot(src) as agent:
        agent.fill(fill_mib, seed=1)
        src.stop()
        src.background_snapshot_to_file(raw, 600)
    src.shutdown()
    subprocess.run([QSNAP, "create", str(image), "--ram-size", f"{ram_mib}M"], check=True)
    with raw.open("rb") as stream:
        subprocess.run([QSNAP, "save", str(image)], stdin=stream, check=True)
    return raw, image, guest


def destination(guest: LinuxGuest, ram_mib: int, work: Path, name: str, paused: bool = True) -> VM:
    vm = VM(name=name, memory_mib=ram_mib, incoming_defer=True, paused=paused, log_dir=work)
    guest.configure(vm)
    return vm.launch()


def timed_load(vm: VM, uri: str, until_resume: bool = False) -> tuple[float, float | None]:
    """Seconds from migrate-incoming to completed (and to the RESUME event, if asked).

    The end is QEMU's MIGRATION event: polling query-migrate every few ms would take CPU
    from the QEMU being measured (and from the command feeding it) on a small machine.
    """
    vm.set_migration_capabilities({"events": True})
    start = time.monotonic()
    vm.migrate_incoming(uri)
    resumed = None
    if until_resume:
        vm.wait_event("RESUME", timeout=600)
        resumed = time.monotonic() - start
    result = vm.await_migration_event(600)
    total = time.monotonic() - start
    if result.status is not MigrationStatus.COMPLETED:
        raise SystemExit(f"{vm.name}: {result}\n{vm.diagnostics()}")
    return total, resumed


def revert_uri(image: Path, *options: str) -> str:
    return "exec:" + shlex.join([QSNAP, "revert", "--json", *options, str(image)])


def qsnap_json(vm: VM) -> dict[str, object]:
    for line in reversed(vm.stderr_log.read_text().splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise SystemExit(f"{vm.name}: no qsnap --json summary\n{vm.diagnostics()}")


def measure(
    work: Path,
    name: str,
    load: Callable[[VM], tuple[float, float | None]],
    guest: LinuxGuest,
    ram_mib: int,
    paused: bool = True,
) -> tuple[float, float | None, VM]:
    vm = destination(guest, ram_mib, work, name, paused)
    try:
        total, resumed = load(vm)
    finally:
        vm.shutdown()
    return total, resumed, vm


def load_average() -> str:
    """The 1/5/15-minute load: the machine is shared, and the numbers mean little without it."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ram", type=int, default=1024, help="guest RAM, MiB")
    parser.add_argument("--fill", type=int, default=512, help="guest data written, MiB")
    parser.add_argument("--repeat", type=int, default=3, help="loads of each kind, alternated")
    args = parser.parse_args()
    start_load = load_average()
    cats: list[float] = []
    revs: list[float] = []
    own: list[object] = []
    with tempfile.TemporaryDirectory(prefix="bench-revert-") as tmp:
        work = Path(tmp)
        raw, image, guest = saved_guest(work, args.ram, args.fill)
        stream_mib = raw.stat().st_size / MiB
        for run in range(args.repeat):
            cat, _, _ = measure(
                work,
                f"cat{run}",
                lambda vm: timed_load(vm, f"exec:cat {shlex.quote(str(raw))}"),
                guest,
                args.ram,
            )
            rev, _, vm = measure(
                work, f"revert{run}", lambda vm: timed_load(vm, revert_uri(image)), guest, args.ram
            )
            cats.append(cat)
            revs.append(rev)
            own.append(qsnap_json(vm).get("seconds"))
        start = time.monotonic()
        subprocess.run([QSNAP, "revert", "--help"], capture_output=True, check=True)
        startup = time.monotonic() - start
    cat, rev = min(cats), min(revs)
    print(f"load average       {start_load} at the start, {load_average()} at the end")
    print(f"guest RAM          {args.ram} MiB, {args.fill} MiB filled, stream {stream_mib:.1f} MiB")
    print(
        f"exec:cat FILE      best {cat:.3f} s  {args.ram / cat:.1f} MiB/s of guest RAM  "
        f"(all: {', '.join(f'{t:.2f}' for t in cats)})"
    )
    print(
        f"qsnap revert       best {rev:.3f} s  {args.ram / rev:.1f} MiB/s of guest RAM  "
        f"(all: {', '.join(f'{t:.2f}' for t in revs)})"
    )
    print(f"qsnap own seconds  {', '.join(str(t) for t in own)} (image open to SHUT)")
    print(f"python start-up    {startup:.3f} s (qsnap revert --help), included above")
    print(f"ratio (qsnap/cat throughput, best of each)  {cat / rev:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    os.environ.setdefault("QSNAP_ACCEL", "tcg")
    main()
