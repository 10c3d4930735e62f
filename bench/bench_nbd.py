#!/usr/bin/env python3
"""The NBD client against qemu-storage-daemon (qcow2, 1 MiB clusters): numbers only.

Sequential 1 MiB writes with a window of 1/8/16 requests in flight, sequential 1 MiB
reads likewise, and 4 KiB random reads one at a time (round-trip latency).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

from qsnap.image.daemon import StorageDaemon
from qsnap.image.nbd import NbdClient
from qsnap.image.spec import parse_spec

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    size = args.size_mib * MiB
    data = os.urandom(MiB)
    with tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp:
        for window in (1, 8, 16):
            path = os.path.join(tmp, f"w{window}.qcow2")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 "cluster_size=1M,preallocation=off,refcount_bits=8", path, str(size)],
                check=True,
            )  # fmt: skip
            with (
                StorageDaemon(parse_spec(path), writable=True) as daemon,
                NbdClient.connect(daemon.socket_path, daemon.export_name, window=window) as c,
            ):
                start = time.monotonic()
                for off in range(0, size, MiB):
                    c.submit_write(off, data)
                c.drain()
                c.flush()
                write_t = time.monotonic() - start
                start = time.monotonic()
                pending: list[int] = []
                for off in range(0, size, MiB):
                    if len(pending) >= window:
                        c.wait_read(pending.pop(0))
                    pending.append(c.submit_read(off, MiB))
                for cookie in pending:
                    c.wait_read(cookie)
                read_t = time.monotonic() - start
                rng = random.Random(1)
                n = 2000
                start = time.monotonic()
                for _ in range(n):
                    c.read(rng.randrange(size // 4096) * 4096, 4096)
                lat = (time.monotonic() - start) / n
            host = os.stat(path).st_blocks * 512
            print(
                f"window {window:2d}: write {args.size_mib / write_t:7.1f} MiB/s  "
                f"read {args.size_mib / read_t:7.1f} MiB/s  "
                f"4K random read {lat * 1e6:6.1f} us  host file {host / MiB:.1f} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
