"""Byte builders for the stream's fixed pieces: RAM record words, commands, footers.

No record objects here: ``qsnap revert`` builds its stream from these alone, and loading
the record types (a few dozen dataclasses) would add to every revert's start-up.
:mod:`qsnap.stream.writer` encodes records with the same builders.
"""

from __future__ import annotations

import struct

from .constants import MigCommand, RamFlag, SectionType
from .options import MIN_PAGE_SIZE, check_page_size
from .text import encode_str8

FLAG_BITS = MIN_PAGE_SIZE - 1
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
_COMMAND_HEAD = struct.Struct(">BHH")
_FOOTER = bytes((SectionType.SECTION_FOOTER,))
_CONTINUE = int(RamFlag.CONTINUE)
"""A plain int: ``int | IntFlag`` goes through enum machinery (~10 us per page)."""


def ram_word(offset: int, flags: int) -> bytes:
    """The be64 word that starts a RAM record: page-aligned offset ORed with flags."""
    if offset & FLAG_BITS or not 0 <= offset < 1 << 64:
        raise ValueError(f"RAM offset {offset:#x} is not page aligned")
    return BE64.pack(offset | flags)


def encode_command(cmd: MigCommand, payload: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND with its payload."""
    return _COMMAND_HEAD.pack(SectionType.COMMAND, cmd, len(payload)) + payload


def encode_ping(value: int) -> bytes:
    """MIG_CMD_PING: the destination answers PONG with ``value`` on the return path."""
    return encode_command(MigCommand.PING, BE32.pack(value))


def encode_footer(section_id: int) -> bytes:
    """SECTION_FOOTER for ``section_id`` (same bytes as encode(SectionFooter(...)))."""
    return _FOOTER + BE32.pack(section_id)


class RamEncoder:
    """Fast ZERO/PAGE record bytes for generating streams.

    It sets CONTINUE whenever the block is the one of the previous ZERO/PAGE
    record, as QEMU does. QEMU's destination keeps that block across sections,
    so nothing is reset at section boundaries; call reset() only when a new
    stream begins.
    """

    __slots__ = ("_last", "_page_flag", "_page_mask", "_zero_flag", "page_size")

    def __init__(self, page_size: int = 4096) -> None:
        check_page_size(page_size)
        self.page_size = page_size
        self._page_mask = page_size - 1
        self._last: str | None = None
        self._page_flag = int(RamFlag.PAGE)
        self._zero_flag = int(RamFlag.ZERO)

    def reset(self) -> None:
        """Forget the previous block: the next record names its block."""
        self._last = None

    def _word(self, block: str, offset: int, flag: int) -> bytes:
        if offset & self._page_mask or offset < 0:
            raise ValueError(f"RAM offset {offset:#x} is not aligned to {self.page_size}")
        if block == self._last:
            return BE64.pack(offset | flag | _CONTINUE)
        prefix = BE64.pack(offset | flag) + encode_str8(block)
        self._last = block
        return prefix

    def page(self, block: str, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """A PAGE record; ``data`` must be exactly one page (any bytes-like object)."""
        if len(data) != self.page_size:
            raise ValueError(f"page data is {len(data)} bytes, expected {self.page_size}")
        return self._word(block, offset, self._page_flag) + data

    def zero(self, block: str, offset: int) -> bytes:
        """A ZERO record (fill byte 0)."""
        return self._word(block, offset, self._zero_flag) + b"\0"

    def eos(self) -> bytes:
        """The EOS record that ends a RAM section body."""
        return BE64.pack(RamFlag.EOS)
