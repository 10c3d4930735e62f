"""``SnapshotImage``: an open image (daemon + NBD) with page-addressed reads.

This is the API ``qsnap revert`` and ``qsnap verify`` read through; the save side lives in
:mod:`qsnap.image.writer` and uses the same object for its I/O.  Opened with
``shared_reads`` (or, writable, ``shared_writes``), the daemon also exports the image
over vhost-user-blk: :meth:`SnapshotImage.read_spans` reads page data into memory shared
with it, and :meth:`SnapshotImage.submit_writev` writes through it.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType

from qsnap.image import layout
from qsnap.image.daemon import StorageDaemon
from qsnap.image.errors import ImageError, IncompleteImage, NbdError, NotAnImage
from qsnap.image.layout import BlockEntry, Header
from qsnap.image.nbd import AllocFlag, NbdClient
from qsnap.image.span import Span
from qsnap.image.spec import BlockdevSpec, parse_spec
from qsnap.image.vhost_blk import SECTOR, VhostBlkDevice, VhostWriteError
from qsnap.image.virtqueue import ORDERED_HOST

log = logging.getLogger(__name__)

CHUNK = layout.MiB
WRITE_SLOT = 2 * layout.MiB
"""The largest write that goes through shared memory (one slot; larger ones use NBD)."""
FLUSHED_GRACE = 5.0  # seconds for the daemon to exit once all was flushed (see close())


@dataclass(frozen=True)
class Extent:
    """A run of a RAM block; ``zero`` extents read as zeros and need not be read."""

    offset: int
    length: int
    zero: bool


@dataclass(frozen=True)
class Mismatch:
    """A page whose stored bytes do not match the digest recorded at save time."""

    block: str
    offset: int

    def __str__(self) -> str:
        return f"block {self.block!r} page at offset {self.offset:#x}"


@dataclass(frozen=True)
class VerifyResult:
    pages: int
    mismatches: tuple[Mismatch, ...]
    mismatch_count: int
    device_state_ok: bool

    @property
    def ok(self) -> bool:
        return self.mismatch_count == 0 and self.device_state_ok


class SnapshotImage:
    """An image opened through a private qemu-storage-daemon.

    ``open()`` does not judge the header: :meth:`read_header` returns what is there (or
    raises :class:`NotAnImage`), :meth:`complete_header` also refuses an unfinished save.
    """

    def __init__(
        self,
        spec: BlockdevSpec,
        *,
        writable: bool,
        window: int = 8,
        shared_reads: bool = False,
        shared_writes: bool = False,
        daemon: StorageDaemon | None = None,
    ) -> None:
        self.spec = spec
        self.writable = writable
        shared = (shared_writes if writable else shared_reads) and ORDERED_HOST
        if daemon is not None and (daemon.writable != writable or daemon.vhost_user != shared):
            raise ValueError("the daemon was launched for other access to the image")
        self._daemon = daemon or StorageDaemon(spec, writable=writable, vhost_user=shared)
        self._window = window
        self._client: NbdClient | None = None
        self._shared: VhostBlkDevice | None = None
        self._header: Header | None = None

    @classmethod
    def open(
        cls,
        spec: BlockdevSpec | str,
        *,
        writable: bool = False,
        window: int = 8,
        shared_reads: bool = False,
        shared_writes: bool = False,
        daemon: StorageDaemon | None = None,
    ) -> SnapshotImage:
        """Start the daemon and connect; use the result as a context manager.

        ``shared_reads`` (read-only images): serve :meth:`read_spans` through a
        vhost-user-blk export where the daemon and the host allow it, else over NBD.
        ``shared_writes`` (writable images): the same for :meth:`submit_writev`.
        ``daemon``: one already launched (:meth:`StorageDaemon.launch`) for this spec
        and access (vhost_user when shared memory is asked for and ORDERED_HOST), which
        the image then owns.
        """
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        image = cls(
            parsed,
            writable=writable,
            window=window,
            shared_reads=shared_reads,
            shared_writes=shared_writes,
            daemon=daemon,
        )
        try:
            image._start()
        except BaseException:
            image.close(graceful=False)
            raise
        return image

    def _start(self) -> None:
        try:
            if self._daemon.launched:
                self._daemon.wait_ready()
            else:
                self._daemon.start()
        except ImageError as exc:
            if not self._daemon.vhost_user or "vhost" not in str(exc):
                raise
            log.debug("no vhost-user-blk export (%s): NBD only", exc)
            self._daemon.stop()
            self._daemon = StorageDaemon(self.spec, writable=self.writable)
            self._daemon.start()
        self._client = self._connect()
        if self._daemon.vhost_user:
            try:
                self._shared = VhostBlkDevice.open(
                    self._daemon.vhost_user_path,
                    depth=self._window,
                    slot_size=WRITE_SLOT if self.writable else CHUNK,
                    timeout=self._daemon.timeout,
                    death=self._daemon.death,
                    writable=self.writable,
                )
            except (ImageError, OSError) as exc:
                log.debug("vhost-user-blk unavailable (%s): NBD only", exc)
        self._daemon.connected()

    def _connect(self) -> NbdClient:
        """Connect; the socket file can exist a moment before the daemon listens on it."""
        deadline = time.monotonic() + self._daemon.timeout
        while True:
            try:
                return NbdClient.connect(
                    self._daemon.socket_path, self._daemon.export_name, window=self._window
                )
            except NbdError as exc:
                death = self._daemon.death(grace=0.2)
                if death:
                    raise ImageError(f"cannot open image {self.spec.text!r}: {death}") from None
                if exc.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def __enter__(self) -> SnapshotImage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(graceful=exc_type is None)

    def close(self, *, graceful: bool = True, flushed: bool = False) -> None:
        """Disconnect and stop the daemon; idempotent.

        ``flushed``: everything written has been flushed.  Then, as for a read-only
        image, the daemon has nothing left to write and is killed if it has not exited
        ``FLUSHED_GRACE`` seconds after SIGTERM.  (Under ``exec:`` QEMU's monitor waits
        for qsnap to exit; a qemu-storage-daemon 10.0 once took the full 30 s timeout to
        leave after a save.)
        """
        client, self._client = self._client, None
        shared, self._shared = self._shared, None
        try:
            if shared is not None:
                shared.close()
            if client is not None:
                client.close(graceful=graceful)
        finally:
            self._daemon.stop(grace=FLUSHED_GRACE if flushed or not self.writable else None)

    @property
    def client(self) -> NbdClient:
        if self._client is None:
            raise ImageError("image is closed")
        return self._client

    @property
    def size(self) -> int:
        return self.client.size

    def daemon_error(self) -> str:
        """Why the storage daemon died (empty while it runs): to complete an NBD error."""
        return self._daemon.death()

    # -- header -------------------------------------------------------------------------

    def read_header(self) -> Header:
        """Decode the header as it is now (any state); :class:`NotAnImage` if none."""
        if self.size < layout.HEADER_SIZE:
            raise NotAnImage(
                f"not a qsnap image: virtual size {self.size} is smaller than the header"
            )
        first = bytes(self.client.read(0, 4096))
        length = layout.header_length(first)
        data = first if length <= len(first) else bytes(self.client.read(0, length))
        self._header = layout.decode_header(data)
        return self._header

    def complete_header(self) -> Header:
        """The header of a finished save; anything else raises :class:`IncompleteImage`."""
        header = self.read_header()
        if not header.complete:
            raise IncompleteImage(describe_incomplete(header))
        return header

    @property
    def header(self) -> Header:
        """The header of a complete image (read once); page and device-state reads use it."""
        if self._header is None or not self._header.complete:
            return self.complete_header()
        return self._header

    def write_header(self, header: Header) -> None:
        """Write the header in one request (callers flush around it)."""
        self.client.write(layout.HEADER_OFFSET, layout.encode_header(header))
        self._header = header

    # -- pages --------------------------------------------------------------------------

    def _block(self, block: BlockEntry | str) -> BlockEntry:
        return self.header.block(block) if isinstance(block, str) else block

    def _locate(self, block: BlockEntry | str, offset: int, length: int) -> int:
        entry = self._block(block)
        if offset < 0 or length < 0 or offset + length > entry.used_length:
            raise ImageError(
                f"read of block {entry.idstr!r} at {offset:#x}+{length:#x} "
                f"beyond its length {entry.used_length:#x}"
            )
        return entry.image_offset + offset

    def submit_read(self, block: BlockEntry | str, offset: int, length: int) -> int:
        """Queue a read (at most ``window`` on the wire); collect with :meth:`wait_read`."""
        return self.client.submit_read(self._locate(block, offset, length), length)

    def wait_read(self, cookie: int) -> bytearray:
        return self.client.wait_read(cookie)

    def read(self, block: BlockEntry | str, offset: int, length: int) -> bytearray:
        return self.wait_read(self.submit_read(block, offset, length))

    @property
    def shares_memory(self) -> bool:
        """Whether bulk reads and writes go through memory shared with the daemon."""
        return self._shared is not None

    def read_spans(
        self, requests: Iterable[tuple[BlockEntry | str, int, int]], keep: int = 0
    ) -> Iterator[Span]:
        """The data of each (block, offset, length) in order, several reads in flight.

        A span is valid only until ``keep + 1`` more have been asked for: with shared
        reads its memory is then handed back to the daemon for a later read.
        """
        located = ((self._locate(b, off, n), n) for b, off, n in requests)
        if self._shared is not None:
            yield from self._shared.reads(located, keep)
            return
        for data in self._nbd_reads(located):
            yield Span.whole(data)

    def _nbd_reads(self, requests: Iterable[tuple[int, int]]) -> Iterator[bytearray]:
        """The data of each (image offset, length) over NBD, ``window`` reads in flight."""
        client = self.client
        pending: collections.deque[int] = collections.deque()
        for offset, length in requests:
            pending.append(client.submit_read(offset, length))
            if len(pending) >= self._window:
                yield client.wait_read(pending.popleft())
        while pending:
            yield client.wait_read(pending.popleft())

    # -- writes -------------------------------------------------------------------------

    def submit_writev(self, offset: int, parts: list[bytes | memoryview], length: int) -> None:
        """Queue one write of the concatenation of ``parts`` (``length`` bytes).

        Through shared memory when it is whole sectors of at most one slot (the parts are
        copied: reusable on return), else over NBD (kept by reference until sent).  The
        two transports are not ordered: :meth:`drain` before rewriting a range.
        """
        shared = self._shared
        if shared is None or offset % SECTOR or length % SECTOR or length > shared.slot_size:
            self.client.submit_writev(offset, parts, length=length)
            return
        while True:
            try:
                shared.write(offset, parts, length)
                return
            except VhostWriteError as exc:
                self._rewrite(exc)

    def lend_slot(self) -> tuple[int, memoryview] | None:
        """A shared-memory slot to fill in place and write with :meth:`write_slot`.

        None without shared writes.  Hand it back unwritten with :meth:`return_slot`.
        """
        shared = self._shared
        if shared is None or not shared.writable:
            return None
        while True:
            try:
                return shared.lend()
            except VhostWriteError as exc:
                self._rewrite(exc)

    def write_slot(self, slot: int, offset: int, length: int) -> None:
        """Queue the write of a lent slot's first ``length`` bytes at ``offset``."""
        assert self._shared is not None
        self._shared.write_lent(slot, offset, length)

    def return_slot(self, slot: int) -> None:
        assert self._shared is not None
        self._shared.give_back(slot)

    def drain(self) -> None:
        """Wait for every write in flight on both transports; raise the first error."""
        self.client.drain()
        shared = self._shared
        while shared is not None:
            try:
                shared.drain()
                return
            except VhostWriteError as exc:
                self._rewrite(exc)

    def flush(self) -> None:
        """Drain, then flush the image node: this covers writes done over either export."""
        self.drain()
        if self._shared is None or not self._shared.writable:
            self.client.flush()
            return
        try:
            self._shared.flush()
        except VhostWriteError as exc:
            self._rewrite(exc)

    def _rewrite(self, failed: VhostWriteError) -> None:
        """Redo a failed shared write (or flush) over NBD, whose error names the errno.

        virtio-blk only says IOERR.  Should NBD succeed, the data is in place and the
        save goes on; otherwise its error is the one reported.
        """
        log.debug("%s: retrying over NBD", failed)
        if failed.data:
            self.client.write(failed.offset, failed.data)
        else:
            self.client.flush()
        log.warning("%s; the same over NBD succeeded", failed)

    def zero_map(self, block: BlockEntry | str) -> Iterator[Extent]:
        """Extents of the block, in block coordinates, from BLOCK_STATUS base:allocation.

        ``zero=True`` is certain (never-written or zeroed clusters); a data extent may
        still contain zero pages (qcow2 allocates whole 1 MiB clusters).
        """
        entry = self._block(block)
        for ext in self.client.iter_block_status(entry.image_offset, entry.used_length):
            yield Extent(
                ext.offset - entry.image_offset, ext.length, bool(ext.flags & AllocFlag.ZERO)
            )

    # -- device state -------------------------------------------------------------------

    def device_state(
        self, *, sections_only: bool = False, chunk_size: int = CHUNK
    ) -> Iterator[bytes]:
        """The stored device state in bounded chunks, pipelined.

        ``sections_only`` stops before EOF + vmdesc (the part postcopy sends in PACKAGED).
        """
        header = self.header
        region = header.device_state
        end = region.offset + (header.device_sections_length if sections_only else region.length)
        yield from self._read_range(region.offset, end, chunk_size)

    def _read_range(self, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        chunks = ((pos, min(chunk_size, end - pos)) for pos in range(start, end, chunk_size))
        for data in self._nbd_reads(chunks):
            yield bytes(data)

    # -- verify -------------------------------------------------------------------------

    def verify(self, *, limit: int = 10) -> VerifyResult:
        """Recompute every page digest and the device-state digest of a complete image."""
        header = self.complete_header()
        digests = b"".join(self._read_range(header.digests.offset, header.digests.end, CHUNK))
        page = header.page_size
        digest = layout.page_digester(header.digest_algorithm)
        mismatches: list[Mismatch] = []
        count = pages = 0
        index = 0
        for block in header.blocks:
            pos = 0
            for chunk in self._read_range(
                block.image_offset, block.image_offset + block.used_length, CHUNK
            ):
                for i in range(0, len(chunk), page):
                    got = digest(chunk[i : i + page])
                    want = digests[index * 8 : index * 8 + 8]
                    if got != want:
                        count += 1
                        if len(mismatches) < limit:
                            mismatches.append(Mismatch(block.idstr, pos + i))
                    index += 1
                    pages += 1
                pos += len(chunk)
        hasher = layout.device_state_hasher()
        for chunk in self.device_state():
            hasher.update(chunk)
        return VerifyResult(
            pages, tuple(mismatches), count, hasher.digest() == header.device_state_digest
        )


def describe_incomplete(header: Header) -> str:
    what = " and ".join(layout.pass_names(header.missing)) or "nothing"
    return f"incomplete image: save did not finish (missing: {what})"
