#!/usr/bin/env python3
"""How long QEMU migrates a background snapshot into each of several ``exec:`` consumers.

One paused pattern guest; the consumers take turns for ``--rounds`` rounds, so that the
machine's drift affects them alike.  ``FILE`` and ``IMAGE`` in a command are replaced by
a scratch file and a fresh ``qsnap create`` image; ``python-readinto`` is a Python loop
that only reads the stream into one 1 MiB buffer (the floor for any consumer written in
Python).  Prints the best and median of QEMU's ``total-time`` (what the guest waits for)
per consumer, and the medians of QEMU's own CPU time and of its waits for the consumer
(``total-time`` minus that CPU).  Numbers only: it never fails on time.

    bench/bench_save_consumers.py 'cat > FILE' python-readinto 'qsnap save IMAGE'
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from bench_save import (
    QSNAP,
    Timing,
    fresh_bytecode,
    fresh_image,
    paused_pattern_guest,
    snapshot,
)

READINTO = (
    "import os, fcntl; fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, 1 << 20); buf = bytearray(1 << 20)\n"
    "while os.readv(0, [buf]): pass"
)


def expand(command: str, scratch: Path, image: Path) -> str:
    if command == "python-readinto":
        return shlex.join([sys.executable, "-c", READINTO])
    if command.startswith("qsnap "):
        command = shlex.quote(QSNAP) + command[len("qsnap") :] + " 2>/dev/null"
    return command.replace("FILE", shlex.quote(str(scratch))).replace(
        "IMAGE", shlex.quote(str(image))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commands", nargs="+", help="exec: commands (FILE, IMAGE replaced)")
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    times: dict[str, list[Timing]] = {c: [] for c in args.commands}
    fresh_bytecode()
    with tempfile.TemporaryDirectory(prefix="bench-consumers-") as tmp_dir:
        tmp = Path(tmp_dir)
        scratch, image = tmp / "stream.bin", tmp / "snap.qcow2"
        vm = paused_pattern_guest(args.memory_mib, tmp, args.timeout)
        try:
            for _ in range(args.rounds):
                for command in args.commands:
                    fresh_image(image, args.memory_mib)
                    timing = snapshot(vm, expand(command, scratch, image), tmp / "rc", args.timeout)
                    times[command].append(timing)
                    scratch.unlink(missing_ok=True)
        finally:
            vm.shutdown()
    print(f"QEMU migrating, {args.memory_mib} MiB paused pattern guest, {args.rounds} rounds")
    for command, timings in times.items():
        values = [t.source for t in timings]
        cpu = statistics.median(t.qemu_cpu for t in timings)
        waited = statistics.median(t.blocked for t in timings)
        print(
            f"best {min(values):6.3f} s  median {statistics.median(values):6.3f} s  "
            f"(all {' '.join(f'{v:.2f}' for v in values)})  QEMU CPU {cpu:.2f} s, "
            f"waited {waited:.2f} s  {command}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
