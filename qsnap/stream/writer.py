"""Records to bytes: the byte-exact inverse of the reader (fixed pieces from :mod:`.wire`)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from . import records as r
from .constants import QEVM_MAGIC, MigCommand, RamFlag, SectionType
from .text import encode_name, encode_str8
from .wire import BE32, BE64, encode_command, encode_ping, ram_word

_SECTION_ID = struct.Struct(">BI")


def _header(rec: r.StreamHeader) -> bytes:
    return struct.pack(">II", QEVM_MAGIC, rec.version)


def _subsection(sub: r.ConfigSubsection) -> bytes:
    if isinstance(sub, r.TargetPageBits):
        name, body = "configuration/target-page-bits", BE32.pack(sub.bits)
    elif isinstance(sub, r.Capabilities):
        name = "configuration/capabilities"
        body = BE32.pack(len(sub.names)) + b"".join(encode_str8(n) for n in sub.names)
    else:
        if len(sub.uuid) != 16:
            raise ValueError("configuration/uuid needs 16 bytes")
        name, body = "configuration/uuid", sub.uuid
    return bytes((SectionType.SUBSECTION,)) + encode_str8(name) + BE32.pack(sub.version_id) + body


def _configuration(rec: r.Configuration) -> bytes:
    machine = encode_name(rec.machine)
    return (
        bytes((SectionType.CONFIGURATION,))
        + BE32.pack(len(machine))
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


def _advise(rec: r.PostcopyAdvise) -> bytes:
    if rec.ram_pagesize_summary is None and rec.target_page_size is None:
        return encode_command(MigCommand.POSTCOPY_ADVISE)
    if rec.ram_pagesize_summary is None or rec.target_page_size is None:
        raise ValueError("POSTCOPY_ADVISE needs both page sizes or neither")
    return encode_command(
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
    return encode_command(MigCommand.POSTCOPY_RAM_DISCARD, payload)


def _packaged(rec: r.Packaged) -> bytes:
    return encode_command(MigCommand.PACKAGED, BE32.pack(len(rec.payload))) + rec.payload


def _block_info(block: r.RamBlockInfo) -> bytes:
    out = encode_str8(block.idstr) + BE64.pack(block.used_length)
    if block.page_size is not None:
        out += BE64.pack(block.page_size)
    if block.mr_addr is not None:
        out += BE64.pack(block.mr_addr)
    return out


def _mem_size(rec: r.RamMemSize) -> bytes:
    return ram_word(rec.total, RamFlag.MEM_SIZE) + b"".join(_block_info(b) for b in rec.blocks)


def _zero(rec: r.RamZero) -> bytes:
    if rec.continued:
        return ram_word(rec.offset, RamFlag.ZERO | RamFlag.CONTINUE) + b"\0"
    return ram_word(rec.offset, RamFlag.ZERO) + encode_str8(rec.block) + b"\0"


def _page(rec: r.RamPage) -> bytes:
    if rec.continued:
        return ram_word(rec.offset, RamFlag.PAGE | RamFlag.CONTINUE) + rec.data
    return ram_word(rec.offset, RamFlag.PAGE) + encode_str8(rec.block) + rec.data


def _vmdesc(rec: r.VmDescription) -> bytes:
    return bytes((SectionType.VMDESCRIPTION,)) + BE32.pack(len(rec.json)) + rec.json


_ENCODERS: dict[type[Any], Callable[[Any], bytes]] = {
    r.StreamHeader: _header,
    r.Configuration: _configuration,
    r.SectionStart: _start_or_full,
    r.SectionFull: _start_or_full,
    r.SectionPart: lambda rec: _SECTION_ID.pack(SectionType.SECTION_PART, rec.section_id),
    r.SectionEnd: lambda rec: _SECTION_ID.pack(SectionType.SECTION_END, rec.section_id),
    r.SectionFooter: lambda rec: _SECTION_ID.pack(SectionType.SECTION_FOOTER, rec.section_id),
    r.OpenReturnPath: lambda rec: encode_command(MigCommand.OPEN_RETURN_PATH),
    r.Ping: lambda rec: encode_ping(rec.value),
    r.PostcopyAdvise: _advise,
    r.PostcopyListen: lambda rec: encode_command(MigCommand.POSTCOPY_LISTEN),
    r.PostcopyRun: lambda rec: encode_command(MigCommand.POSTCOPY_RUN),
    r.PostcopyRamDiscard: _discard,
    r.Packaged: _packaged,
    r.EnableColo: lambda rec: encode_command(MigCommand.ENABLE_COLO),
    r.PostcopyResume: lambda rec: encode_command(MigCommand.POSTCOPY_RESUME),
    r.RecvBitmap: lambda rec: encode_command(MigCommand.RECV_BITMAP, encode_str8(rec.block)),
    r.SwitchoverStart: lambda rec: encode_command(MigCommand.SWITCHOVER_START),
    r.RamMemSize: _mem_size,
    r.RamZero: _zero,
    r.RamPage: _page,
    r.RamEos: lambda rec: BE64.pack(RamFlag.EOS),
    r.RamMultifdFlush: lambda rec: BE64.pack(RamFlag.MULTIFD_FLUSH),
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
