"""Bytes to records: an incremental, sans-I/O reader of QEMU's migration stream.

Feed chunks of any size with feed(), drain records() after each feed, call close()
at the end of input. The reader keeps at most one incomplete element buffered (a
RAM page and its header, or a bounded PACKAGED/VMDESCRIPTION payload) besides the
chunk just fed. Device sections cannot be parsed without their vmstate
descriptions, so from the first device section on the reader passes the rest of
the stream through as DeviceStateChunk records (raw mode), never accumulating it.
"""

from __future__ import annotations

import functools
import logging
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, compress, count
from operator import ne

from . import records as r
from .constants import (
    CAPABILITY_IGNORE_SHARED,
    CAPABILITY_MAPPED_RAM,
    QEVM_MAGIC,
    QEVM_VERSION,
    QEVM_VERSION_COMPAT,
    RAM_IDSTR,
    RAM_VERSION,
    SUBSECTION_CAPABILITIES,
    SUBSECTION_TARGET_PAGE_BITS,
    SUBSECTION_UUID,
    MigCommand,
    RamFlag,
    SectionType,
)
from .cursor import Cursor, NeedMore
from .device_tail import DeviceStateEnd, DeviceStateEndTracker
from .errors import StreamError
from .options import StreamOptions, check_page_size
from .text import decode_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

log = logging.getLogger(__name__)

MAX_MACHINE_NAME = 256
MAX_CAPABILITIES = 64
MAX_RAM_BLOCKS = 1024

_BE64 = struct.Struct(">Q")

_PAGE = int(RamFlag.PAGE)
_ZERO = int(RamFlag.ZERO)
_PAGE_C = int(RamFlag.PAGE | RamFlag.CONTINUE)
_ZERO_C = int(RamFlag.ZERO | RamFlag.CONTINUE)
_KNOWN_FLAGS = int(
    RamFlag.ZERO
    | RamFlag.MEM_SIZE
    | RamFlag.PAGE
    | RamFlag.EOS
    | RamFlag.CONTINUE
    | RamFlag.XBZRLE
    | RamFlag.HOOK
    | RamFlag.COMPRESS_PAGE
    | RamFlag.MULTIFD_FLUSH
)

# Fixed payload lengths (mig_cmd_args in migration/savevm.c); None: variable.
_COMMAND_LENGTH: dict[MigCommand, int | None] = {
    MigCommand.OPEN_RETURN_PATH: 0,
    MigCommand.PING: 4,
    MigCommand.POSTCOPY_ADVISE: None,
    MigCommand.POSTCOPY_LISTEN: 0,
    MigCommand.POSTCOPY_RUN: 0,
    MigCommand.POSTCOPY_RAM_DISCARD: None,
    MigCommand.PACKAGED: 4,
    MigCommand.ENABLE_COLO: 0,
    MigCommand.POSTCOPY_RESUME: 0,
    MigCommand.RECV_BITMAP: None,
    MigCommand.SWITCHOVER_START: 0,
}
_EMPTY_COMMANDS: dict[MigCommand, r.CommandRecord] = {
    MigCommand.OPEN_RETURN_PATH: r.OpenReturnPath(),
    MigCommand.POSTCOPY_LISTEN: r.PostcopyListen(),
    MigCommand.POSTCOPY_RUN: r.PostcopyRun(),
    MigCommand.ENABLE_COLO: r.EnableColo(),
    MigCommand.POSTCOPY_RESUME: r.PostcopyResume(),
    MigCommand.SWITCHOVER_START: r.SwitchoverStart(),
}

# Reader states.
_HEADER = "the stream header"
_CONFIG = "the configuration"
_TOP = "the stream"
_RAM = "a RAM section body"
_FOOTER = "a section footer"
_AFTER_EOF = "the VMDESCRIPTION"
_DONE = "the end of the stream"
_RAW = "the device state"


_BULK_MIN = 8
_BULK_MAX = 256


@functools.cache
def _page_words(n: int, page_size: int) -> struct.Struct:
    """The headers of ``n`` back-to-back CONTINUE data records, in one C call."""
    return struct.Struct(">" + f"Q{page_size}x" * n)


@functools.cache
def _zero_words(n: int) -> struct.Struct:
    """The headers of ``n`` back-to-back CONTINUE zero records (fill bytes skipped)."""
    return struct.Struct(">" + "Qx" * n)


def run_length(words: tuple[int, ...], first: int, page_size: int) -> int:
    """How many of ``words`` go on from ``first`` a page at a time (same flags).

    The bulk of a snapshot is runs of CONTINUE records of one kind: their headers are
    checked a few hundred at a time, in C, instead of one Python step per page.
    """
    expected = range(first, first + len(words) * page_size, page_size)
    return next(compress(count(), map(ne, words, expected)), len(words))


