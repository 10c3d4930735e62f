"""Records to bytes: the byte-exact inverse of the reader, and a fast RAM encoder."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from . import records as r
from .constants import QEVM_MAGIC, MigCommand, RamFlag, SectionType
from .options import MIN_PAGE_SIZE, check_page_size
from .text import encode_name, encode_str8

_FLAG_BITS = MIN_PAGE_SIZE - 1
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_COMMAND_HEAD = struct.Struct(">BHH")
_SECTION_ID = struct.Struct(">BI")
_FOOTER = bytes((SectionType.SECTION_FOOTER,))
_CONTINUE = int(RamFlag.CONTINUE)
"""A plain int: ``int | IntFlag`` goes through enum machinery (~10 us per page)."""


def _ram_word(offset: int, flags: int) -> bytes:
    if offset & _FLAG_BITS or not 0 <= offset < 1 << 64:
        raise ValueError(f"RAM offset {offset:#x} is not page aligned")
    return _BE64.pack(offset | flags)


def _header(rec: r.StreamHeader) -> bytes:
    return struct.pack(">II", QEVM_MAGIC, rec.version)


def _subsection(sub: r.ConfigSubsection) -> bytes:
    if isinstance(sub, r.TargetPageBits):
        name, body = "configuration/target-page-bits", _BE32.pack(sub.bits)
    elif isinstance(sub, r.Capabilities):
        name = "configuration/capabilities"
        body = _BE32.pack(len(sub.names)) + b"".join(encode_str8(n) for n in sub.names)
    else:
        if len(sub.uuid) != 16:
            raise ValueError("configuration/uuid needs 16 bytes")
        name, body = "configuration/uuid", sub.uuid
    return bytes((SectionType.SUBSECTION,)) + encode_str8(name) + _BE32.pack(sub.version_id) + body


def _configuration(rec: r.Configuration) -> bytes:
    machine = encode_name(rec.machine)
    return (
        bytes((SectionType.CONFIGURATION,))
        + _BE32.pack(len(machine))
        + machine
        + b"".join(_subsection(s) for s in rec.subsections)
    )


def _start_or_full(rec: r.SectionStart | r.SectionFull) -> bytes:
    kind = (
        SectionType.SECTION_START if isinstance(rec, r.SectionStart) else SectionType.SECTION_FULL
    )
    return (
        _SECTION_ID.pack(kind, rec.section_id)
        + encode_str8(rec.idstr)
        + struct.pack(">II", rec.instance_id, rec.version_id)
    )


def _command(cmd: MigCommand, payload: bytes = b"") -> bytes:
    return _COMMAND_HEAD.pack(SectionType.COMMAND, cmd, len(payload)) + payload


def _advise(rec: r.PostcopyAdvise) -> bytes:
    if rec.ram_pagesize_summary is None and rec.target_page_size is None:
        return _command(MigCommand.POSTCOPY_ADVISE)
    if rec.ram_pagesize_summary is None or rec.target_page_size is None:
        raise ValueError("POSTCOPY_ADVISE needs both page sizes or neither")
    return _command(
        MigCommand.POSTCOPY_ADVISE,
        struct.pack(">QQ", rec.ram_pagesize_summary, rec.target_page_size),
    )


def _discard(rec: r.PostcopyRamDiscard) -> bytes:
    payload = (
        bytes((rec.version,))
        + encode_str8(rec.block)
        + b"\0"
        + b"".join(struct.pack(">QQ", start, length) for start, length in rec.ranges)
    )
    return _command(MigCommand.POSTCOPY_RAM_DISCARD, payload)


def _packaged(rec: r.Packaged) -> bytes:
    return _command(MigCommand.PACKAGED, _BE32.pack(len(rec.payload))) + rec.payload


def _block_info(block: r.RamBlockInfo) -> bytes:
    out = encode_str8(block.idstr) + _BE64.pack(block.used_length)
    if block.page_size is not None:
        out += _BE64.pack(block.page_size)
    if block.mr_addr is not None:
        out += _BE64.pack(block.mr_addr)
    return out


def _mem_size(rec: r.RamMemSize) -> bytes:
    return _ram_word(rec.total, RamFlag.MEM_SIZE) + b"".join(_block_info(b) for b in rec.blocks)


def _zero(rec: r.RamZero) -> bytes:
    if rec.continued:
        return _ram_word(rec.offset, RamFlag.ZERO | RamFlag.CONTINUE) + b"\0"
    return _ram_word(rec.offset, RamFlag.ZERO) + encode_str8(rec.block) + b"\0"


def _page(rec: r.RamPage) -> bytes:
    if rec.continued:
        return _ram_word(rec.offset, RamFlag.PAGE | RamFlag.CONTINUE) + rec.data
    return _ram_word(rec.offset, RamFlag.PAGE) + encode_str8(rec.block) + rec.data


def _vmdesc(rec: r.VmDescription) -> bytes:
    return bytes((SectionType.VMDESCRIPTION,)) + _BE32.pack(len(rec.json)) + rec.json


_ENCODERS: dict[type[Any], Callable[[Any], bytes]] = {
    r.StreamHeader: _header,
    r.Configuration: _configuration,
    r.SectionStart: _start_or_full,
    r.SectionFull: _start_or_full,
    r.SectionPart: lambda rec: _SECTION_ID.pack(SectionType.SECTION_PART, rec.section_id),
    r.SectionEnd: lambda rec: _SECTION_ID.pack(SectionType.SECTION_END, rec.section_id),
    r.SectionFooter: lambda rec: _SECTION_ID.pack(SectionType.SECTION_FOOTER, rec.section_id),
    r.OpenReturnPath: lambda rec: _command(MigCommand.OPEN_RETURN_PATH),
    r.Ping: lambda rec: _command(MigCommand.PING, _BE32.pack(rec.value)),
    r.PostcopyAdvise: _advise,
    r.PostcopyListen: lambda rec: _command(MigCommand.POSTCOPY_LISTEN),
    r.PostcopyRun: lambda rec: _command(MigCommand.POSTCOPY_RUN),
    r.PostcopyRamDiscard: _discard,
    r.Packaged: _packaged,
    r.EnableColo: lambda rec: _command(MigCommand.ENABLE_COLO),
    r.PostcopyResume: lambda rec: _command(MigCommand.POSTCOPY_RESUME),
    r.RecvBitmap: lambda rec: _command(MigCommand.RECV_BITMAP, encode_str8(rec.block)),
    r.SwitchoverStart: lambda rec: _command(MigCommand.SWITCHOVER_START),
    r.RamMemSize: _mem_size,
    r.RamZero: _zero,
    r.RamPage: _page,
    r.RamEos: lambda rec: _BE64.pack(RamFlag.EOS),
    r.RamMultifdFlush: lambda rec: _BE64.pack(RamFlag.MULTIFD_FLUSH),
    r.Eof: lambda rec: bytes((SectionType.EOF,)),
    r.VmDescription: _vmdesc,
    r.DeviceStateStart: lambda rec: b"",
    r.DeviceStateChunk: lambda rec: rec.data,
}


def encode(record: r.Record) -> bytes:
    """The wire bytes of ``record``; raises ValueError if it cannot be encoded.

    DeviceStateStart encodes to nothing: the DeviceStateChunk records after it
    carry every byte of the device state, its first section header included.
    RAM offsets must be page aligned; not knowing the page size, encode() checks
    only the 1 KiB alignment that keeps them clear of the flag bits.
    """
    try:
        encoder = _ENCODERS[type(record)]
    except KeyError:
        raise TypeError(f"not a stream record: {record!r}") from None
    return encoder(record)


def encode_footer(section_id: int) -> bytes:
    """SECTION_FOOTER for ``section_id`` (same bytes as encode(SectionFooter(...)))."""
    return _FOOTER + _BE32.pack(section_id)


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
            return _BE64.pack(offset | flag | _CONTINUE)
        prefix = _BE64.pack(offset | flag) + encode_str8(block)
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
        return _BE64.pack(RamFlag.EOS)
