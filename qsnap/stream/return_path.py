"""The return path (destination to source): ``be16 type, be16 len, payload``.

Layouts follow migration/migration.c (rp_cmd_args, source_return_path_thread and
the migrate_send_rp_* senders). RECV_BITMAP, used by postcopy recovery, is followed
outside its message by ``be64 size, size bytes of bitmap, be64 ending marker``
(ramblock_recv_bitmap_send); the reader returns both as one RecvBitmap.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .constants import RECV_BITMAP_ENDING, ReturnPathType
from .cursor import Cursor, NeedMore
from .errors import StreamError
from .text import encode_str8

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, TypeAlias

MAX_MESSAGE = 512
"""QEMU's source reads a message into a 512-byte buffer and rejects longer ones."""
MAX_BITMAP = 64 << 20

_HEAD = struct.Struct(">HH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

_FIXED_LENGTH: dict[ReturnPathType, int | None] = {
    ReturnPathType.SHUT: 4,
    ReturnPathType.PONG: 4,
    ReturnPathType.REQ_PAGES: 12,
    ReturnPathType.REQ_PAGES_ID: None,
    ReturnPathType.RECV_BITMAP: None,
    ReturnPathType.RESUME_ACK: 4,
    ReturnPathType.SWITCHOVER_ACK: 0,
}


@dataclass(frozen=True, slots=True)
class Shut:
    """SHUT: ``be32 status``, 0 when the destination loaded the stream, 1 on failure."""

    status: int


@dataclass(frozen=True, slots=True)
class Pong:
    """PONG: ``be32 value`` of the PING it answers."""

    value: int


@dataclass(frozen=True, slots=True)
class ReqPagesId:
    """REQ_PAGES_ID: ``be64 start, be32 len, str8 block``: pages wanted now."""

    start: int
    length: int
    block: str


@dataclass(frozen=True, slots=True)
class ReqPages:
    """REQ_PAGES: ``be64 start, be32 len`` in the block of the previous request."""

    start: int
    length: int


@dataclass(frozen=True, slots=True)
class RecvBitmap:
    """RECV_BITMAP: ``str8 block`` and the received-pages bitmap that follows it.

    ``bitmap`` is little-endian, one bit per target page, padded to 8 bytes.
    """

    block: str
    bitmap: bytes


@dataclass(frozen=True, slots=True)
class ResumeAck:
    """RESUME_ACK: ``be32 value``."""

    value: int


@dataclass(frozen=True, slots=True)
class SwitchoverAck:
    """SWITCHOVER_ACK: no payload."""


ReturnPathMessage: TypeAlias = (
    Shut | Pong | ReqPagesId | ReqPages | RecvBitmap | ResumeAck | SwitchoverAck
)


def encode_message(msg: ReturnPathMessage) -> bytes:
    """The wire bytes of a return-path message."""
    if isinstance(msg, Shut):
        kind, payload = ReturnPathType.SHUT, _BE32.pack(msg.status)
    elif isinstance(msg, Pong):
        kind, payload = ReturnPathType.PONG, _BE32.pack(msg.value)
    elif isinstance(msg, ReqPagesId):
        kind = ReturnPathType.REQ_PAGES_ID
        payload = struct.pack(">QI", msg.start, msg.length) + encode_str8(msg.block)
    elif isinstance(msg, ReqPages):
        kind, payload = ReturnPathType.REQ_PAGES, struct.pack(">QI", msg.start, msg.length)
    elif isinstance(msg, RecvBitmap):
        name = encode_str8(msg.block)
        if len(msg.bitmap) % 8:
            raise ValueError("a RECV_BITMAP bitmap is a whole number of 8-byte words")
        return (
            _HEAD.pack(ReturnPathType.RECV_BITMAP, len(name))
            + name
            + _BE64.pack(len(msg.bitmap))
            + msg.bitmap
            + _BE64.pack(RECV_BITMAP_ENDING)
        )
    elif isinstance(msg, ResumeAck):
        kind, payload = ReturnPathType.RESUME_ACK, _BE32.pack(msg.value)
    elif isinstance(msg, SwitchoverAck):
        kind, payload = ReturnPathType.SWITCHOVER_ACK, b""
    else:
        raise TypeError(f"not a return-path message: {msg!r}")
    return _HEAD.pack(kind, len(payload)) + payload


class ReturnPathReader:
    """Incremental, sans-I/O reader of return-path messages.

    feed() bytes as they arrive, drain messages(), close() at end of input.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._base = 0
        self._error: StreamError | None = None

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._base += self._pos
        self._buf = self._buf[self._pos :] + data
        self._pos = 0

    def messages(self) -> Iterator[ReturnPathMessage]:
        if self._error is not None:
            raise self._error
        try:
            while True:
                cur = Cursor(self._buf, self._pos, self._base)
                try:
                    msg = self._message(cur)
                except NeedMore:
                    return
                self._pos = cur.pos
                yield msg
        except StreamError as err:
            self._error = err
            raise

    def close(self) -> None:
        """Raise StreamError if the input ended inside a message."""
        if self._error is not None:
            raise self._error
        if self._pos < len(self._buf):
            end = self._base + len(self._buf)
            self._fail(
                f"return path truncated inside the message starting at byte {self.offset}",
                end,
            )

    def _fail(self, message: str, offset: int) -> NoReturn:
        self._error = StreamError(message, offset)
        raise self._error

    def _message(self, cur: Cursor) -> ReturnPathMessage:
        at = cur.offset
        number = cur.be16()
        length = cur.be16()
        try:
            kind = ReturnPathType(number)
        except ValueError:
            self._fail(f"unknown return-path message {number:#06x} (length {length})", at)
        expected = _FIXED_LENGTH[kind]
        if (expected is not None and length != expected) or length > MAX_MESSAGE:
            self._fail(
                f"return-path {kind.name} with length {length}, expected "
                f"{expected if expected is not None else f'at most {MAX_MESSAGE}'}",
                at,
            )
        payload = Cursor(cur.take(length), 0, cur.offset)
        try:
            msg = self._payload(kind, payload, length, at)
        except NeedMore:
            self._fail(f"return-path {kind.name} payload of {length} bytes is too short", at)
        if isinstance(msg, RecvBitmap):
            size_at = cur.offset
            size = cur.be64()
            if size > MAX_BITMAP or size % 8:
                self._fail(f"RECV_BITMAP bitmap of {size} bytes", size_at)
            bitmap = cur.take(size)
            end_at = cur.offset
            if cur.be64() != RECV_BITMAP_ENDING:
                self._fail("RECV_BITMAP bitmap without its ending marker", end_at)
            msg = RecvBitmap(msg.block, bitmap)
        return msg

    def _payload(self, kind: ReturnPathType, p: Cursor, length: int, at: int) -> ReturnPathMessage:
        if kind == ReturnPathType.SHUT:
            return Shut(p.be32())
        if kind == ReturnPathType.PONG:
            return Pong(p.be32())
        if kind == ReturnPathType.RESUME_ACK:
            return ResumeAck(p.be32())
        if kind == ReturnPathType.SWITCHOVER_ACK:
            return SwitchoverAck()
        if kind == ReturnPathType.REQ_PAGES:
            return ReqPages(p.be64(), p.be32())
        if kind == ReturnPathType.REQ_PAGES_ID:
            start, size, block = p.be64(), p.be32(), p.str8()
        else:
            start = size = 0
            block = p.str8()
        if p.pos != length:
            self._fail(
                f"return-path {kind.name} with length {length}, expected {p.pos} for its fields",
                at,
            )
        if kind == ReturnPathType.REQ_PAGES_ID:
            return ReqPagesId(start, size, block)
        return RecvBitmap(block, b"")
