#!/usr/bin/env python3
"""Where ``qsnap save`` spends its CPU, on a real stream replayed from a file.

The stream is a background snapshot of the paused pattern guest (``--capture``, once,
kept in the cache directory) or any stream file (``--stream``).  Each run pipes it
through ``cat`` into a real ``qsnap save --json`` (fresh image), and prints CPU seconds
per GiB of stream for qsnap and for its qemu-storage-daemon: CPU time, not wall time,
is what compares across runs on a shared machine.  ``--profile`` also saves it once
in-process under cProfile and prints the top costs.  Numbers only: never fails on time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qsnap.harness.guests import PatternGuest
from qsnap.harness.vm import VM
from qsnap.image.create import create_image
from qsnap.image.spec import parse_spec
from qsnap.save import save

GiB = 1 << 30
QSNAP = str(Path(sys.executable).with_name("qsnap"))


def cache_dir() -> Path:
    return Path(os.environ.get("QSNAP_CACHE") or Path.home() / ".cache" / "qsnap")


def capture(path: Path, memory_mib: int, timeout: float) -> None:
    """A background snapshot of the paused pattern guest into ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile-save-") as tmp:
        vm = VM(name="profile", memory_mib=memory_mib, log_dir=Path(tmp))
        try:
            PatternGuest.build().configure(vm)
            vm.launch()
            vm.wait_console(PatternGuest.MARKER.decode(), timeout=timeout)
            vm.stop()
            vm.background_snapshot_to_file(path, timeout)
        finally:
            vm.shutdown()


def run_cli(stream: Path, image: Path, memory_mib: int) -> dict[str, float]:
    """One ``cat STREAM | qsnap save --json IMAGE``; its JSON summary."""
    create_image(str(image), memory_mib << 20, 64 << 20)
    with open(stream, "rb") as src:
        cat = subprocess.Popen(["cat"], stdin=src, stdout=subprocess.PIPE)
        assert cat.stdout is not None
        proc = subprocess.run(
            [QSNAP, "save", "--json", str(image)],
            stdin=cat.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        cat.stdout.close()
        cat.wait(60)
    if proc.returncode:
        raise SystemExit(f"qsnap save failed: {proc.stderr.strip()}")
    summary: dict[str, float] = json.loads(proc.stderr.strip().splitlines()[-1])
    return summary


def file_reader(path: Path) -> Callable[[int], bytes]:
    f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed at EOF

    def read(n: int) -> bytes:
        data = f.read(n)
        if not data:
            f.close()
        return data

    return read


def in_process(stream: Path, image: Path, memory_mib: int, options: str) -> None:
    """One save in this process: user and system CPU, of qsnap and of the daemon."""
    create_image(str(image), memory_mib << 20, 64 << 20)
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = save(parse_spec(str(image) + options), read=file_reader(stream))
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    gib = result.stream_bytes / GiB
    print(
        f"in-process: {result.seconds:.2f} s wall; qsnap user "
        f"{(own.ru_utime - own0.ru_utime) / gib:.2f} + system "
        f"{(own.ru_stime - own0.ru_stime) / gib:.2f} CPU s/GiB; daemon user "
        f"{(kids.ru_utime - kids0.ru_utime) / gib:.2f} + system "
        f"{(kids.ru_stime - kids0.ru_stime) / gib:.2f} CPU s/GiB"
    )


def profile(stream: Path, image: Path, memory_mib: int, top: int) -> None:
    """cProfile on CPU time (wall time here mostly measures the other engineers)."""
    create_image(str(image), memory_mib << 20, 64 << 20)
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    save(parse_spec(str(image)), read=file_reader(stream))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", type=Path, help="stream file (default: a captured one)")
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also run under cProfile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--options", default="", help="appended to the image spec, e.g. ,cache.direct=on"
    )
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    stream = args.stream
    if stream is None:
        stream = cache_dir() / "bench" / f"pattern-{args.memory_mib}M.stream"
        if not stream.exists():
            capture(stream, args.memory_mib, args.timeout)
    size = stream.stat().st_size
    print(f"stream {stream} ({size / (1 << 20):.1f} MiB)")
    with tempfile.TemporaryDirectory(prefix="profile-save-") as tmp:
        image = Path(tmp) / "snap.qcow2"
        rows = []
        for n in range(args.runs):
            s = run_cli(stream, image, args.memory_mib)
            gib = s["stream_bytes"] / GiB
            rows.append((s["cpu_seconds"] / gib, s["daemon_cpu_seconds"] / gib))
            print(
                f"run {n + 1}: {s['seconds']:.2f} s wall, qsnap {rows[-1][0]:.2f} CPU s/GiB, "
                f"daemon {rows[-1][1]:.2f} CPU s/GiB, peak RSS {s['peak_rss_kib'] / 1024:.0f} MiB"
            )
        if rows:
            print(
                f"best: qsnap {min(r[0] for r in rows):.2f} CPU s/GiB, "
                f"daemon {min(r[1] for r in rows):.2f} CPU s/GiB"
            )
        in_process(stream, image, args.memory_mib, args.options)
        if args.profile:
            profile(stream, image, args.memory_mib, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