@dataclass(frozen=True, slots=True)
class RamPageRun:
    """Data pages at consecutive offsets of one RAM block, from :meth:`StreamReader.batches`.

    ``pages`` are read-only views into the bytes fed (never copied; they keep that input
    alive while held).  A run says nothing about CONTINUE flags: it is for consumers that
    store pages, not for re-encoding the stream byte for byte.
    """

    block: str
    offset: int
    pages: tuple[memoryview, ...]


@dataclass(frozen=True, slots=True)
class RamZeroRun:
    """``count`` ZERO records at consecutive offsets of one RAM block."""

    block: str
    offset: int
    count: int


Batch = r.Record | RamPageRun | RamZeroRun


@dataclass(frozen=True, slots=True)
class PageAhead:
    """A data page being received (see :meth:`StreamReader.page_ahead`).

    ``word`` is its header as sent (offset | flags); ``room`` the pages from it to the
    end of the block; ``received`` the bytes of the record fed so far.
    """

    block: str
    offset: int
    word: int
    room: int
    received: bytes


def _type_name(byte: int) -> str:
    try:
        return SectionType(byte).name
    except ValueError:
        return f"{byte:#04x}"


_BRIDGE = 16 << 10


@dataclass(frozen=True, slots=True)
class _Bridge:
    """A small buffer standing in for the start of a large fed chunk.

    An element cut by the end of a chunk (a RAM page, mostly: nearly every read ends
    inside one) used to be completed by joining its first part with the whole next
    chunk: a copy of the entire stream.  Instead it is completed in ``lead`` carried
    bytes + ``chunk[:cut]``; once the parser is past the carried bytes it continues in
    ``chunk`` itself.
    """

    chunk: bytes
    cut: int
    lead: int


