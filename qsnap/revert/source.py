"""What a revert needs from a snapshot image, as a Protocol.

The revert pipelines only read: the saved stream pieces that are sent verbatim, the RAM
block list, where the zero pages are (so they are never read), page data in large
pipelined reads, and the device state in bounded chunks.  ``qsnap.image`` provides the
real implementation; tests may provide an in-memory one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from qsnap.image import layout
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.span import Span
from qsnap.revert.errors import RevertError
from qsnap.revert.scheduler import BlockGeometry

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # only mypy checks the protocol; importing typing costs start-up

HOST_PAGE_SIZE = os.sysconf("SC_PAGESIZE")


@dataclass(frozen=True, slots=True)
class SourceBlock:
    """A saved RAM block.

    ``page_size`` is the block's host page size when the saved stream recorded it (only
    streams saved with postcopy-ram on do, for blocks whose page size differs from the
    host's); ``None`` means the host page size.
    """

    name: str
    used_length: int
    page_size: int | None = None


class RevertSource(Protocol):
    """A complete snapshot, opened for reading."""

    @property
    def prologue(self) -> bytes:
        """Stream header and configuration, verbatim as saved."""

    @property
    def ram_start(self) -> bytes:
        """The RAM START section (setup record, EOS, footer), verbatim as saved."""

    @property
    def ram_section_id(self) -> int:
        """Section id of RAM in the saved stream (reused for PART and END sections)."""

    @property
    def target_page_size(self) -> int: ...

    @property
    def blocks(self) -> Sequence[SourceBlock]: ...

    @property
    def device_state_length(self) -> int:
        """Bytes of saved device state: device sections, EOF and vmdesc."""

    @property
    def device_sections_length(self) -> int:
        """Bytes of the device sections alone (without EOF and vmdesc)."""

    def zero_extents(self, block: str) -> Iterable[tuple[int, int]]:
        """(offset, length) ranges of ``block`` known to read as zeros."""

    def read(self, block: str, offset: int, length: int) -> bytes | bytearray:
        """``length`` bytes of ``block`` at ``offset`` (not to be modified)."""

    def read_many(self, requests: Iterable[tuple[str, int, int]], keep: int = 0) -> Iterator[Span]:
        """The data of each (block, offset, length), in order, several reads in flight.

        A span is valid only until ``keep + 1`` more have been asked for (its memory may
        then be reused).
        """

    def device_state(self, sections_only: bool) -> Iterator[bytes]:
        """The saved device state in bounded chunks; ``sections_only`` stops before EOF."""

    def close(self) -> None:
        """Release the image (idempotent); nothing is read afterwards."""


def geometry(source: RevertSource) -> list[BlockGeometry]:
    """The scheduler's view of the saved blocks, refusing what cannot be reverted.

    Every block must be a whole number of its host pages, and a host page a whole number
    of target pages, or QEMU could not place the pages the stream carries.
    """
    tps = source.target_page_size
    result = []
    for block in source.blocks:
        hps = block.page_size or max(HOST_PAGE_SIZE, tps)
        if hps % tps or hps & (hps - 1):
            raise RevertError(
                f"RAM block {block.name!r}: page size {hps} is not a power-of-two "
                f"multiple of the target page size {tps}"
            )
        if block.used_length % hps:
            raise RevertError(
                f"RAM block {block.name!r}: length {block.used_length:#x} is not a "
                f"multiple of its page size {hps}"
            )
        result.append(BlockGeometry(block.name, block.used_length, hps))
    return result


class ImageSource:
    """``RevertSource`` over an open, complete ``qsnap.image.SnapshotImage``."""

    def __init__(self, image: SnapshotImage) -> None:
        """Takes ownership of ``image``: it is closed here if it cannot be reverted."""
        self._image: SnapshotImage | None = image
        try:
            self._check(image)
        except BaseException:
            self.close()
            raise

    def _check(self, image: SnapshotImage) -> None:
        header = image.complete_header()
        self._header = header
        self.prologue = header.prologue
        self.ram_start = header.ram_setup
        self.ram_section_id = header.ram_section_id
        self.target_page_size = header.page_size
        self.blocks = tuple(
            SourceBlock(b.idstr, b.used_length, b.page_size or None) for b in header.blocks
        )
        self.device_state_length = header.device_state.length
        self.device_sections_length = header.device_sections_length
        if not self.prologue or not self.ram_start or not self.device_state_length:
            raise RevertError(
                "image header lacks the saved stream prologue, RAM setup or device state"
            )
        self._check_device_state(header.device_state_digest)

    def _check_device_state(self, digest: bytes) -> None:
        """Refuse a corrupted device state before anything is sent.

        It is read twice: it is small next to RAM, and a stream that QEMU rejects after
        loading all of RAM is the worse outcome.
        """
        hasher = layout.device_state_hasher()
        for chunk in self.image.device_state(sections_only=False):
            hasher.update(chunk)
        if hasher.digest() != digest:
            raise RevertError("corrupted image: the device state does not match its digest")

    @property
    def image(self) -> SnapshotImage:
        if self._image is None:
            raise RevertError("internal error: image read after it was closed")
        return self._image

    def zero_extents(self, block: str) -> list[tuple[int, int]]:
        return [(e.offset, e.length) for e in self.image.zero_map(block) if e.zero]

    def read(self, block: str, offset: int, length: int) -> bytearray:
        return self.image.read(block, offset, length)

    def read_many(self, requests: Iterable[tuple[str, int, int]], keep: int = 0) -> Iterator[Span]:
        return self.image.read_spans(requests, keep)

    def device_state(self, sections_only: bool) -> Iterator[bytes]:
        return self.image.device_state(sections_only=sections_only)

    def close(self) -> None:
        image, self._image = self._image, None
        if image is not None:
            image.close()
