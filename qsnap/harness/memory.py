"""Memory references: the exact content of every migratable RAM block, page by page.

A reference holds one short digest per target page of every RAM block QEMU migrates
(main RAM, VGA memory, option and firmware ROMs, ACPI tables...), so a comparison can
name each page that differs by block and offset while the reference itself stays small
(8 bytes per 4 KiB page). References come from a migration stream (`take_reference`
snapshots a paused VM with background-snapshot and parses the stream with qsnap.stream),
or from any iterable of pages (`reference_from_pages`), e.g. read back from an image.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qsnap.harness.vm import VM, RunState, VMError
from qsnap.stream import StreamError, StreamReader
from qsnap.stream.records import RamBlockInfo, RamMemSize, RamPage, RamZero

log = logging.getLogger(__name__)

DIGEST_SIZE = 8
"""blake2b-64 per page: a chance collision over a million pages is about 3e-8."""

READ_CHUNK = 1 << 20
MAIN_RAM = "pc.ram"
FLAT_LOW_RAM_LIMIT = 0xB0000000
"""Below this size (2.75 GiB) pc and q35 map all of main RAM at guest physical 0 (the
lowest threshold at which either machine splits RAM around the PCI hole)."""
LEGACY_HOLE = (0xA0000, 0x100000)
"""VGA window and BIOS shadow area: guest physical addresses there are not (only) RAM."""


class MemoryReferenceError(Exception):
    """A reference could not be made, or disagrees with QEMU's view of guest memory."""