class StreamReader:
    """Incremental reader of one migration stream (see the module docstring).

    After the RAM setup the reader exposes ``configuration``, ``mem_size`` (the
    RAM block list), ``ram_section_id`` and ``page_size``; after close() in raw
    mode, ``device_state_end`` tells where EOF and the vmdesc begin.
    Any malformed input raises StreamError; the reader then stays failed.
    """

    def __init__(self, options: StreamOptions | None = None) -> None:
        self.options = options or StreamOptions()
        self.page_size = self.options.page_size
        self.configuration: r.Configuration | None = None
        self.mem_size: r.RamMemSize | None = None
        self.ram_section_id: int | None = None
        self.device_state_end: DeviceStateEnd | None = None
        self._buf = b""
        self._pos = 0
        self._base = 0
        self._bridged: _Bridge | None = None
        self._state = _TOP if self.options.packaged else _HEADER
        self._section_id = 0
        self._ignore_shared = bool(self.options.ignore_shared)
        self._blocks: dict[bytes, tuple[str, int]] | None = None
        self._last_block: tuple[str, int] | None = None
        self._raw_pending: list[bytes] = []
        self._leftover: list[r.Record] = []
        self._tail: DeviceStateEndTracker | None = None
        self._error: StreamError | None = None
        self._closed = False

    @property
    def offset(self) -> int:
        """Absolute position of the next byte to parse (or to pass through)."""
        if self._tail is not None:
            return self._tail.offset
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as records (bounded: see the module)."""
        tail = len(self._bridged.chunk) - self._bridged.cut if self._bridged is not None else 0
        return len(self._buf) - self._pos + tail + sum(len(c) for c in self._raw_pending)

    @property
    def raw(self) -> bool:
        """Whether the reader is passing the device state through."""
        return self._state is _RAW

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append input; the bytes are copied or kept immutable, never aliased."""
        if self._closed:
            raise ValueError("feed() after close()")
        if not data:
            return
        self._unbridge()
        if self._state is _RAW:
            self._raw_pending.append(bytes(data))
        elif self._pos >= len(self._buf):
            self._base += len(self._buf)
            self._buf = bytes(data)
            self._pos = 0
        else:
            lead = len(self._buf) - self._pos
            self._base += self._pos
            self._pos = 0
            if lead <= _BRIDGE < len(data) // 4:
                chunk = bytes(data)
                self._buf = self._buf[-lead:] + chunk[:_BRIDGE]
                self._bridged = _Bridge(chunk, _BRIDGE, lead)
            else:
                self._buf = self._buf[-lead:] + data

    def _unbridge(self, pos: int | None = None) -> bool:
        """Leave the bridge (see :class:`_Bridge`): continue in its chunk at ``pos``.

        ``pos`` (default: the parse position) is a position in the bridge; once past the
        bytes carried over, it lies in the chunk itself, which becomes the buffer as fed
        (no copy).  Before that (an element longer than the bridge), they are joined.
        Returns whether there was a bridge, i.e. whether more input became parseable.
        """
        bridge = self._bridged
        if bridge is None:
            return False
        self._bridged = None
        pos = self._pos if pos is None else pos
        if pos >= bridge.lead:
            self._base += bridge.lead
            self._buf = bridge.chunk
            self._pos = pos - bridge.lead
        else:
            self._base += pos
            self._buf = self._buf[pos:] + bridge.chunk[bridge.cut :]
            self._pos = 0
        return True

    def records(self) -> Iterator[r.Record]:
        """Iterate over every record complete in the bytes fed so far."""
        if self._error is not None:
            raise self._error
        if self._leftover:
            leftover, self._leftover = self._leftover, []
            return iter(leftover)
        from typing import cast  # here, not at import: start-up of a save

        return cast(Iterator[r.Record], chain.from_iterable(self._segments()))

    def batches(self) -> Iterator[Batch]:
        """Like :meth:`records`, but consecutive RAM pages come as runs.

        Pages and zero pages that follow each other in one block (the bulk of a
        snapshot) arrive as :class:`RamPageRun` and :class:`RamZeroRun` instead of one
        record each: no record object and no copy per page.  Every other record, and
        every error, is what :meth:`records` gives, at the same point of the stream.
        Records left for :meth:`close` to collect still come from :meth:`records`.
        """
        if self._error is not None:
            raise self._error
        if self._leftover:
            leftover, self._leftover = self._leftover, []
            return iter(leftover)
        return chain.from_iterable(self._segments(batched=True))

    def page_ahead(self) -> PageAhead | None:
        """The record being received, when it is a data page of the current RAM block.

        That is, all that is left unparsed is the start of one CONTINUE data record
        (its header at least) inside the block.  A caller may then read the records
        that follow itself (see :mod:`qsnap.page_scatter`) and say how many of them
        were data pages with :meth:`skip_pages`.
        """
        if (
            self._state is not _RAM
            or self._bridged is not None
            or self._leftover
            or self._error is not None
            or self._closed
            or self._last_block is None
        ):
            return None
        pos, buf = self._pos, self._buf
        if not 8 <= len(buf) - pos < 8 + self.page_size:
            return None
        word = _BE64.unpack_from(buf, pos)[0]
        flags = word & (self.page_size - 1)
        addr = word ^ flags
        name, length = self._last_block
        room = (length - addr) // self.page_size
        if flags != _PAGE_C or room < 1:  # a page past the block: left to the checks
            return None
        return PageAhead(name, addr, word, room, buf[pos:])

    def skip_pages(self, count: int) -> None:
        """The caller took ``count`` data pages from the one :meth:`page_ahead` named.

        They continued it one page at a time, in its block (the caller checked their
        headers); the bytes fed of the first one are dropped.  With ``count`` 0 the
        caller only takes those bytes back, to feed them again.
        """
        if self.page_ahead() is None:
            raise ValueError("skip_pages() without a data page being received")
        self._base += self._pos + count * (8 + self.page_size)
        self._buf = b""
        self._pos = 0

    def _segments(self, batched: bool = False) -> Iterator[Iterable[Batch]]:
        # RAM records come from one generator per run, chained in C: a generator
        # layer per record would cost as much as parsing it.
        while True:
            state = self._state
            if state is _RAM:
                yield self._ram_runs() if batched else self._ram_records()
                if self._state is _RAM and not self._unbridge():
                    return
            elif state is _RAW:
                yield self._raw_records()
                return
            else:
                rec = self._step()
                if rec is None:
                    if not self._unbridge():
                        return
                    continue
                yield (rec,)

    def close(self) -> None:
        """Declare the end of input; raises StreamError if the stream is incomplete.

        Records complete but not yet drained can still be read with records().
        """
        if self._error is not None:
            raise self._error
        if not self._closed:
            self._closed = True
            # Records not drained yet stay available to records().
            from typing import cast

            self._leftover.extend(cast(Iterator[r.Record], chain.from_iterable(self._segments())))
        self._unbridge()
        end = self._base + len(self._buf)
        state = self._state
        if state is _RAW:
            assert self._tail is not None
            if self.options.packaged:
                return  # a package holds device sections without EOF
            self.device_state_end = self._tail.end()
            if self.device_state_end is None:
                self._fail(
                    "stream truncated inside the device state: it does not end with EOF",
                    self._tail.offset,
                )
            return
        pending = len(self._buf) - self._pos
        if not pending and (
            state in (_AFTER_EOF, _DONE) or (state is _TOP and self.options.packaged)
        ):
            return
        if state is _RAM or state is _FOOTER:
            where = f"section {self._section_id} ({RAM_IDSTR})"
        elif state is _TOP and pending:
            where = f"the {_type_name(self._buf[self._pos])} element starting at byte {self.offset}"
        elif state is _TOP:
            where = "the stream (no EOF)"
        else:
            where = state
        self._fail(f"stream truncated inside {where}", end)

    def _fail(self, message: str, offset: int) -> NoReturn:
        self._error = StreamError(message, offset)
        raise self._error

    # Slow path: everything but RAM records and raw chunks.

    def _step(self) -> r.Record | None:
        cur = Cursor(self._buf, self._pos, self._base)
        try:
            state = self._state
            if state is _HEADER:
                rec: r.Record = self._header(cur)
            elif state is _CONFIG:
                if cur.pos >= len(cur.buf):
                    return None
                if cur.buf[cur.pos] == SectionType.CONFIGURATION:
                    rec = self._configuration(cur)
                    self._state = _TOP
                else:
                    self._state = _TOP
                    return self._step()
            elif state is _FOOTER:
                rec = self._footer(cur)
            elif state is _AFTER_EOF:
                rec = self._vmdesc(cur)
            elif state is _DONE:
                if cur.pos < len(cur.buf):
                    self._fail(
                        f"unexpected data after the VMDESCRIPTION: {cur.buf[cur.pos]:#04x}",
                        cur.offset,
                    )
                return None
            else:
                rec = self._top(cur)
        except NeedMore:
            return None
        if self._state is not _RAW:
            self._pos = cur.pos
        return rec

    def _header(self, cur: Cursor) -> r.StreamHeader:
        at = cur.offset
        magic = cur.be32()
        version = cur.be32()
        if magic != QEVM_MAGIC:
            self._fail(f"bad magic {magic:#010x}, expected {QEVM_MAGIC:#010x} (QEVM)", at)
        if version == QEVM_VERSION_COMPAT:
            self._fail(
                f"stream version {version} is obsolete (QEMU loads only version {QEVM_VERSION})",
                at + 4,
            )
        if version != QEVM_VERSION:
            self._fail(f"unsupported stream version {version}, expected {QEVM_VERSION}", at + 4)
        self._state = _CONFIG
        return r.StreamHeader(version)

    def _configuration(self, cur: Cursor) -> r.Configuration:
        cur.u8()
        at = cur.offset
        length = cur.be32()
        if length > MAX_MACHINE_NAME:
            self._fail(
                f"configuration machine name of {length} bytes (at most {MAX_MACHINE_NAME})", at
            )
        machine = decode_name(cur.take(length))
        subsections: list[r.ConfigSubsection] = []
        seen: set[str] = set()
        while True:
            if cur.pos >= len(cur.buf):
                raise NeedMore
            if cur.buf[cur.pos] != SectionType.SUBSECTION:
                break
            at = cur.offset
            cur.u8()
            name = cur.str8()
            version_id = cur.be32()
            if name in seen:
                self._fail(f"duplicate configuration subsection {name!r}", at)
            seen.add(name)
            if version_id != 1:
                self._fail(f"subsection {name!r} version {version_id}, only 1 is known", at)
            if name == SUBSECTION_TARGET_PAGE_BITS:
                bits_at = cur.offset
                bits = cur.be32()
                try:
                    check_page_size(1 << bits if bits < 64 else 0)
                except ValueError as err:
                    self._fail(f"target-page-bits {bits}: {err}", bits_at)
                subsections.append(r.TargetPageBits(bits, version_id))
            elif name == SUBSECTION_CAPABILITIES:
                count_at = cur.offset
                count = cur.be32()
                if count > MAX_CAPABILITIES:
                    self._fail(
                        f"{count} capabilities in the configuration (at most {MAX_CAPABILITIES})",
                        count_at,
                    )
                caps = tuple(cur.str8() for _ in range(count))
                if CAPABILITY_MAPPED_RAM in caps:
                    self._fail("mapped-ram streams are not supported", count_at)
                subsections.append(r.Capabilities(caps, version_id))
            elif name == SUBSECTION_UUID:
                subsections.append(r.Uuid(cur.take(16), version_id))
            else:
                self._fail(f"unknown configuration subsection {name!r}", at)
        for sub in subsections:
            if isinstance(sub, r.TargetPageBits):
                self.page_size = 1 << sub.bits
            elif isinstance(sub, r.Capabilities) and self.options.ignore_shared is None:
                self._ignore_shared = CAPABILITY_IGNORE_SHARED in sub.names
        self.configuration = r.Configuration(machine, tuple(subsections))
        log.debug("configuration %r, page size %d", machine, self.page_size)
        return self.configuration

    def _footer(self, cur: Cursor) -> r.SectionFooter:
        at = cur.offset
        kind = cur.u8()
        if kind != SectionType.SECTION_FOOTER:
            self._fail(
                f"expected SECTION_FOOTER for section {self._section_id}, got {kind:#04x}", at
            )
        section_id = cur.be32()
        if section_id != self._section_id:
            self._fail(
                f"SECTION_FOOTER for section {section_id}, expected section {self._section_id}",
                at,
            )
        self._state = _TOP
        return r.SectionFooter(section_id)

    def _vmdesc(self, cur: Cursor) -> r.VmDescription:
        at = cur.offset
        kind = cur.u8()
        if kind != SectionType.VMDESCRIPTION:
            self._fail(f"expected VMDESCRIPTION after EOF, got {_type_name(kind)}", at)
        length = cur.be32()
        if length > self.options.max_vmdesc:
            self._fail(
                f"VMDESCRIPTION of {length} bytes (at most {self.options.max_vmdesc})", at + 1
            )
        rec = r.VmDescription(cur.take(length))
        self._state = _DONE
        return rec

    def _top(self, cur: Cursor) -> r.Record:
        at = cur.offset
        kind = cur.u8()
        if kind == SectionType.SECTION_START or kind == SectionType.SECTION_FULL:
            return self._start_or_full(cur, kind, at)
        if kind == SectionType.SECTION_PART or kind == SectionType.SECTION_END:
            section_id = cur.be32()
            if section_id != self.ram_section_id:
                self._fail(f"{_type_name(kind)} for unknown section id {section_id}", at)
            self._section_id = section_id
            self._state = _RAM
            if kind == SectionType.SECTION_PART:
                return r.SectionPart(section_id)
            return r.SectionEnd(section_id)
        if kind == SectionType.COMMAND:
            return self._command(cur, at)
        if kind == SectionType.EOF:
            self._state = _AFTER_EOF
            return r.Eof()
        if kind == SectionType.VMDESCRIPTION:
            self._fail("VMDESCRIPTION before EOF", at)
        if kind in (
            SectionType.CONFIGURATION,
            SectionType.SUBSECTION,
            SectionType.SECTION_FOOTER,
        ):
            self._fail(f"unexpected {_type_name(kind)} between sections", at)
        self._fail(f"unknown section type {kind:#04x}", at)

    def _start_or_full(self, cur: Cursor, kind: int, at: int) -> r.Record:
        section_id = cur.be32()
        idstr = cur.str8()
        instance_id = cur.be32()
        version_id = cur.be32()
        section: r.SectionStart | r.SectionFull
        if kind == SectionType.SECTION_START:
            section = r.SectionStart(section_id, idstr, instance_id, version_id)
        else:
            section = r.SectionFull(section_id, idstr, instance_id, version_id)
        if idstr == RAM_IDSTR:
            if kind != SectionType.SECTION_START:
                self._fail(f"RAM in a SECTION_FULL (section id {section_id})", at)
            if self.ram_section_id is not None:
                self._fail(f"second RAM SECTION_START (section id {section_id})", at)
            if version_id != RAM_VERSION:
                self._fail(f"RAM section version {version_id}, only {RAM_VERSION} is supported", at)
            self.ram_section_id = self._section_id = section_id
            self._state = _RAM
            return section
        if self.ram_section_id is None and self.options.expect_ram and not self.options.packaged:
            self._fail(
                f"device section {idstr!r} (section id {section_id}) before the RAM setup: "
                "it cannot be skipped without its vmstate description",
                at,
            )
        log.debug("device state begins at byte %d with %r", at, idstr)
        self._state = _RAW
        self._tail = DeviceStateEndTracker(at)
        self._unbridge(at - self._base)
        rest = self._buf[at - self._base :]
        self._base = at + len(rest)
        self._buf = b""
        self._pos = 0
        if rest:
            self._raw_pending.insert(0, rest)
        return r.DeviceStateStart(at, section)

    def _command(self, cur: Cursor, at: int) -> r.CommandRecord:
        number = cur.be16()
        length = cur.be16()
        try:
            cmd = MigCommand(number)
        except ValueError:
            self._fail(f"unknown command {number:#06x} (length {length})", at)
        expected = _COMMAND_LENGTH[cmd]
        if expected is not None and length != expected:
            self._fail(f"command {cmd.name} with length {length}, expected {expected}", at)
        payload_at = cur.offset
        payload = Cursor(cur.take(length), 0, payload_at)
        try:
            rec = self._command_payload(cmd, payload, length, at)
        except NeedMore:
            self._fail(f"command {cmd.name} payload of {length} bytes is too short", at)
        if cmd == MigCommand.PACKAGED:
            assert isinstance(rec, r.Packaged)
            size = int.from_bytes(payload.buf, "big")
            if size > self.options.max_packaged:
                self._fail(
                    f"PACKAGED payload of {size} bytes (at most {self.options.max_packaged})",
                    payload_at,
                )
            rec = r.Packaged(cur.take(size))
        return rec

    def _command_payload(self, cmd: MigCommand, p: Cursor, length: int, at: int) -> r.CommandRecord:
        empty = _EMPTY_COMMANDS.get(cmd)
        if empty is not None:
            return empty
        if cmd == MigCommand.PING:
            return r.Ping(p.be32())
        if cmd == MigCommand.PACKAGED:
            return r.Packaged(b"")
        if cmd == MigCommand.POSTCOPY_ADVISE:
            if length == 0:
                return r.PostcopyAdvise(None, None)
            if length != 16:
                self._fail(f"command POSTCOPY_ADVISE with length {length}, expected 0 or 16", at)
            return r.PostcopyAdvise(p.be64(), p.be64())
        if cmd == MigCommand.RECV_BITMAP:
            block = p.str8()
            if p.pos != length:
                self._fail(
                    f"command RECV_BITMAP with length {length}, expected {p.pos} for its name", at
                )
            return r.RecvBitmap(block)
        assert cmd == MigCommand.POSTCOPY_RAM_DISCARD
        version = p.u8()
        if version != 0:
            self._fail(f"POSTCOPY_RAM_DISCARD version {version}, expected 0", p.offset - 1)
        block = p.str8()
        nil = p.u8()
        if nil != 0:
            self._fail(f"POSTCOPY_RAM_DISCARD name not followed by 0 but {nil:#04x}", p.offset - 1)
        left = length - p.pos
        if left <= 0 or left % 16:
            self._fail(
                f"POSTCOPY_RAM_DISCARD with {left} bytes of ranges "
                "(expected a non-zero multiple of 16)",
                at,
            )
        ranges = tuple((p.be64(), p.be64()) for _ in range(left // 16))
        return r.PostcopyRamDiscard(block, ranges, version)

    # Fast path: RAM records.

    def _ram_records(self) -> Iterator[r.Record]:
        page_size = self.page_size
        mask = page_size - 1
        unpack = _BE64.unpack_from
        page_c, zero_c, page, zero = _PAGE_C, _ZERO_C, _PAGE, _ZERO
        new_page, new_zero = r.new_ram_page, r.new_ram_zero
        last = self._last_block
        last_name, last_length = last if last is not None else ("", -1)
        buf = self._buf
        pos = self._pos
        end = len(buf)
        while True:
            if end - pos < 8:
                return
            word = unpack(buf, pos)[0]
            flags = word & mask
            addr = word ^ flags
            if flags == page_c:
                if addr >= last_length:
                    self._bad_continue(addr, pos)
                stop = pos + 8 + page_size
                if stop > end:
                    return
                self._pos = stop
                yield new_page(last_name, addr, buf[pos + 8 : stop], True)
            elif flags == zero_c:
                if addr >= last_length:
                    self._bad_continue(addr, pos)
                stop = pos + 9
                if stop > end:
                    return
                if buf[pos + 8]:
                    self._bad_fill(buf[pos + 8], pos + 8)
                self._pos = stop
                yield new_zero(last_name, addr, True)
            elif flags == page or flags == zero:  # noqa: SIM109 - no tuple per record
                named = self._named_block(buf, pos, end, addr)
                if named is None:
                    return
                blk, name_end = named
                stop = name_end + (page_size if flags == page else 1)
                if stop > end:
                    return
                self._last_block = blk
                last_name, last_length = blk
                if flags == page:
                    self._pos = stop
                    yield new_page(last_name, addr, buf[name_end:stop], False)
                else:
                    if buf[name_end]:
                        self._bad_fill(buf[name_end], name_end)
                    self._pos = stop
                    yield new_zero(last_name, addr, False)
            else:
                rec = self._ram_other(flags, addr)
                if rec is None:
                    return
                yield rec
                if self._state is not _RAM:
                    return
                stop = self._pos
            # feed() during iteration replaces the buffer.
            if self._buf is buf:
                pos = stop
            else:
                buf = self._buf
                pos = self._pos
                end = len(buf)

    def _ram_runs(self) -> Iterator[Batch]:
        """:meth:`_ram_records` for :meth:`batches`: the same checks, pages in runs.

        Only the common case is handled inline: a CONTINUE record extending the open run.
        Anything else closes the run (yielded first, so that records and errors keep
        their stream order) and goes through the per-record code below.
        """
        page_size = self.page_size
        mask = page_size - 1
        unpack = _BE64.unpack_from
        page_c, zero_c, page, zero = _PAGE_C, _ZERO_C, _PAGE, _ZERO
        last = self._last_block
        name, length = last if last is not None else ("", -1)
        buf = self._buf
        view = memoryview(buf)
        pos = self._pos
        end = len(buf)
        pages: list[memoryview] = []
        append = pages.append
        expect = zexpect = -1  # the offset that extends the open page / zero run
        step = 8 + page_size
        ahead = _BULK_MAX  # records checked at once while runs go on (see run_length)
        run_at = zeros = 0
        while True:
            if end - pos < 8:
                break
            word = unpack(buf, pos)[0]
            flags = word & mask
            addr = word ^ flags
            if addr == expect and flags == page_c and addr < length:
                n = min((end - pos) // step, (length - addr) // page_size, ahead)
                if n >= _BULK_MIN:
                    n = 1 << (n.bit_length() - 1)  # few sizes of struct to cache
                    words = _page_words(n, page_size).unpack_from(buf, pos)
                    good = run_length(words, word, page_size)
                    ahead = min(2 * ahead, _BULK_MAX) if good == n else max(good, _BULK_MIN)
                    span = good * step
                    starts = range(pos + 8, pos + 8 + span, step)
                    stops = range(pos + step, pos + step + span, step)
                    pages.extend(map(view.__getitem__, map(slice, starts, stops)))
                    pos += span
                    expect += good * page_size
                    continue
                stop = pos + step
                if stop > end:
                    break
                append(view[pos + 8 : stop])
                pos = stop
                expect += page_size
                continue
            if addr == zexpect and flags == zero_c and addr < length:
                n = min((end - pos) // 9, (length - addr) // page_size, ahead)
                if n >= _BULK_MIN:
                    n = 1 << (n.bit_length() - 1)
                    good = run_length(_zero_words(n).unpack_from(buf, pos), word, page_size)
                    fills = buf[pos + 8 : pos + 9 * good : 9]
                    good -= len(fills.lstrip(b"\0"))  # up to the first bad fill byte
                    ahead = min(2 * ahead, _BULK_MAX) if good == n else max(good, _BULK_MIN)
                    if good:
                        pos += 9 * good
                        zexpect += good * page_size
                        zeros += good
                        continue
                if end - pos < 9:
                    break
                if not buf[pos + 8]:
                    pos += 9
                    zexpect += page_size
                    zeros += 1
                    continue
            # Close the open run, then one record the slow way.
            self._pos = pos
            if pages:
                yield RamPageRun(name, run_at, tuple(pages))
                pages.clear()
                expect = -1
            elif zeros:
                yield RamZeroRun(name, run_at, zeros)
                zeros = 0
                zexpect = -1
            if self._buf is not buf:  # feed() while the consumer held the run
                buf = self._buf
                view = memoryview(buf)
                pos = self._pos
                end = len(buf)
                continue
            if flags == page_c or flags == zero_c:  # noqa: SIM109 - no tuple per record
                if addr >= length:
                    self._bad_continue(addr, pos)
                start = pos + 8
            elif flags == page or flags == zero:  # noqa: SIM109
                named = self._named_block(buf, pos, end, addr)
                if named is None:
                    break
                blk, start = named
                if start + (page_size if flags == page else 1) > end:
                    break
                self._last_block = blk
                name, length = blk
            else:
                rec = self._ram_other(flags, addr)
                if rec is None:
                    break
                yield rec
                if self._state is not _RAM:
                    return
                if self._buf is not buf:
                    buf = self._buf
                    view = memoryview(buf)
                    end = len(buf)
                pos = self._pos
                continue
            run_at = addr
            if flags & _PAGE:
                stop = start + page_size
                if stop > end:
                    break
                append(view[start:stop])
                expect = addr + page_size
            else:
                stop = start + 1
                if stop > end:
                    break
                if buf[start]:
                    self._bad_fill(buf[start], start)
                zeros = 1
                zexpect = addr + page_size
            pos = stop
        self._pos = pos
        if pages:
            yield RamPageRun(name, run_at, tuple(pages))
        elif zeros:
            yield RamZeroRun(name, run_at, zeros)

    def _named_block(
        self, buf: bytes, pos: int, end: int, addr: int
    ) -> tuple[tuple[str, int], int] | None:
        """The block a record without CONTINUE names at ``pos``, and where its name ends.

        None when the name is not all buffered yet; a StreamError for an unknown block or
        an offset beyond it.
        """
        blocks = self._blocks
        if blocks is None:
            self._fail("RAM page before the RAM block list (MEM_SIZE)", self._base + pos)
        if end - pos < 9:
            return None
        name_end = pos + 9 + buf[pos + 8]
        if name_end > end:
            return None
        blk = blocks.get(buf[pos + 9 : name_end])
        if blk is None:
            name = decode_name(buf[pos + 9 : name_end])
            self._fail(f"RAM block {name!r} is not in the MEM_SIZE list", self._base + pos)
        if addr >= blk[1]:
            self._bad_offset(blk[0], addr, blk[1], pos)
        return blk, name_end

    def _bad_continue(self, addr: int, pos: int) -> NoReturn:
        if self._last_block is None:
            self._fail("RAM record with CONTINUE but no previous block", self._base + pos)
        self._bad_offset(self._last_block[0], addr, self._last_block[1], pos)

    def _bad_offset(self, block: str, addr: int, used_length: int, pos: int) -> NoReturn:
        self._fail(
            f"RAM offset {addr:#x} out of block {block!r} (used_length {used_length:#x})",
            self._base + pos,
        )

    def _bad_fill(self, fill: int, pos: int) -> NoReturn:
        self._fail(f"ZERO page fill byte {fill:#04x}, expected 0", self._base + pos)

    def _ram_other(self, flags: int, addr: int) -> r.RamRecord | None:
        at = self._base + self._pos
        if flags & RamFlag.XBZRLE:
            self._fail("XBZRLE pages are not supported", at)
        if flags & RamFlag.COMPRESS_PAGE:
            self._fail("compressed pages (RAM_SAVE_FLAG_COMPRESS_PAGE) are not supported", at)
        if flags & RamFlag.HOOK:
            self._fail("RDMA hook records (RAM_SAVE_FLAG_HOOK) are not supported", at)
        if flags & ~_KNOWN_FLAGS:
            self._fail(
                f"unknown RAM flags {flags & ~_KNOWN_FLAGS:#x} (or an unaligned offset) "
                f"in record {addr | flags:#x}",
                at,
            )
        rec: r.RamRecord
        if flags == RamFlag.EOS or flags == RamFlag.MULTIFD_FLUSH:
            if addr:
                self._fail(f"RAM {RamFlag(flags).name} record with offset {addr:#x}", at)
            self._pos += 8
            if flags == RamFlag.MULTIFD_FLUSH:
                return r.RamMultifdFlush()
            self._state = _FOOTER
            return r.RamEos()
        if flags == RamFlag.MEM_SIZE:
            cur = Cursor(self._buf, self._pos + 8, self._base)
            try:
                rec = self._mem_size(cur, addr, at)
            except NeedMore:
                return None
            self._pos = cur.pos
            return rec
        self._fail(f"invalid RAM flag combination {flags:#x}", at)

    def _carries_page_size(self, name: str) -> bool:
        option = self.options.block_page_sizes
        return option if isinstance(option, bool) else name in option

    def _mem_size(self, cur: Cursor, total: int, at: int) -> r.RamMemSize:
        if self._blocks is not None:
            self._fail("second RAM block list (MEM_SIZE)", at)
        left = total
        blocks: list[r.RamBlockInfo] = []
        names: dict[bytes, tuple[str, int]] = {}
        while left:
            entry_at = cur.offset
            raw = cur.take(cur.u8())
            name = decode_name(raw)
            length = cur.be64()
            page_size = cur.be64() if self._carries_page_size(name) else None
            mr_addr = cur.be64() if self._ignore_shared else None
            if raw in names:
                self._fail(f"RAM block {name!r} listed twice in MEM_SIZE", entry_at)
            if length == 0:
                self._fail(f"RAM block {name!r} has length 0", entry_at)
            if length > left:
                self._fail(
                    f"RAM block {name!r} length {length:#x} exceeds the {left:#x} bytes left "
                    f"of the MEM_SIZE total {total:#x}",
                    entry_at,
                )
            if len(blocks) == MAX_RAM_BLOCKS:
                self._fail(f"more than {MAX_RAM_BLOCKS} RAM blocks in MEM_SIZE", entry_at)
            left -= length
            names[raw] = (name, length)
            blocks.append(r.RamBlockInfo(name, length, page_size, mr_addr))
        self._blocks = names
        self.mem_size = r.RamMemSize(tuple(blocks))
        log.debug("RAM blocks: %s", ", ".join(f"{b.idstr}={b.used_length:#x}" for b in blocks))
        return self.mem_size

    # Raw mode.

    def _raw_records(self) -> Iterator[r.DeviceStateChunk]:
        tail = self._tail
        assert tail is not None
        pending = self._raw_pending
        while pending:
            chunk = pending.pop(0)
            tail.feed(chunk)
            yield r.DeviceStateChunk(chunk)
