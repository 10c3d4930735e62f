"""The frontend end of a vhost-user control connection (QEMU's docs/interop/vhost-user.rst).

Just what a process needs to drive one virtqueue of a qemu-storage-daemon export: feature
negotiation, one shared memory region (passed as a file descriptor), and the queue's
size, addresses and eventfds.  Addresses in the region are offsets: the region is
announced at guest-physical and user address 0, so a descriptor's address is where the
buffer lies in the memfd.

No protocol features are negotiated, so the backend sends no replies except to GET
requests and enables the rings as soon as the features are set.  A backend that dislikes a
message drops the connection: callers notice when they next wait on it.
"""

from __future__ import annotations

import array
import socket
import struct
from collections.abc import Sequence
from enum import IntEnum

from qsnap.image.errors import ImageError
from qsnap.image.virtqueue import RingLayout

VERSION = 0x1
FLAG_REPLY = 1 << 2
VIRTIO_F_VERSION_1 = 1 << 32

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_MEMORY = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13


class VhostUserError(ImageError):
    """The vhost-user connection failed or the backend answered out of protocol."""


class Frontend:
    """One connection to a vhost-user backend's unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: str, timeout: float) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise VhostUserError(
                f"vhost-user connection to {path}: {exc.strerror or exc}"
            ) from None
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        message = _HEADER.pack(request, VERSION, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self.sock.sendmsg([message], ancillary)
        except OSError as exc:
            raise VhostUserError(f"vhost-user {request.name}: {exc.strerror or exc}") from None
        if sent != len(message):
            raise VhostUserError(f"vhost-user {request.name}: short write of {sent} bytes")

    def _receive(self, size: int, request: Request) -> bytes:
        try:
            data = self.sock.recv(size, socket.MSG_WAITALL)
        except OSError as exc:
            raise VhostUserError(f"vhost-user {request.name}: {exc.strerror or exc}") from None
        if len(data) != size:
            raise VhostUserError(f"vhost-user {request.name}: the backend closed the connection")
        return data

    def get_u64(self, request: Request) -> int:
        self.send(request)
        kind, flags, size = _HEADER.unpack(self._receive(_HEADER.size, request))
        if kind != request or not flags & FLAG_REPLY or size != _U64.size:
            raise VhostUserError(
                f"vhost-user {request.name}: unexpected reply (request {kind}, "
                f"flags {flags:#x}, {size} bytes)"
            )
        (value,) = _U64.unpack(self._receive(size, request))
        return int(value)

    def negotiate(self, wanted: int) -> int:
        """Agree on features (VIRTIO_F_VERSION_1 is required); returns those set."""
        offered = self.get_u64(Request.GET_FEATURES)
        if not offered & VIRTIO_F_VERSION_1:
            raise VhostUserError("vhost-user backend does not offer VIRTIO_F_VERSION_1")
        features = (wanted | VIRTIO_F_VERSION_1) & offered
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, _U64.pack(features))
        return features

    def share_memory(self, fd: int, size: int) -> None:
        """Announce one region: the whole of ``fd``, at address 0."""
        region = _REGION.pack(0, size, 0, 0)
        self.send(Request.SET_MEM_TABLE, _MEMORY.pack(1, 0) + region, [fd])

    def start_queue(self, index: int, layout: RingLayout, kick_fd: int, call_fd: int) -> None:
        """Size, addresses, first index and eventfds of queue ``index``: it starts on KICK."""
        self.send(Request.SET_VRING_NUM, _VRING_STATE.pack(index, layout.size))
        self.send(
            Request.SET_VRING_ADDR,
            _VRING_ADDR.pack(index, 0, layout.desc, layout.used, layout.avail, 0),
        )
        self.send(Request.SET_VRING_BASE, _VRING_STATE.pack(index, 0))
        self.send(Request.SET_VRING_CALL, _U64.pack(index), [call_fd])
        self.send(Request.SET_VRING_KICK, _U64.pack(index), [kick_fd])
