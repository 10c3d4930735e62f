"""``ImageWriter``: the save side of an image, one pass at a time.

The writer decides where a pass goes (first pass: zero the whole disk; second pass of a
two-pass save: zero only its own region), coalesces contiguous pages into large writes
with several in flight, streams the device state in bounded chunks, keeps per-page
digests, and marks the image COMPLETE only after everything else is flushed.  Any
exception leaves the header at SAVING, so a failed save is never mistaken for a good one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from qsnap.image import layout
from qsnap.image.errors import ImageError, NotAnImage
from qsnap.image.layout import ALL_PASSES, BlockEntry, Header, ImageState, Pass, Region
from qsnap.image.snapshot import SnapshotImage, describe_incomplete

log = logging.getLogger(__name__)

MAX_WRITE = 2 * layout.MiB
DIGEST_SIZE = layout.PAGE_DIGEST_SIZE
MAX_PARTS = 512  # iovecs per write, well under IOV_MAX (1024)
ZERO_CHUNK = 1 << 30


class PassMismatch(ImageError):
    """A second pass does not fit the first (other machine, or a part twice)."""


@dataclass(frozen=True)
class StreamPrologue:
    """What every pass brings from its stream head."""

    prologue: bytes
    machine_type: str
    page_size: int


@dataclass(frozen=True)
class RamSetup:
    """The RAM START section of a stream, verbatim, and its block list."""

    section_id: int
    instance_id: int
    version_id: int
    raw: bytes
    blocks: tuple[BlockEntry, ...]


@dataclass
class WriteStats:
    data_pages: int = 0
    zero_pages: int = 0
    device_state_bytes: int = 0
    written_bytes: int = 0
    in_place_pages: int = 0  # read from the stream straight into shared memory


@dataclass(frozen=True)
class LentPages:
    """A slot of memory shared with the daemon, for data pages of ``block`` from ``offset``.

    ``room`` pages fit (the slot's size, or what is left of the block).
    """

    block: str
    offset: int
    page_size: int
    slot: int
    memory: memoryview
    room: int


class _BlockState:
    """Per block during a save: its entry, first digest slot, and which pages hold data.

    ``written`` has one byte per page (1: data written), not one bit: a run of pages is
    then checked and marked by slices, at C speed (512 KiB for a 2 GiB block).
    """

    __slots__ = ("digest_base", "entry", "written")

    def __init__(self, entry: BlockEntry, digest_base: int, pages: int) -> None:
        self.entry = entry
        self.digest_base = digest_base
        self.written = bytearray(pages)


class ImageWriter:
    """Write one pass into an image opened writable.

    Call :meth:`start_ram` and/or :meth:`start_device_state` (in stream order), feed
    :meth:`page`/:meth:`zero`/:meth:`device_state`, then :meth:`finish`.
    """

    def __init__(self, image: SnapshotImage, *, max_write: int = MAX_WRITE) -> None:
        if not image.writable:
            raise ImageError("image opened read-only")
        self.image = image
        self.client = image.client
        self.stats = WriteStats()
        self._max_write = max_write
        try:
            self.previous: Header | None = image.read_header()
        except NotAnImage:
            self.previous = None
        if self.previous is not None and self.previous.complete:
            # Being replaced: from now on a failed save must not leave the old snapshot
            # looking like the result.
            self.previous = self.previous.with_(state=ImageState.SAVING, passes=Pass.NONE)
            image.write_header(self.previous)
            self.client.flush()
        self.header: Header | None = None
        self._passes = Pass.NONE  # parts this stream has brought
        self._blocks: dict[str, _BlockState] = {}
        self._digests = bytearray()
        self._parts: list[bytes | memoryview] = []
        self._buf_len = 0
        self._buf_start = 0
        self._ds = Region()
        self._ds_hasher = layout.device_state_hasher()
        self._zero_digest = b""
        self._digest: Callable[[layout.PageBuffer], bytes] = layout.page_digest

    # -- pass placement -----------------------------------------------------------------

    def _second_pass_of(self, part: Pass, head: StreamPrologue) -> Header | None:
        """The previous header if this stream completes it, else None (a fresh save)."""
        prev = self.previous
        if prev is None or prev.state != ImageState.SAVING or prev.passes != ALL_PASSES & ~part:
            return None
        if prev.prologue != head.prologue:
            raise PassMismatch(
                f"this pass does not belong to the saved one: stream prologue differs "
                f"(machine {head.machine_type!r}, image has {prev.machine_type!r})"
            )
        if prev.page_size != head.page_size:
            raise PassMismatch(
                f"page size {head.page_size} differs from the saved pass ({prev.page_size})"
            )
        return prev

    def _zero_from(self, start: int) -> None:
        """Zero ``[start, end of disk)``: may-trim, so qcow2 only marks clusters zero."""
        pos, end = start, self.client.size
        while pos < end:
            n = min(ZERO_CHUNK, end - pos)
            self.client.submit_write_zeroes(pos, n)
            pos += n
        self.client.drain()

    def _begin(self, header: Header, zero_from: int) -> None:
        """Zero, write the SAVING header, flush: data written later cannot land under an
        older header (NBD and qcow2 order nothing before a flush), and a save that fails
        later leaves that header on disk however the daemon ends."""
        log.debug("pass starts; zeroing from %#x", zero_from)
        self._zero_from(zero_from)
        self.image.write_header(header)
        self.image.flush()
        self.header = header

    def start_ram(self, head: StreamPrologue, setup: RamSetup) -> None:
        """The RAM setup arrived: place the blocks, check the fit, mark the image SAVING."""
        size = self.client.size
        prev = self._second_pass_of(Pass.RAM, head)
        if prev is not None:
            base = layout.round_up(prev.device_state.end)
            blocks, digests, end = layout.ram_layout(setup.blocks, head.page_size, base)
            layout.check_fits(end, size, "the RAM")
            header = prev
            zero_from = base
        else:
            blocks, digests, end = layout.ram_layout(
                setup.blocks, head.page_size, layout.HEADER_SIZE
            )
            layout.check_fits(end, size, "the RAM and its digest table")
            header = Header(
                state=ImageState.SAVING,
                page_size=head.page_size,
                machine_type=head.machine_type,
                prologue=head.prologue,
                device_state=Region(end, 0),
            )
            zero_from = 0
        header = header.with_(
            ram_section_id=setup.section_id,
            ram_instance_id=setup.instance_id,
            ram_version_id=setup.version_id,
            ram_setup=setup.raw,
            blocks=blocks,
            digests=digests,
        )
        self._begin(header, zero_from)
        self._passes |= Pass.RAM
        self._digest = layout.page_digester(header.digest_algorithm)
        self._zero_digest = self._digest(bytes(head.page_size))
        pos = 0
        for entry in blocks:
            pages = header.page_count(entry)
            self._blocks[entry.idstr] = _BlockState(entry, pos, pages)
            pos += pages
        self._digests = bytearray(self._zero_digest * pos)

    def start_device_state(self, head: StreamPrologue) -> None:
        """Device state begins; in a RAM stream it follows the RAM, else it is its own pass."""
        if self._passes & Pass.RAM:
            assert self.header is not None
            if self.header.passes & Pass.VMSTATE:
                raise PassMismatch(
                    "the stream carries device state, but the image already holds the "
                    "device state of a --save-vmstate pass (expected a RAM-only stream)"
                )
            self._flush_buffer()
            self._ds = Region(self.header.device_state.offset, 0)
        else:
            prev = self._second_pass_of(Pass.VMSTATE, head)
            if prev is not None:
                header = prev
                start = prev.device_state.offset
            else:
                start = layout.HEADER_SIZE
                header = Header(
                    state=ImageState.SAVING,
                    page_size=head.page_size,
                    machine_type=head.machine_type,
                    prologue=head.prologue,
                    device_state=Region(start, 0),
                    digests=Region(),
                )
            layout.check_fits(start, self.client.size, "the device state")
            self._begin(header, start if prev is not None else 0)
            self._ds = Region(start, 0)
        self._passes |= Pass.VMSTATE

    # -- data ---------------------------------------------------------------------------

    def _flush_buffer(self) -> None:
        if self._buf_len:
            self.image.submit_writev(self._buf_start, self._parts, self._buf_len)
            self.stats.written_bytes += self._buf_len
            self._buf_len = 0
            self._parts = []

    def _append(self, image_offset: int, data: bytes | memoryview) -> None:
        """Queue ``data`` (kept by reference, never copied: callers must not reuse it)."""
        n = len(data)
        if n > self._max_write:
            view = memoryview(data)
            for pos in range(0, n, self._max_write):
                self._append(image_offset + pos, view[pos : pos + self._max_write])
            return
        if self._buf_len and (
            image_offset != self._buf_start + self._buf_len
            or self._buf_len + n > self._max_write
            or len(self._parts) >= MAX_PARTS
        ):
            self._flush_buffer()
        if not self._buf_len:
            self._buf_start = image_offset
        self._parts.append(data)
        self._buf_len += n
        if self._buf_len >= self._max_write:
            self._flush_buffer()

    def _locate(self, block: str, offset: int, page_size: int, count: int = 1) -> _BlockState:
        state = self._blocks.get(block)
        if state is None:
            raise ImageError(f"page of unknown RAM block {block!r} at offset {offset:#x}")
        if (
            not page_size
            or offset % page_size
            or offset + count * page_size > state.entry.used_length
        ):
            raise ImageError(
                f"page at offset {offset:#x} of RAM block {block!r} is outside the block "
                f"(length {state.entry.used_length:#x}) or not page aligned"
            )
        return state

    def page(self, block: str, offset: int, data: bytes | memoryview) -> None:
        """Store a data page; contiguous pages become one write."""
        self.pages(block, offset, (data,))

    def pages(self, block: str, offset: int, pages: Sequence[bytes | memoryview]) -> None:
        """Store data pages at consecutive offsets from ``offset``, all of one size.

        The pages are kept by reference until written (callers must not reuse them);
        the bookkeeping of a run (digests, written map) is done by slices, not per page.
        """
        count = len(pages)
        if not count:
            return
        page_size = len(pages[0])
        if sum(map(len, pages)) != count * page_size:
            raise ImageError(f"pages of different sizes in a run at {block!r}+{offset:#x}")
        image_offset = self._account(block, offset, pages, page_size)
        done = 0
        while done < count:
            if self._buf_len and image_offset != self._buf_start + self._buf_len:
                self._flush_buffer()
            if not self._buf_len:
                self._buf_start = image_offset
            room = min((self._max_write - self._buf_len) // page_size, MAX_PARTS - len(self._parts))
            take = max(room, 0 if self._buf_len else 1)
            if not take:
                self._flush_buffer()
                continue
            if done == 0 and take >= count:
                self._parts.extend(pages)  # the common case: the whole run fits
                take = count
            else:
                take = min(take, count - done)
                self._parts.extend(pages[done : done + take])
            self._buf_len += take * page_size
            image_offset += take * page_size
            done += take
            if self._buf_len >= self._max_write or len(self._parts) >= MAX_PARTS:
                self._flush_buffer()

    def _account(
        self, block: str, offset: int, pages: Sequence[bytes | memoryview], page_size: int
    ) -> int:
        """Digests, written map and counts of a run of data pages; where they go."""
        count = len(pages)
        state = self._locate(block, offset, page_size, count)
        index = offset // page_size
        written = state.written
        if written.find(1, index, index + count) >= 0:
            # sent again (precopy resends dirty pages): writes in flight are not
            # ordered, so the older copy must land first
            self._flush_buffer()
            self.image.drain()
        written[index : index + count] = b"\1" * count
        d = (state.digest_base + index) * DIGEST_SIZE
        self._digests[d : d + count * DIGEST_SIZE] = b"".join(map(self._digest, pages))
        self.stats.data_pages += count
        return state.entry.image_offset + offset

    def lend_pages(self, block: str, offset: int, page_size: int) -> LentPages | None:
        """Memory shared with the daemon for the data pages of ``block`` from ``offset``.

        The caller fills the first pages in place, then hands them to :meth:`write_lent`.
        None when writes do not go through shared memory.
        """
        state = self._locate(block, offset, page_size)
        lent = self.image.lend_slot()
        if lent is None:
            return None
        slot, memory = lent
        room = min(len(memory), state.entry.used_length - offset) // page_size
        return LentPages(block, offset, page_size, slot, memory, room)

    def write_lent(self, lent: LentPages, pages: Sequence[memoryview]) -> None:
        """Store ``pages``: views of the first pages of ``lent``'s memory, in order (none:
        the memory goes back unused)."""
        count = len(pages)
        if count > lent.room:
            raise ValueError(f"{count} pages written in a slot of {lent.room}")
        if not count:
            self.image.return_slot(lent.slot)
            return
        try:
            image_offset = self._account(lent.block, lent.offset, pages, lent.page_size)
        except BaseException:
            self.image.return_slot(lent.slot)
            raise
        self.image.write_slot(lent.slot, image_offset, count * lent.page_size)
        self.stats.written_bytes += count * lent.page_size
        self.stats.in_place_pages += count

    def zero(self, block: str, offset: int, page_size: int) -> None:
        """A zero page costs no I/O unless this save already wrote data there."""
        self.zeros(block, offset, 1, page_size)

    def zeros(self, block: str, offset: int, count: int, page_size: int) -> None:
        """``count`` zero pages from ``offset``: no I/O unless this save wrote data there."""
        state = self._locate(block, offset, page_size, count)
        index = offset // page_size
        self.stats.zero_pages += count
        written = state.written
        if written.find(1, index, index + count) < 0:
            return
        self._flush_buffer()
        self.image.drain()  # the data writes must not overtake the zeroing
        for i in range(index, index + count):
            if written[i]:
                written[i] = 0
                d = (state.digest_base + i) * DIGEST_SIZE
                self._digests[d : d + DIGEST_SIZE] = self._zero_digest
                self.client.submit_write_zeroes(state.entry.image_offset + i * page_size, page_size)
        self.client.drain()  # nor may a later data write overtake it

    def device_state(self, data: bytes | memoryview) -> None:
        """Append device-state bytes (any chunking); fails before writing past the disk."""
        if not self._passes & Pass.VMSTATE:
            raise ImageError("device-state bytes before start_device_state()")
        n = len(data)
        end = self._ds.end + n
        layout.check_fits(end, self.client.size, "the device state")
        self._ds_hasher.update(data)
        self._append(self._ds.end, data)
        self._ds = Region(self._ds.offset, self._ds.length + n)
        self.stats.device_state_bytes += n

    # -- end ----------------------------------------------------------------------------

    def finish(self, device_sections_length: int | None = None) -> Header:
        """Write digests, flush, then (only then) the final header; flush again.

        ``device_sections_length``: where EOF + vmdesc start within the device state
        (required when this pass brought device state).
        """
        if self.header is None:
            raise ImageError("the stream brought neither RAM nor device state")
        self._flush_buffer()
        header = self.header
        if self._passes & Pass.RAM:
            blocks = []
            for entry in header.blocks:
                state = self._blocks[entry.idstr]
                data_pages = state.written.count(1)
                blocks.append(
                    replace(
                        entry,
                        data_pages=data_pages,
                        zero_pages=header.page_count(entry) - data_pages,
                    )
                )
            view = memoryview(self._digests)
            for pos in range(0, len(view), self._max_write):
                chunk = view[pos : pos + self._max_write]
                self.client.submit_write(header.digests.offset + pos, chunk)
            header = header.with_(blocks=tuple(blocks))
        if self._passes & Pass.VMSTATE:
            if device_sections_length is None:
                raise ImageError("device state without its EOF boundary")
            header = header.with_(
                device_state=self._ds,
                device_sections_length=device_sections_length,
                device_state_digest=self._ds_hasher.digest(),
            )
        self.image.flush()
        passes = header.passes | self._passes
        final = ImageState.COMPLETE if passes == ALL_PASSES else ImageState.SAVING
        header = header.with_(passes=passes, state=final)
        self.image.write_header(header)
        self.image.flush()
        self.header = header
        if not header.complete:
            log.info("%s", describe_incomplete(header))
        return header
