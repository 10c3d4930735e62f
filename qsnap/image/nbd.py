"""A small synchronous NBD client (fixed newstyle, structured replies) over a unix socket.

Scope is what qsnap needs from qemu-storage-daemon: NBD_OPT_STRUCTURED_REPLY,
NBD_OPT_SET_META_CONTEXT (``base:allocation``) and NBD_OPT_GO, then READ, WRITE,
WRITE_ZEROES, TRIM, FLUSH and BLOCK_STATUS.  Requests are pipelined: ``submit_*`` sends
and returns a cookie, :meth:`NbdClient.wait` collects the reply; at most ``window``
requests are on the wire (QEMU's server serves 16 at a time, so a window <= 16 can never
deadlock a synchronous client).  Replies may come back in any order.  Commands without a
result (write, zeroes, trim, flush) are retired as soon as their reply arrives; an error
reply raises :class:`NbdError` at once, carrying the server's message when it sent one.
Protocol reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from types import TracebackType

from qsnap.image.errors import NbdError

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
BASE_ALLOCATION = "base:allocation"
MAX_WINDOW = 16
IOV_MAX = 1024
SEND_BUFFER = 4 << 20


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4


REP_ERR_BIT = 1 << 31


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    NONE = 0
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ChunkType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


CHUNK_FLAG_DONE = 1


class AllocFlag(IntFlag):
    """``base:allocation`` status bits."""

    NONE = 0
    HOLE = 1
    ZERO = 2


# NBD error numbers are fixed by the protocol; map them to local errno values.
_NBD_ERRNO = {
    1: errno_mod.EPERM,
    5: errno_mod.EIO,
    12: errno_mod.ENOMEM,
    22: errno_mod.EINVAL,
    28: errno_mod.ENOSPC,
    75: errno_mod.EOVERFLOW,
    95: errno_mod.ENOTSUP,
    108: errno_mod.ESHUTDOWN,
}

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">HHQI")  # after the magic


@dataclass(frozen=True)
class StatusExtent:
    """One ``base:allocation`` extent in export coordinates."""

    offset: int
    length: int
    flags: AllocFlag


@dataclass
class _Pending:
    cmd: Cmd
    offset: int
    length: int
    buffer: bytearray | None = None
    extents: list[StatusExtent] = field(default_factory=list)
    error: NbdError | None = None


def _errno_text(nbd_errno: int) -> tuple[int, str]:
    local = _NBD_ERRNO.get(nbd_errno, errno_mod.EIO)
    return local, os.strerror(local)


class NbdClient:
    """One NBD connection; use as a context manager or call :meth:`close`."""

    def __init__(self, sock: socket.socket, window: int = 8) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be 1..{MAX_WINDOW}")
        self._sock = sock
        self.window = window
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.max_payload = 32 * 1024 * 1024
        self.meta_context_id: int | None = None
        self._next_cookie = 1
        self._pending: dict[int, _Pending] = {}
        self._done: dict[int, _Pending] = {}

    # -- connection ---------------------------------------------------------------------

    @classmethod
    def connect(
        cls, path: str, export: str, *, window: int = 8, timeout: float = 60.0
    ) -> NbdClient:
        """Connect and negotiate; ``timeout`` bounds every single socket operation."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        # Room for whole requests in the kernel: fewer blocking hand-offs to the server
        # (the kernel caps this at net.core.wmem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            sock.connect(path)
            client = cls(sock, window)
            client._handshake(export)
        except OSError as exc:
            sock.close()
            raise NbdError(
                f"NBD connection to {path}: {exc.strerror or exc}", exc.errno or 0
            ) from None
        except BaseException:
            sock.close()
            raise
        return client

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(graceful=exc_type is None)

    def close(self, *, graceful: bool = True) -> None:
        """Send NBD_CMD_DISC after draining (when graceful), then close the socket."""
        if self._sock.fileno() < 0:
            return
        try:
            if graceful:
                self.drain()
                self._send(_REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
        except (OSError, NbdError):
            pass
        finally:
            self._sock.close()

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    # -- low-level I/O ------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> None:
        while view:
            try:
                n = self._sock.recv_into(view)
            except TimeoutError:
                raise NbdError("NBD server did not answer in time") from None
            except ConnectionResetError:
                n = 0
            except OSError as exc:
                raise NbdError(f"NBD receive failed: {exc.strerror or exc}") from None
            if n == 0:
                raise NbdError("NBD server closed the connection")
            view = view[n:]

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send_all(
        self, header: bytes, payload: tuple[bytes | bytearray | memoryview, ...], length: int
    ) -> bool:
        """One sendmsg of a whole request; False (nothing sent) when the socket has no room.

        The common case of a large write costs no per-part work at all; otherwise
        :meth:`_send` takes over (after a partial send, with what is left).
        """
        try:
            sent = self._sock.sendmsg(
                (header, *payload), (), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
            )
        except BlockingIOError:
            return False
        except OSError as exc:
            raise NbdError(f"NBD send failed: {exc.strerror or exc}") from None
        if sent == len(header) + length:
            return True
        parts: list[bytes | bytearray | memoryview] = [header, *payload]
        for i, part in enumerate(parts):
            n = memoryview(part).nbytes
            if sent < n:
                self._send(memoryview(part).cast("B")[sent:], *parts[i + 1 :])
                return True
            sent -= n
        return True

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        views: list[bytes | memoryview] = [
            p if type(p) is bytes else memoryview(p).cast("B") for p in parts if len(p)
        ]
        i = 0
        try:
            while i < len(views):
                # MSG_NOSIGNAL: a dead server is an EPIPE error here, never a SIGPIPE
                sent = self._sock.sendmsg(views[i : i + 1024], (), socket.MSG_NOSIGNAL)
                while sent:
                    n = len(views[i])
                    if sent >= n:
                        sent -= n
                        i += 1
                    else:
                        views[i] = memoryview(views[i])[sent:]
                        sent = 0
        except TimeoutError:
            raise NbdError("NBD server stopped reading requests") from None
        except OSError as exc:
            raise NbdError(f"NBD send failed: {exc.strerror or exc}") from None

    # -- handshake ----------------------------------------------------------------------

    def _option(self, opt: Opt, data: bytes) -> None:
        self._send(struct.pack(">QII", IHAVEOPT, opt, len(data)), data)

    def _option_reply(self, opt: Opt) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or ropt != opt:
            raise NbdError(f"NBD option {opt.name}: bad reply (magic {magic:#x}, opt {ropt})")
        if length > 64 * 1024 * 1024:
            raise NbdError(f"NBD option {opt.name}: reply of {length} bytes")
        data = self._recv(length)
        if rtype & REP_ERR_BIT:
            msg = data.decode("utf-8", "replace") or f"error {rtype & ~REP_ERR_BIT}"
            raise NbdError(f"NBD option {opt.name} refused: {msg}")
        return rtype, data

    def _handshake(self, export: str) -> None:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError("not an NBD newstyle server")
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdError("NBD server does not support fixed newstyle negotiation")
        cflags = HandshakeFlag.FIXED_NEWSTYLE | (hflags & HandshakeFlag.NO_ZEROES)
        self._send(struct.pack(">I", cflags))

        self._option(Opt.STRUCTURED_REPLY, b"")
        rtype, _ = self._option_reply(Opt.STRUCTURED_REPLY)
        if rtype != Rep.ACK:
            raise NbdError("NBD server did not acknowledge structured replies")

        name = export.encode()
        query = BASE_ALLOCATION.encode()
        self._option(
            Opt.SET_META_CONTEXT,
            struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query,
        )
        while True:
            rtype, data = self._option_reply(Opt.SET_META_CONTEXT)
            if rtype == Rep.ACK:
                break
            if rtype == Rep.META_CONTEXT and data[4:] == query:
                self.meta_context_id = struct.unpack_from(">I", data)[0]

        self._option(
            Opt.GO,
            struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE),
        )
        have_export = False
        while True:
            rtype, data = self._option_reply(Opt.GO)
            if rtype == Rep.ACK:
                break
            if rtype != Rep.INFO or len(data) < 2:
                continue
            (info,) = struct.unpack_from(">H", data)
            if info == Info.EXPORT and len(data) >= 12:
                self.size, flags = struct.unpack_from(">QH", data, 2)
                self.flags = TransmissionFlag(flags)
                have_export = True
            elif info == Info.BLOCK_SIZE and len(data) >= 14:
                _, _, maximum = struct.unpack_from(">III", data, 2)
                self.max_payload = min(self.max_payload, maximum)
        if not have_export:
            raise NbdError(f"NBD export {export!r}: server sent no size")
        log.debug("NBD export %s: %d bytes, flags %r", export, self.size, self.flags)

    # -- requests -----------------------------------------------------------------------

    def _submit(
        self,
        cmd: Cmd,
        offset: int,
        length: int,
        flags: CmdFlag = CmdFlag.NONE,
        *payload: bytes | bytearray | memoryview,
    ) -> int:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError(
                f"NBD {cmd.name} at {offset:#x}+{length:#x} beyond the export ({self.size:#x})"
            )
        if length >= 1 << 32:
            raise NbdError(f"NBD {cmd.name} of {length} bytes is too large")
        while len(self._pending) >= self.window:
            self._receive_reply()
        cookie = self._next_cookie
        self._next_cookie += 1
        pending = _Pending(cmd, offset, length)
        if cmd == Cmd.READ:
            pending.buffer = bytearray(length)
        self._pending[cookie] = pending
        header = _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if cmd == Cmd.WRITE and len(payload) < IOV_MAX and self._send_all(header, payload, length):
            return cookie
        self._send(header, *payload)
        return cookie

    def submit_read(self, offset: int, length: int) -> int:
        if length > self.max_payload:
            raise NbdError(f"NBD READ of {length} bytes exceeds the server maximum")
        return self._submit(Cmd.READ, offset, length)

    def submit_write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> int:
        """Send a write; ``data`` is fully on the socket when this returns (reusable)."""
        length = memoryview(data).nbytes
        if length > self.max_payload:
            raise NbdError(f"NBD WRITE of {length} bytes exceeds the server maximum")
        flags = CmdFlag.FUA if fua else CmdFlag.NONE
        return self._submit(Cmd.WRITE, offset, length, flags, data)

    def submit_writev(
        self,
        offset: int,
        parts: list[bytes | memoryview],
        *,
        fua: bool = False,
        length: int | None = None,
    ) -> int:
        """One WRITE of the concatenation of ``parts``, sent with sendmsg (no copy).

        ``length``: their total size, when the caller knows it (saves a pass over them).
        """
        if length is None:
            length = sum(len(p) if type(p) is bytes else memoryview(p).nbytes for p in parts)
        if length > self.max_payload:
            raise NbdError(f"NBD WRITE of {length} bytes exceeds the server maximum")
        flags = CmdFlag.FUA if fua else CmdFlag.NONE
        return self._submit(Cmd.WRITE, offset, length, flags, *parts)

    def submit_write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False
    ) -> int:
        """Zero a range; ``may_trim`` lets qcow2 just mark clusters zero (no allocation)."""
        flags = CmdFlag.NONE if may_trim else CmdFlag.NO_HOLE
        if fast:
            flags |= CmdFlag.FAST_ZERO
        return self._submit(Cmd.WRITE_ZEROES, offset, length, flags)

    def submit_trim(self, offset: int, length: int) -> int:
        return self._submit(Cmd.TRIM, offset, length)

    def submit_flush(self) -> int:
        return self._submit(Cmd.FLUSH, 0, 0)

    def submit_block_status(self, offset: int, length: int) -> int:
        if self.meta_context_id is None:
            raise NbdError("NBD server did not agree to base:allocation")
        return self._submit(Cmd.BLOCK_STATUS, offset, length)

    # -- replies ------------------------------------------------------------------------

    def _fail(self, cookie: int, pending: _Pending, nbd_errno: int, message: str) -> None:
        local, text = _errno_text(nbd_errno)
        where = f"NBD {pending.cmd.name} at {pending.offset:#x}+{pending.length:#x}"
        detail = f"{text}: {message}" if message and message != text else text
        pending.error = NbdError(f"{where}: {detail}", local)

    def _finish(self, cookie: int) -> None:
        pending = self._pending.pop(cookie)
        if pending.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            self._done[cookie] = pending
        elif pending.error is not None:
            raise pending.error

    def _receive_reply(self) -> None:
        """Receive one simple reply or one structured chunk."""
        (magic,) = struct.unpack(">I", self._recv(4))
        if magic == SIMPLE_REPLY_MAGIC:
            _, err, cookie = _SIMPLE_REPLY.unpack(b"\0\0\0\0" + self._recv(12))
            pending = self._pending_for(cookie)
            if err:
                self._fail(cookie, pending, err, "")
            elif pending.cmd == Cmd.READ and pending.buffer is not None:
                self._recv_into(memoryview(pending.buffer))
            self._finish(cookie)
            return
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdError(f"NBD reply with bad magic {magic:#x}")
        flags, ctype, cookie, length = _CHUNK_HEADER.unpack(self._recv(16))
        pending = self._pending_for(cookie)
        if ctype == ChunkType.OFFSET_DATA and pending.buffer is not None and length >= 8:
            (offset,) = struct.unpack(">Q", self._recv(8))
            start = offset - pending.offset
            if start < 0 or start + length - 8 > pending.length:
                raise NbdError(f"NBD read chunk at {offset:#x} outside the request")
            self._recv_into(memoryview(pending.buffer)[start : start + length - 8])
        elif length > self.max_payload + 1024:
            raise NbdError(f"NBD reply chunk of {length} bytes is too large")
        else:
            self._chunk(cookie, pending, ChunkType(ctype), self._recv(length))
        if flags & CHUNK_FLAG_DONE:
            self._finish(cookie)

    def _pending_for(self, cookie: int) -> _Pending:
        try:
            return self._pending[cookie]
        except KeyError:
            raise NbdError(f"NBD reply for unknown cookie {cookie}") from None

    def _chunk(self, cookie: int, pending: _Pending, ctype: ChunkType, data: bytes) -> None:
        if ctype in (ChunkType.ERROR, ChunkType.ERROR_OFFSET):
            err, mlen = struct.unpack_from(">IH", data)
            self._fail(cookie, pending, err, data[6 : 6 + mlen].decode("utf-8", "replace"))
        elif ctype == ChunkType.OFFSET_HOLE:
            offset, hlen = struct.unpack(">QI", data)
            start = offset - pending.offset
            if pending.buffer is None or start < 0 or start + hlen > pending.length:
                raise NbdError(f"NBD hole chunk at {offset:#x} outside the request")
            # the read buffer starts zeroed: a hole needs no copy
        elif ctype == ChunkType.BLOCK_STATUS:
            (context,) = struct.unpack_from(">I", data)
            if context != self.meta_context_id:
                return
            pos = pending.offset
            for i in range(4, len(data) - 7, 8):
                elen, eflags = struct.unpack_from(">II", data, i)
                pending.extents.append(StatusExtent(pos, elen, AllocFlag(eflags & 3)))
                pos += elen
        elif ctype != ChunkType.NONE:
            raise NbdError(f"NBD reply chunk of unexpected type {ctype}")

    def wait(self, cookie: int) -> _Pending:
        """Block until ``cookie`` completes; raise its error, if any."""
        while cookie in self._pending:
            self._receive_reply()
        pending = self._done.pop(cookie, None)
        if pending is None:
            if cookie >= self._next_cookie:
                raise NbdError(f"NBD cookie {cookie} was never submitted")
            return _Pending(Cmd.FLUSH, 0, 0)  # retired without error
        if pending.error is not None:
            raise pending.error
        return pending

    def wait_read(self, cookie: int) -> bytearray:
        pending = self.wait(cookie)
        if pending.buffer is None:
            raise NbdError(f"NBD cookie {cookie} is not a read")
        return pending.buffer

    def drain(self) -> None:
        """Wait for every request on the wire; raise the first error."""
        while self._pending:
            self._receive_reply()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- synchronous helpers ------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytearray:
        return self.wait_read(self.submit_read(offset, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.wait(self.submit_write(offset, data))

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True) -> None:
        self.wait(self.submit_write_zeroes(offset, length, may_trim=may_trim))

    def trim(self, offset: int, length: int) -> None:
        self.wait(self.submit_trim(offset, length))

    def flush(self) -> None:
        self.wait(self.submit_flush())

    def block_status(self, offset: int, length: int) -> list[StatusExtent]:
        """Extents from ``offset``; the server may describe less than ``length``."""
        return self.wait(self.submit_block_status(offset, length)).extents

    def iter_block_status(self, offset: int, length: int) -> Iterator[StatusExtent]:
        """Extents covering exactly ``[offset, offset+length)``, merged across replies."""
        end = offset + length
        while offset < end:
            chunk = min(end - offset, 1 << 30)
            extents = self.block_status(offset, chunk)
            if sum(ext.length for ext in extents) == 0:
                raise NbdError(f"NBD BLOCK_STATUS at {offset:#x}: empty reply")
            for ext in extents:
                stop = min(ext.offset + ext.length, end)
                if stop > offset:
                    yield StatusExtent(offset, stop - offset, ext.flags)
                    offset = stop
