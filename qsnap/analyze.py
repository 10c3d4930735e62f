"""``qsnap analyze STREAM``: what a migration stream file holds, checked record by record.

For someone validating a migration patch: the configuration, the RAM blocks with their data,
zero, missing and repeated pages, the commands, where the device state starts and ends, and
the devices its vmdesc describes. QEMU's own destination does not check that every page
arrived; this does, and exits non-zero when a page is missing or the stream is malformed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

from qsnap.stream import StreamError, StreamOptions, StreamReader
from qsnap.stream import records as r

CHUNK = 1 << 20


@dataclass
class BlockSummary:
    """Page accounting of one RAM block: every page should arrive exactly once."""

    idstr: str
    used_length: int
    page_size: int
    data_pages: int = 0
    zero_pages: int = 0
    repeated_pages: int = 0
    missing_pages: int = 0
    first_missing: int | None = None
    _seen: bytearray = field(default_factory=bytearray, repr=False)

    def __post_init__(self) -> None:
        self._seen = bytearray(-(-self.used_length // self.page_size))

    def arrived(self, offset: int, zero: bool) -> None:
        index = offset // self.page_size
        if self._seen[index]:
            self.repeated_pages += 1
        self._seen[index] = 1
        if zero:
            self.zero_pages += 1
        else:
            self.data_pages += 1

    def close(self) -> None:
        self.missing_pages = self._seen.count(0)
        if self.missing_pages:
            self.first_missing = self._seen.index(0) * self.page_size


@dataclass
class StreamSummary:
    """The facts ``qsnap analyze`` reports (``--json`` prints them as they are)."""

    path: str
    size: int = 0
    machine_type: str = ""
    page_size: int = 0
    ram_section_id: int | None = None
    blocks: list[BlockSummary] = field(default_factory=list)
    commands: Counter[str] = field(default_factory=Counter)
    device_state_offset: int | None = None
    first_device_section: str | None = None
    eof_offset: int | None = None
    vmdesc_length: int | None = None
    devices: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def complete(self) -> bool:
        """Well-formed, with every page of every block exactly once."""
        return self.error is None and all(
            b.missing_pages == 0 and b.repeated_pages == 0 for b in self.blocks
        )

    def as_dict(self) -> dict[str, object]:
        blocks = [{k: v for k, v in asdict(b).items() if k != "_seen"} for b in self.blocks]
        data = {k: v for k, v in asdict(self).items() if k != "blocks"}
        return {
            **data,
            "blocks": blocks,
            "commands": dict(self.commands),
            "complete": self.complete,
        }


def analyze_stream(
    stream: BinaryIO, path: str, options: StreamOptions | None = None
) -> StreamSummary:
    """Read the whole stream once, in bounded chunks, and account for every record."""
    summary = StreamSummary(path=path)
    reader = StreamReader(options)
    blocks: dict[str, BlockSummary] = {}
    try:
        while chunk := stream.read(CHUNK):
            summary.size += len(chunk)
            reader.feed(chunk)
            for record in reader.records():
                _account(summary, blocks, reader, record)
        reader.close()
        for record in reader.records():
            _account(summary, blocks, reader, record)
    except StreamError as exc:
        summary.error = str(exc)
    for block in summary.blocks:
        block.close()
    end = reader.device_state_end if summary.error is None else None
    if end is not None:
        summary.eof_offset = end.eof_offset
        summary.vmdesc_length = end.vmdesc_length
        if end.vmdesc_length:
            stream.seek(end.eof_offset + 5 + 1)
            summary.devices = _devices(stream.read(end.vmdesc_length))
    return summary


def _account(
    summary: StreamSummary, blocks: dict[str, BlockSummary], reader: StreamReader, record: r.Record
) -> None:
    match record:
        case r.Configuration(machine=machine):
            summary.machine_type = machine
        case r.RamMemSize(blocks=infos):
            summary.page_size = reader.page_size
            summary.ram_section_id = reader.ram_section_id
            for info in infos:
                # Records address target pages, whatever the block's host page size.
                block = BlockSummary(info.idstr, info.used_length, reader.page_size)
                blocks[info.idstr] = block
                summary.blocks.append(block)
        case r.RamPage(block=name, offset=offset):
            blocks[name].arrived(offset, zero=False)
        case r.RamZero(block=name, offset=offset):
            blocks[name].arrived(offset, zero=True)
        case r.DeviceStateStart(offset=offset, section=section):
            summary.device_state_offset = offset
            summary.first_device_section = f"{section.idstr} (section {section.section_id})"
        case r.Eof():
            summary.eof_offset = reader.offset - 1
        case r.VmDescription(json=text):
            summary.vmdesc_length = len(text)
            summary.devices = _devices(text)
        case r.Command():
            summary.commands[r.COMMAND_NUMBERS[type(record)].name] += 1


def _devices(vmdesc: bytes) -> list[str]:
    """``name/instance (version N)`` of each device the vmdesc describes, in stream order."""
    try:
        description = json.loads(vmdesc)
        return [
            f"{d['name']}/{d['instance_id']} (version {d['version']})"
            for d in description.get("devices", [])
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"<vmdesc unreadable: {exc}>"]


def summary_text(s: StreamSummary) -> str:
    lines = [
        f"stream: {s.path} ({s.size} bytes)",
        f"machine type: {s.machine_type or '-'}; target page size: {s.page_size or '-'}",
        f"RAM section id: {s.ram_section_id if s.ram_section_id is not None else '-'}",
    ]
    for b in s.blocks:
        line = (
            f"  block {b.idstr}: {b.used_length} bytes, {b.data_pages} data + {b.zero_pages} zero"
            f" pages, {b.missing_pages} missing, {b.repeated_pages} repeated"
        )
        if b.first_missing is not None:
            line += f" (first missing at +{b.first_missing:#x})"
        lines.append(line)
    if s.commands:
        lines.append("commands: " + ", ".join(f"{k} x{v}" for k, v in sorted(s.commands.items())))
    if s.device_state_offset is not None:
        lines.append(
            f"device state: from byte {s.device_state_offset}, first {s.first_device_section}"
        )
    if s.eof_offset is not None:
        vmdesc = f"{s.vmdesc_length} bytes" if s.vmdesc_length is not None else "none"
        lines.append(f"EOF at byte {s.eof_offset}; vmdesc: {vmdesc}; {len(s.devices)} devices")
    lines.append(f"error: {s.error}" if s.error else f"complete: {'yes' if s.complete else 'no'}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stream", metavar="STREAM", type=Path, help="a migration stream file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--devices", action="store_true", help="also list the vmdesc devices")
    parser.add_argument(
        "--page-size", type=int, default=4096, help="target page size if the stream has none"
    )


def run(args: argparse.Namespace) -> int:
    try:
        with args.stream.open("rb") as stream:
            summary = analyze_stream(
                stream, str(args.stream), StreamOptions(page_size=args.page_size)
            )
    except OSError as exc:
        print(f"qsnap analyze: error: {args.stream}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary_text(summary))
        if args.devices:
            print("\n".join(f"  {d}" for d in summary.devices))
    if summary.error:
        print(f"qsnap analyze: error: {args.stream}: {summary.error}", file=sys.stderr)
    return 0 if summary.complete else 1
