"""The on-disk format of a qsnap image (the only module that knows it).

See docs/image-format.md for the byte table.  The virtual disk holds, each region on a
1 MiB boundary: the header (first MiB), then the regions in arrival order.  Single pass or
RAM first: RAM blocks, page-digest table, device state (to the end of the disk).  Vmstate
first: device state, then RAM blocks and the digest table.  A page lives at
``block.image_offset + offset_in_block``; zero pages are never written.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum, IntFlag

import xxhash

from qsnap.image.errors import ImageTooSmall, NotAnImage

MAGIC = b"QSNAPIMG"
FORMAT_VERSION = 1
MiB = 1 << 20
ALIGN = MiB
HEADER_OFFSET = 0
HEADER_SIZE = MiB
CHECKSUM_SIZE = 32
PAGE_DIGEST_SIZE = 8

#: space ``qsnap create`` adds for RAM blocks besides main RAM (VGA VRAM, ROMs, ...)
EXTRA_BLOCKS_SIZE = 128 * MiB
DEFAULT_VMSTATE_SIZE = 64 * MiB

_FIXED = struct.Struct(">8sIIIIIIIIII QQQQQ 32s")
_BLOCK = struct.Struct(">BQQQQQQ")


class ImageState(IntEnum):
    """Header state; COMPLETE is written last, after every byte of data is flushed."""

    EMPTY = 0
    SAVING = 1
    COMPLETE = 2


class Pass(IntFlag):
    """Parts of a snapshot that have arrived (one pass may bring both)."""

    NONE = 0
    RAM = 1
    VMSTATE = 2


ALL_PASSES = Pass.RAM | Pass.VMSTATE


def pass_names(passes: Pass) -> list[str]:
    """``["ram", "vmstate"]`` for the parts set in ``passes``."""
    return [name for part, name in ((Pass.RAM, "ram"), (Pass.VMSTATE, "vmstate")) if passes & part]


class DigestAlgorithm(IntEnum):
    """Per-page digest; XXH3 costs ~1 us a page, BLAKE2b ~10x more (kept for reading)."""

    NONE = 0
    BLAKE2B_64 = 1  # hashlib.blake2b(page, digest_size=8)
    XXH3_64 = 2  # xxhash.xxh3_64_digest(page): big-endian 64-bit XXH3, seed 0


PageBuffer = bytes | bytearray | memoryview


def _blake2b_64(page: PageBuffer) -> bytes:
    return hashlib.blake2b(page, digest_size=PAGE_DIGEST_SIZE).digest()


_DIGESTERS: dict[DigestAlgorithm, Callable[[PageBuffer], bytes]] = {
    DigestAlgorithm.BLAKE2B_64: _blake2b_64,
    DigestAlgorithm.XXH3_64: xxhash.xxh3_64_digest,
}
DEFAULT_DIGEST = DigestAlgorithm.XXH3_64


def page_digester(algorithm: DigestAlgorithm) -> Callable[[PageBuffer], bytes]:
    try:
        return _DIGESTERS[algorithm]
    except KeyError:
        raise NotAnImage(f"image has no page digests (algorithm {algorithm.name})") from None


def page_digest(page: PageBuffer) -> bytes:
    return xxhash.xxh3_64_digest(page)


def round_up(value: int, align: int = ALIGN) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True)
class Region:
    offset: int = 0
    length: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class BlockEntry:
    """One RAMBlock: its MEM_SIZE fields, where it lives, how many pages hold data.

    ``page_size`` is the block's host page size when the stream carried it (postcopy),
    else 0; ``mr_addr`` is set only with x-ignore-shared.
    """

    idstr: str
    used_length: int
    image_offset: int = 0
    page_size: int = 0
    mr_addr: int | None = None
    data_pages: int = 0
    zero_pages: int = 0

    @property
    def region(self) -> Region:
        return Region(self.image_offset, self.used_length)


@dataclass(frozen=True)
class Header:
    """Everything the first MiB of the image says.

    ``prologue`` is the stream header and configuration verbatim; ``ram_setup`` the RAM
    START section verbatim (type byte to footer): with both a stream can be rebuilt
    byte-exactly, and postcopy can insert commands between them.
    ``device_sections_length`` is where EOF (+ vmdesc) starts inside the device state.
    """

    state: ImageState = ImageState.EMPTY
    passes: Pass = Pass.NONE
    page_size: int = 4096
    machine_type: str = ""
    prologue: bytes = b""
    ram_section_id: int = 0
    ram_instance_id: int = 0
    ram_version_id: int = 0
    ram_setup: bytes = b""
    blocks: tuple[BlockEntry, ...] = ()
    device_state: Region = Region()
    device_sections_length: int = 0
    device_state_digest: bytes = bytes(32)
    digests: Region = Region()
    digest_algorithm: DigestAlgorithm = DEFAULT_DIGEST

    @property
    def complete(self) -> bool:
        return self.state == ImageState.COMPLETE

    @property
    def missing(self) -> Pass:
        return ALL_PASSES & ~self.passes

    def block(self, idstr: str) -> BlockEntry:
        for block in self.blocks:
            if block.idstr == idstr:
                return block
        raise KeyError(idstr)

    def page_count(self, block: BlockEntry) -> int:
        return -(-block.used_length // self.page_size)

    def digest_index(self) -> dict[str, int]:
        """First digest-table entry of each block (blocks in table order)."""
        index: dict[str, int] = {}
        pos = 0
        for block in self.blocks:
            index[block.idstr] = pos
            pos += self.page_count(block)
        return index

    def with_(self, **changes: object) -> Header:
        return replace(self, **changes)  # type: ignore[arg-type]


# -- allocation ---------------------------------------------------------------------------


def place_blocks(blocks: Sequence[BlockEntry], base: int) -> tuple[tuple[BlockEntry, ...], int]:
    """Give each block its offset in MEM_SIZE order; return them and the first free byte."""
    placed = []
    pos = round_up(base)
    for block in blocks:
        placed.append(replace(block, image_offset=pos))
        pos = round_up(pos + block.used_length)
    return tuple(placed), pos


def digest_table_length(blocks: Sequence[BlockEntry], page_size: int) -> int:
    return sum(-(-b.used_length // page_size) for b in blocks) * PAGE_DIGEST_SIZE


def ram_layout(
    blocks: Sequence[BlockEntry], page_size: int, base: int
) -> tuple[tuple[BlockEntry, ...], Region, int]:
    """Blocks from ``base``, then the digest table; returns (blocks, digests, next free)."""
    placed, end = place_blocks(blocks, base)
    digests = Region(end, digest_table_length(blocks, page_size))
    return placed, digests, round_up(digests.end)


def check_fits(needed: int, size: int, what: str) -> None:
    if needed > size:
        raise ImageTooSmall(
            f"image too small: {what} needs a virtual size of at least {needed} bytes "
            f"({round_up(needed) // MiB} MiB), the image has {size}",
            round_up(needed),
        )


def create_size(ram_size: int, vmstate_size: int = DEFAULT_VMSTATE_SIZE) -> int:
    """Virtual size for ``qsnap create``: header, RAM (+ other blocks), digests, vmstate."""
    ram = round_up(ram_size) + EXTRA_BLOCKS_SIZE
    digests = round_up(ram // 4096 * PAGE_DIGEST_SIZE)
    return HEADER_SIZE + ram + digests + round_up(vmstate_size)


# -- header encoding ----------------------------------------------------------------------


def encode_header(header: Header) -> bytes:
    """The header bytes, checksum included; at most :data:`HEADER_SIZE`."""
    machine = header.machine_type.encode()
    body = bytearray()
    for blob in (machine, header.prologue, header.ram_setup):
        body += struct.pack(">I", len(blob)) + blob
    for block in header.blocks:
        idstr = block.idstr.encode()
        if not 1 <= len(idstr) <= 255:
            raise ValueError(f"RAM block id {block.idstr!r} is not 1..255 bytes")
        body += bytes([len(idstr)]) + idstr
        body += _BLOCK.pack(
            block.mr_addr is not None,
            block.used_length,
            block.page_size,
            block.mr_addr or 0,
            block.image_offset,
            block.data_pages,
            block.zero_pages,
        )
    length = _FIXED.size + len(body) + CHECKSUM_SIZE
    if length > HEADER_SIZE:
        raise ValueError(f"header of {length} bytes does not fit in {HEADER_SIZE}")
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        length,
        header.state,
        header.passes,
        header.page_size,
        len(header.blocks),
        header.ram_section_id,
        header.ram_instance_id,
        header.ram_version_id,
        header.digest_algorithm,
        header.device_state.offset,
        header.device_state.length,
        header.device_sections_length,
        header.digests.offset,
        header.digests.length,
        header.device_state_digest,
    )
    data = fixed + bytes(body)
    return data + hashlib.blake2b(data, digest_size=CHECKSUM_SIZE).digest()


def header_length(prefix: bytes) -> int:
    """Total header length from its first bytes (so a reader fetches just enough)."""
    if len(prefix) < 16:
        raise NotAnImage("not a qsnap image: header shorter than 16 bytes")
    _check_magic(prefix)
    length: int = struct.unpack_from(">I", prefix, 12)[0]
    if not _FIXED.size + CHECKSUM_SIZE <= length <= HEADER_SIZE:
        raise NotAnImage(f"corrupt qsnap header: length {length} out of range (byte 12)")
    return length


def _check_magic(data: bytes) -> None:
    magic = data[:8]
    if magic != MAGIC:
        if not any(data[:16]):
            raise NotAnImage("not a qsnap image: the header is empty (nothing saved yet)")
        raise NotAnImage(f"not a qsnap image: magic {magic!r} at byte 0, expected {MAGIC!r}")
    (version,) = struct.unpack_from(">I", data, 8)
    if version != FORMAT_VERSION:
        raise NotAnImage(f"unsupported qsnap image format version {version} (byte 8)")


class _Cursor:
    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise NotAnImage(f"corrupt qsnap header: {what} at byte {self.pos} runs past its end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def blob(self, what: str) -> bytes:
        (n,) = struct.unpack(">I", self.take(4, what))
        return self.take(n, what)


def decode_header(data: bytes) -> Header:
    """Parse and validate; every defect raises :class:`NotAnImage` naming the byte."""
    length = header_length(data)
    if len(data) < length:
        raise NotAnImage(f"corrupt qsnap header: {length} bytes announced, {len(data)} read")
    expected = hashlib.blake2b(data[: length - CHECKSUM_SIZE], digest_size=CHECKSUM_SIZE)
    if expected.digest() != data[length - CHECKSUM_SIZE : length]:
        raise NotAnImage(f"corrupt qsnap header: checksum mismatch (bytes 0..{length})")
    (
        _magic,
        _version,
        _length,
        state,
        passes,
        page_size,
        nblocks,
        section_id,
        instance_id,
        version_id,
        algorithm,
        ds_offset,
        ds_length,
        ds_sections,
        dg_offset,
        dg_length,
        ds_digest,
    ) = _FIXED.unpack_from(data)
    try:
        state_v = ImageState(state)
        algorithm_v = DigestAlgorithm(algorithm)
    except ValueError:
        raise NotAnImage(f"corrupt qsnap header: state {state} / digest {algorithm}") from None
    if passes & ~ALL_PASSES:
        raise NotAnImage(f"corrupt qsnap header: unknown passes {passes:#x} (byte 20)")
    if page_size < 512 or page_size & (page_size - 1):
        raise NotAnImage(f"corrupt qsnap header: page size {page_size} (byte 24)")
    cur = _Cursor(data, _FIXED.size, length - CHECKSUM_SIZE)
    machine = cur.blob("machine type")
    prologue = cur.blob("stream prologue")
    ram_setup = cur.blob("RAM setup section")
    blocks = []
    for i in range(nblocks):
        (idlen,) = cur.take(1, f"block {i} id length")
        idstr = cur.take(idlen, f"block {i} id").decode("utf-8", "replace")
        has_mr, used, bpage, mr_addr, offset, data_pages, zero_pages = _BLOCK.unpack(
            cur.take(_BLOCK.size, f"block {idstr!r}")
        )
        blocks.append(
            BlockEntry(
                idstr, used, offset, bpage, mr_addr if has_mr else None, data_pages, zero_pages
            )
        )
    if cur.pos != cur.end:
        raise NotAnImage(f"corrupt qsnap header: {cur.end - cur.pos} stray bytes at {cur.pos}")
    header = Header(
        state=state_v,
        passes=Pass(passes),
        page_size=page_size,
        machine_type=machine.decode("utf-8", "replace"),
        prologue=prologue,
        ram_section_id=section_id,
        ram_instance_id=instance_id,
        ram_version_id=version_id,
        ram_setup=ram_setup,
        blocks=tuple(blocks),
        device_state=Region(ds_offset, ds_length),
        device_sections_length=ds_sections,
        device_state_digest=ds_digest,
        digests=Region(dg_offset, dg_length),
        digest_algorithm=algorithm_v,
    )
    _check_regions(header)
    return header


def _check_regions(header: Header) -> None:
    """Regions must be aligned, past the header and disjoint (a header that decodes is sane)."""
    regions = [(f"block {b.idstr!r}", b.region) for b in header.blocks]
    if header.digests.length:
        regions.append(("digest table", header.digests))
    if header.device_state.offset:
        regions.append(("device state", header.device_state))
    if header.device_sections_length > header.device_state.length:
        raise NotAnImage("corrupt qsnap header: device sections longer than the device state")
    if header.blocks and header.digests.length != digest_table_length(
        header.blocks, header.page_size
    ):
        raise NotAnImage("corrupt qsnap header: digest table length does not match the blocks")
    last_name, last_end = "header", HEADER_SIZE
    for name, region in sorted(regions, key=lambda r: r[1].offset):
        if region.offset % ALIGN or region.offset < last_end:
            raise NotAnImage(
                f"corrupt qsnap header: {name} at {region.offset:#x} overlaps {last_name} "
                "or is not 1 MiB aligned"
            )
        last_name, last_end = name, region.end


def device_state_hasher() -> hashlib.blake2b:
    """Digest over the whole device-state region (stored in the header)."""
    return hashlib.blake2b(digest_size=32)