def page_digest(data: bytes | memoryview) -> bytes:
    """The digest of one page as stored in a reference."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


@dataclass(frozen=True, slots=True)
class PageRef:
    """One page of one RAM block, printed as `block+0xoffset`."""

    block: str
    offset: int

    def __str__(self) -> str:
        return f"{self.block}+{self.offset:#x}"


@dataclass(frozen=True, slots=True)
class BlockDigests:
    """The digests of one RAM block: page `i` covers bytes `[i * page_size, ...)`."""

    idstr: str
    length: int
    page_size: int
    digests: bytes

    def __post_init__(self) -> None:
        if len(self.digests) != self.pages * DIGEST_SIZE:
            raise ValueError(
                f"{self.idstr}: {len(self.digests)} digest bytes for {self.pages} pages"
            )

    @property
    def pages(self) -> int:
        return -(-self.length // self.page_size)

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]


@dataclass(frozen=True, slots=True)
class MemoryReference:
    """Per-page digests of every RAM block, in the order QEMU lists the blocks."""

    blocks: tuple[BlockDigests, ...]

    def block(self, idstr: str) -> BlockDigests:
        for block in self.blocks:
            if block.idstr == idstr:
                return block
        raise KeyError(idstr)

    @property
    def pages(self) -> int:
        return sum(block.pages for block in self.blocks)

    def __str__(self) -> str:
        return f"{len(self.blocks)} blocks, {self.pages} pages"


class ReferenceBuilder:
    """Collects pages into a `MemoryReference`; a page given twice keeps the last one
    (as a destination does when precopy resends a dirty page)."""

    def __init__(self, blocks: Iterable[tuple[str, int]], page_size: int) -> None:
        self.page_size = page_size
        self._zero = page_digest(bytes(page_size))
        self._lengths: dict[str, int] = {}
        self._digests: dict[str, bytearray] = {}
        self._seen: dict[str, bytearray] = {}
        for idstr, length in blocks:
            if idstr in self._lengths:
                raise ValueError(f"RAM block {idstr!r} listed twice")
            pages = -(-length // page_size)
            self._lengths[idstr] = length
            self._digests[idstr] = bytearray(pages * DIGEST_SIZE)
            self._seen[idstr] = bytearray(pages)

    def _slot(self, block: str, offset: int) -> int:
        length = self._lengths.get(block)
        if length is None:
            raise MemoryReferenceError(f"{PageRef(block, offset)}: unknown RAM block")
        if offset % self.page_size or not 0 <= offset < length:
            raise MemoryReferenceError(
                f"{PageRef(block, offset)}: not a page offset of a block of {length:#x} bytes"
            )
        return offset // self.page_size

    def add_page(self, block: str, offset: int, data: bytes | memoryview) -> None:
        index = self._slot(block, offset)
        if len(data) != self.page_size:
            raise MemoryReferenceError(
                f"{PageRef(block, offset)}: {len(data)} bytes, expected {self.page_size}"
            )
        self._digests[block][index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = page_digest(data)
        self._seen[block][index] = 1

    def add_zero(self, block: str, offset: int) -> None:
        index = self._slot(block, offset)
        self._digests[block][index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = self._zero
        self._seen[block][index] = 1

    def missing(self) -> Iterator[PageRef]:
        """Pages never given, in block order."""
        for block, seen in self._seen.items():
            start = 0
            while (index := seen.find(0, start)) >= 0:
                yield PageRef(block, index * self.page_size)
                start = index + 1

    def build(self, missing_are_zero: bool = False) -> MemoryReference:
        """The reference; pages never given are an error unless `missing_are_zero`
        (as in an image, where zero pages are never written)."""
        if missing_are_zero:
            for ref in self.missing():
                self.add_zero(ref.block, ref.offset)
        else:
            absent = list(itertools.islice(self.missing(), 6))
            if absent:
                listed = ", ".join(str(ref) for ref in absent[:5])
                more = " ..." if len(absent) > 5 else ""
                raise MemoryReferenceError(f"pages never sent: {listed}{more}")
        return MemoryReference(
            tuple(
                BlockDigests(idstr, length, self.page_size, bytes(self._digests[idstr]))
                for idstr, length in self._lengths.items()
            )
        )


def reference_from_pages(
    blocks: Iterable[tuple[str, int]],
    pages: Iterable[tuple[str, int, bytes | memoryview | None]],
    page_size: int = 4096,
    missing_are_zero: bool = True,
) -> MemoryReference:
    """A reference from (block, offset, data) pages; `data` None is a zero page.

    `blocks` lists (idstr, length) in order. For sources that skip zero pages, such as
    a qsnap image, missing pages count as zero by default.
    """
    builder = ReferenceBuilder(blocks, page_size)
    for block, offset, data in pages:
        if data is None:
            builder.add_zero(block, offset)
        else:
            builder.add_page(block, offset, data)
    return builder.build(missing_are_zero)


def reference_from_stream(stream: BinaryIO, name: str = "stream") -> MemoryReference:
    """A reference from a migration stream read to its end (every page must be there).

    `name` is used in error messages (a file name). Memory use is bounded by the
    reader's buffer and the digests, whatever the guest size.
    """
    reader = StreamReader()
    builder: ReferenceBuilder | None = None
    try:
        while chunk := stream.read(READ_CHUNK):
            reader.feed(chunk)
            for record in reader.records():
                if isinstance(record, RamPage):
                    assert builder is not None
                    builder.add_page(record.block, record.offset, record.data)
                elif isinstance(record, RamZero):
                    assert builder is not None
                    builder.add_zero(record.block, record.offset)
                elif isinstance(record, RamMemSize):
                    builder = ReferenceBuilder(_block_list(record.blocks), reader.page_size)
        reader.close()
    except (StreamError, MemoryReferenceError) as exc:
        raise MemoryReferenceError(f"{name}: {exc}") from None
    if builder is None:
        raise MemoryReferenceError(f"{name}: no RAM block list in the stream")
    try:
        return builder.build()
    except MemoryReferenceError as exc:
        raise MemoryReferenceError(f"{name}: {exc}") from None


def _block_list(blocks: Sequence[RamBlockInfo]) -> list[tuple[str, int]]:
    return [(b.idstr, b.used_length) for b in blocks]


def reference_from_file(path: str | os.PathLike[str]) -> MemoryReference:
    """A reference from a migration stream file."""
    with open(path, "rb") as f:
        return reference_from_stream(f, os.fspath(path))


def take_reference(
    vm: VM,
    timeout: float = 300.0,
    stream_path: str | os.PathLike[str] | None = None,
    crosscheck: bool = True,
) -> MemoryReference:
    """The memory reference of a paused VM, through a background-snapshot migration.

    The VM must be paused (`stop`), not merely never started (`-S`): see the check below.

    Background-snapshot leaves the VM in its run state (a plain migration would leave it
    in postmigrate, where QEMU refuses further migrations). The stream goes to
    `stream_path` when given (kept, e.g. for analyze-migration), else to a temporary file.
    With `crosscheck`, main RAM is compared with QMP `pmemsave` (see `crosscheck_main_ram`).
    """
    state = vm.runstate()
    if state is RunState.PRELAUNCH:
        # QEMU 10.0 aborts: background-snapshot forces prelaunch -> paused, not allowed.
        raise MemoryReferenceError(
            f"{vm.name}: no background snapshot in prelaunch (QEMU aborts on the invalid "
            "transition prelaunch -> paused): cont and stop the guest first"
        )
    if state is not RunState.PAUSED:
        raise MemoryReferenceError(
            f"{vm.name}: a memory reference needs a paused guest, not {state.value}"
        )
    with tempfile.TemporaryDirectory(prefix="qsnap-ref-") as scratch:
        path = Path(stream_path) if stream_path is not None else Path(scratch) / "ref.stream"
        try:
            vm.background_snapshot_to_file(path, timeout)
        except VMError as exc:
            raise MemoryReferenceError(f"reference migration failed: {exc}") from None
        reference = reference_from_file(path)
        if crosscheck:
            crosscheck_main_ram(vm, reference, Path(scratch), timeout)
    log.info("%s: memory reference taken: %s", vm.name, reference)
    return reference


def crosscheck_main_ram(
    vm: VM,
    reference: MemoryReference,
    scratch_dir: Path,
    timeout: float = 300.0,
    block: str = MAIN_RAM,
    skip: Sequence[tuple[int, int]] = (LEGACY_HOLE,),
) -> None:
    """Check `block` of `reference` against guest physical memory read by `pmemsave`.

    This proves the stream parsing right independently of qsnap.stream. Guest physical
    addresses equal offsets in pc.ram only while all of it sits below the PCI hole: for
    pc and q35, guests smaller than 2.75 GiB; bigger guests are refused. The `skip`
    ranges (by default the VGA window and BIOS shadow area, which are not plain RAM)
    are not compared. On q35 a firmware that locks TSEG hides its top megabytes from
    pmemsave: skip them too. The guest must be paused. Raises `MemoryReferenceError`
    naming the pages that differ.
    """
    try:
        main = reference.block(block)
    except KeyError:
        raise MemoryReferenceError(f"{vm.name}: no RAM block {block!r} in the reference") from None
    if main.length >= FLAT_LOW_RAM_LIMIT:
        raise MemoryReferenceError(
            f"{vm.name}: cross-check needs {block} below {FLAT_LOW_RAM_LIMIT >> 20} MiB "
            f"(it has {main.length >> 20} MiB, split around the PCI hole)"
        )
    page = main.page_size
    bad: list[PageRef] = []
    for start, end in _complement(main.length, skip, page):
        dump = scratch_dir / f"pmemsave-{start:x}"
        vm.command_args(
            "pmemsave", {"val": start, "size": end - start, "filename": os.fspath(dump)}, timeout
        )
        with dump.open("rb") as f:
            offset = start
            while data := f.read(READ_CHUNK):
                bad += (PageRef(block, offset + at) for at in _mismatches(main, offset, data))
                offset += len(data)
        dump.unlink()
        if offset != end:
            raise MemoryReferenceError(f"{vm.name}: pmemsave wrote {offset - start:#x} bytes")
    if bad:
        listed = ", ".join(str(ref) for ref in bad[:8])
        pages = "1 page" if len(bad) == 1 else f"{len(bad)} pages"
        raise MemoryReferenceError(
            f"{vm.name}: pmemsave disagrees with the stream on {pages}: {listed}"
        )


def _mismatches(block: BlockDigests, offset: int, data: bytes) -> Iterator[int]:
    """Offsets in `data` (read at `offset` of `block`) of pages unlike the reference.

    Zero pages, most of a fresh guest, are compared as bytes rather than hashed.
    """
    page = block.page_size
    first, count = offset // page, -(-len(data) // page)
    expected = block.digests[first * DIGEST_SIZE : (first + count) * DIGEST_SIZE]
    zero_page = bytes(page)
    zero = page_digest(zero_page)
    if expected == zero * count and data == bytes(len(data)):
        return
    for index in range(count):
        want = expected[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]
        got = data[index * page : (index + 1) * page]
        if (got != zero_page) if want == zero else (page_digest(got) != want):
            yield index * page


def _complement(
    length: int, skip: Sequence[tuple[int, int]], page: int
) -> Iterator[tuple[int, int]]:
    """Page-aligned ranges of [0, length) outside `skip`."""
    position = 0
    for start, end in sorted(skip):
        start, end = start // page * page, -(-end // page) * page
        if start > position:
            yield position, min(start, length)
        position = max(position, end)
        if position >= length:
            return
    if position < length:
        yield position, length


@dataclass(frozen=True, slots=True)
class MemoryDiff:
    """What differs between a reference (`a`) and another memory image (`b`).

    `geometry` lists blocks present in both whose length or page size differ: their
    pages are not compared.
    """

    mismatches: tuple[PageRef, ...]
    missing_blocks: tuple[str, ...]
    extra_blocks: tuple[str, ...]
    geometry: tuple[str, ...]
    blocks: int
    pages: int

    @property
    def matches(self) -> bool:
        return not (self.mismatches or self.missing_blocks or self.extra_blocks or self.geometry)

    def summary(self, limit: int = 8) -> str:
        """One line: "memory matches reference: ..." or what differs, first pages named."""
        if self.matches:
            return f"memory matches reference: {self.blocks} blocks, {self.pages} pages"
        parts = []
        if self.mismatches:
            count = len(self.mismatches)
            listed = ", ".join(str(ref) for ref in self.mismatches[:limit])
            more = f" and {count - limit} more" if count > limit else ""
            verb = "page differs" if count == 1 else "pages differ"
            parts.append(f"{count} {verb}: {listed}{more}")
        parts += [f"block {name} missing" for name in self.missing_blocks]
        parts += [f"extra block {name}" for name in self.extra_blocks]
        parts += list(self.geometry)
        return "; ".join(parts)

    def __str__(self) -> str:
        return self.summary()


def compare(a: MemoryReference, b: MemoryReference) -> MemoryDiff:
    """Compare two references block by block and page by page (`a` is the expected one)."""
    b_blocks = {block.idstr: block for block in b.blocks}
    a_names = {block.idstr for block in a.blocks}
    mismatches: list[PageRef] = []
    geometry: list[str] = []
    blocks = pages = 0
    for block in a.blocks:
        other = b_blocks.get(block.idstr)
        if other is None:
            continue
        if (block.length, block.page_size) != (other.length, other.page_size):
            geometry.append(
                f"{block.idstr}: {block.length:#x} bytes in {block.page_size}-byte pages vs "
                f"{other.length:#x} in {other.page_size}-byte pages"
            )
            continue
        blocks += 1
        pages += block.pages
        if block.digests != other.digests:
            mismatches += _differing_pages(block, other)
    return MemoryDiff(
        mismatches=tuple(mismatches),
        missing_blocks=tuple(bl.idstr for bl in a.blocks if bl.idstr not in b_blocks),
        extra_blocks=tuple(bl.idstr for bl in b.blocks if bl.idstr not in a_names),
        geometry=tuple(geometry),
        blocks=blocks,
        pages=pages,
    )


def _differing_pages(a: BlockDigests, b: BlockDigests) -> Iterator[PageRef]:
    stride = 4096 * DIGEST_SIZE
    x, y = memoryview(a.digests), memoryview(b.digests)
    for chunk in range(0, len(x), stride):
        if x[chunk : chunk + stride] == y[chunk : chunk + stride]:
            continue
        for at in range(chunk, min(chunk + stride, len(x)), DIGEST_SIZE):
            if x[at : at + DIGEST_SIZE] != y[at : at + DIGEST_SIZE]:
                yield PageRef(a.idstr, at // DIGEST_SIZE * a.page_size)
