#!/usr/bin/env python3
"""Parse a synthetic 1 GiB RAM stream (half data pages, half zero pages).

Prints page-payload throughput (guest memory described per second) and records
per second of qsnap.stream.StreamReader. Only parsing is timed: the stream is
generated section by section outside the timed region. Never fails on time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator

from qsnap.stream import RamEncoder, StreamReader, encode, encode_footer
from qsnap.stream import records as r

PAGE = 4096
BLOCK = "pc.ram"
SECTION_ID = 2


def _stream(guest_bytes: int, pages_per_section: int) -> Iterator[bytes]:
    yield encode(r.StreamHeader()) + encode(r.Configuration("pc-i440fx-10.0"))
    yield (
        encode(r.SectionStart(SECTION_ID, "ram", 0, 4))
        + encode(r.RamMemSize((r.RamBlockInfo(BLOCK, guest_bytes),)))
        + encode(r.RamEos())
        + encode_footer(SECTION_ID)
    )
    ram = RamEncoder(PAGE)
    data = os.urandom(PAGE)
    part = encode(r.SectionPart(SECTION_ID))
    tail = encode(r.RamEos()) + encode_footer(SECTION_ID)
    for first in range(0, guest_bytes, pages_per_section * PAGE):
        last = min(guest_bytes, first + pages_per_section * PAGE)
        body = [
            ram.page(BLOCK, off, data) if (off // PAGE) % 2 == 0 else ram.zero(BLOCK, off)
            for off in range(first, last, PAGE)
        ]
        yield part + b"".join(body) + tail
    yield encode(r.Eof())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1 << 20, help="feed() size in bytes")
    args = parser.parse_args()
    guest = args.size_mib << 20
    reader = StreamReader()
    parse_time = 0.0
    cpu_time = 0.0
    count = 0
    stream_bytes = 0
    pending = b""
    for section in _stream(guest, 512):
        pending += section
        if len(pending) < args.chunk:
            continue
        stream_bytes += len(pending)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(pending), args.chunk):
            reader.feed(pending[i : i + args.chunk])
            for _ in reader.records():
                count += 1
        parse_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
        pending = b""
    t0, c0 = time.perf_counter(), time.process_time()
    reader.feed(pending)
    count += sum(1 for _ in reader.records())
    reader.close()
    parse_time += time.perf_counter() - t0
    cpu_time += time.process_time() - c0
    stream_bytes += len(pending)
    print(f"guest memory      {guest >> 20} MiB (half data pages, half zero pages)")
    print(f"stream            {stream_bytes / 1e6:.1f} MB, {count} records")
    print(f"parse time        {parse_time:.3f} s wall, {cpu_time:.3f} s CPU")
    for label, seconds in (("wall", parse_time), ("CPU", cpu_time)):
        print(
            f"{label:4}  page payload {guest / seconds / 1e6:6.0f} MB/s"
            f" (data pages only {guest / 2 / seconds / 1e6:.0f} MB/s),"
            f" stream {stream_bytes / seconds / 1e6:.0f} MB/s,"
            f" {count / seconds / 1e6:.2f} M records/s"
        )


if __name__ == "__main__":
    main()
