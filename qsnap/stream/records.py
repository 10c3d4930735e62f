"""Typed records, one per element of the migration stream.

Each record holds exactly what is needed to write its bytes back unchanged:
``encode(record)`` in writer.py is the inverse of what the reader yields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from .constants import QEVM_VERSION, MigCommand

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeAlias


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """``be32 QEVM_MAGIC, be32 version``."""

    version: int = QEVM_VERSION


@dataclass(frozen=True, slots=True)
class TargetPageBits:
    """configuration/target-page-bits: ``be32 bits`` (never sent on x86)."""

    bits: int
    version_id: int = 1


@dataclass(frozen=True, slots=True)
class Capabilities:
    """configuration/capabilities: ``be32 count`` + count x str8 capability name."""

    names: tuple[str, ...]
    version_id: int = 1


@dataclass(frozen=True, slots=True)
class Uuid:
    """configuration/uuid: 16 bytes (only with validate-uuid)."""

    uuid: bytes
    version_id: int = 1


ConfigSubsection: TypeAlias = TargetPageBits | Capabilities | Uuid


@dataclass(frozen=True, slots=True)
class Configuration:
    """CONFIGURATION: ``be32 len`` + machine type, then subsections in wire order."""

    machine: str
    subsections: tuple[ConfigSubsection, ...] = ()


@dataclass(frozen=True, slots=True)
class SectionStart:
    """SECTION_START: ``be32 id, str8 idstr, be32 instance_id, be32 version_id``."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionFull:
    """SECTION_FULL: same header as START; the body is a whole vmstate."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    """SECTION_PART: ``be32 id``."""

    section_id: int


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """SECTION_END: ``be32 id``."""

    section_id: int


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """SECTION_FOOTER: ``be32 id``, closes every START/PART/END/FULL body."""

    section_id: int


@dataclass(frozen=True, slots=True)
class Command:
    """Base of the COMMAND records (``be16 cmd, be16 len, payload``)."""


@dataclass(frozen=True, slots=True)
class OpenReturnPath(Command):
    """OPEN_RETURN_PATH: no payload."""


@dataclass(frozen=True, slots=True)
class Ping(Command):
    """PING: ``be32 value``, answered by a PONG on the return path."""

    value: int


@dataclass(frozen=True, slots=True)
class PostcopyAdvise(Command):
    """POSTCOPY_ADVISE: ``be64 ram page-size summary, be64 target page size``.

    Both are None for the empty form QEMU sends when only dirty-bitmap postcopy
    is on.
    """

    ram_pagesize_summary: int | None
    target_page_size: int | None


@dataclass(frozen=True, slots=True)
class PostcopyListen(Command):
    """POSTCOPY_LISTEN: no payload."""


@dataclass(frozen=True, slots=True)
class PostcopyRun(Command):
    """POSTCOPY_RUN: no payload."""


@dataclass(frozen=True, slots=True)
class PostcopyRamDiscard(Command):
    """POSTCOPY_RAM_DISCARD: ``u8 version, str8 block, u8 0``, then ranges.

    Each range is ``(be64 start, be64 length)`` in bytes within the block.
    """

    block: str
    ranges: tuple[tuple[int, int], ...]
    version: int = 0


@dataclass(frozen=True, slots=True)
class Packaged(Command):
    """PACKAGED: ``be32 N`` as the command payload, then N bytes of nested stream.

    The nested stream has no header; read it with
    ``StreamReader(StreamOptions(packaged=True))``.
    """

    payload: bytes


@dataclass(frozen=True, slots=True)
class EnableColo(Command):
    """ENABLE_COLO: no payload."""


@dataclass(frozen=True, slots=True)
class PostcopyResume(Command):
    """POSTCOPY_RESUME: no payload."""


@dataclass(frozen=True, slots=True)
class RecvBitmap(Command):
    """RECV_BITMAP: str8 block name."""

    block: str


@dataclass(frozen=True, slots=True)
class SwitchoverStart(Command):
    """SWITCHOVER_START: no payload."""


@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One entry of the MEM_SIZE block list.

    ``page_size`` and ``mr_addr`` are None when absent from the wire (see
    StreamOptions.block_page_sizes and StreamOptions.ignore_shared).
    """

    idstr: str
    used_length: int
    page_size: int | None = None
    mr_addr: int | None = None


@dataclass(frozen=True, slots=True)
class RamMemSize:
    """MEM_SIZE: the RAM block list; the total is the sum of the lengths."""

    blocks: tuple[RamBlockInfo, ...]

    @property
    def total(self) -> int:
        return sum(block.used_length for block in self.blocks)


@dataclass(frozen=True, slots=True)
class RamZero:
    """ZERO: a page of zeros (fill byte 0); ``continued``: CONTINUE was set."""

    block: str
    offset: int
    continued: bool


@dataclass(frozen=True, slots=True)
class RamPage:
    """PAGE: a full target page of data; ``continued``: CONTINUE was set."""

    block: str
    offset: int
    data: bytes
    continued: bool


@dataclass(frozen=True, slots=True)
class RamEos:
    """EOS: ends the body of every RAM START/PART/END section."""


@dataclass(frozen=True, slots=True)
class RamMultifdFlush:
    """MULTIFD_FLUSH: a multifd synchronisation point (no payload)."""


@dataclass(frozen=True, slots=True)
class Eof:
    """EOF: end of the device state (VMDESCRIPTION may follow)."""


@dataclass(frozen=True, slots=True)
class VmDescription:
    """VMDESCRIPTION: ``be32 len`` + JSON describing the device state."""

    json: bytes


@dataclass(frozen=True, slots=True)
class DeviceStateStart:
    """Raw mode begins: the device state from ``offset`` on is opaque.

    ``section`` is the header of the first device section, for information: its
    bytes are part of the DeviceStateChunk records that follow, which carry every
    byte from ``offset`` (that section's type byte) to the end of the stream.
    """

    offset: int
    section: SectionStart | SectionFull


@dataclass(frozen=True, slots=True)
class DeviceStateChunk:
    """Raw device-state bytes, passed through in the chunks they were fed."""

    data: bytes


RamRecord: TypeAlias = RamMemSize | RamZero | RamPage | RamEos | RamMultifdFlush
CommandRecord: TypeAlias = (
    OpenReturnPath
    | Ping
    | PostcopyAdvise
    | PostcopyListen
    | PostcopyRun
    | PostcopyRamDiscard
    | Packaged
    | EnableColo
    | PostcopyResume
    | RecvBitmap
    | SwitchoverStart
)
Record: TypeAlias = (
    StreamHeader
    | Configuration
    | SectionStart
    | SectionFull
    | SectionPart
    | SectionEnd
    | SectionFooter
    | CommandRecord
    | RamRecord
    | Eof
    | VmDescription
    | DeviceStateStart
    | DeviceStateChunk
)

COMMAND_NUMBERS: dict[type[Command], MigCommand] = {
    OpenReturnPath: MigCommand.OPEN_RETURN_PATH,
    Ping: MigCommand.PING,
    PostcopyAdvise: MigCommand.POSTCOPY_ADVISE,
    PostcopyListen: MigCommand.POSTCOPY_LISTEN,
    PostcopyRun: MigCommand.POSTCOPY_RUN,
    PostcopyRamDiscard: MigCommand.POSTCOPY_RAM_DISCARD,
    Packaged: MigCommand.PACKAGED,
    EnableColo: MigCommand.ENABLE_COLO,
    PostcopyResume: MigCommand.POSTCOPY_RESUME,
    RecvBitmap: MigCommand.RECV_BITMAP,
    SwitchoverStart: MigCommand.SWITCHOVER_START,
}


def _fast_factory(cls: type[Any]) -> Callable[..., Any]:
    """A constructor for a frozen slotted dataclass that skips its ``__init__``.

    The generated ``__init__`` of a frozen dataclass calls ``object.__setattr__``
    per field, which doubles the cost of a RAM record; the reader builds millions
    of them, so it stores the fields through the slot descriptors instead. The
    result is an ordinary instance, equal to one built by ``__init__``.
    """
    setters = tuple(getattr(cls, f.name).__set__ for f in fields(cls))
    new = object.__new__
    if len(setters) == 3:
        s0, s1, s2 = setters

        def make3(a: Any, b: Any, c: Any) -> Any:
            obj = new(cls)
            s0(obj, a)
            s1(obj, b)
            s2(obj, c)
            return obj

        return make3
    s0, s1, s2, s3 = setters

    def make4(a: Any, b: Any, c: Any, d: Any) -> Any:
        obj = new(cls)
        s0(obj, a)
        s1(obj, b)
        s2(obj, c)
        s3(obj, d)
        return obj

    return make4


new_ram_page: Callable[[str, int, bytes, bool], RamPage] = _fast_factory(RamPage)
new_ram_zero: Callable[[str, int, bool], RamZero] = _fast_factory(RamZero)
