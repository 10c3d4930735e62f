"""``qsnap save``: a migration stream on stdin into a snapshot image.

One pass (a full background-snapshot stream), or one half of the seed's two-pass save:
``--save-vmstate`` for a vmstate-only stream, a plain save for a RAM-only stream, in
either order.  The stream head (header + configuration) and the RAM START section are
kept verbatim; pages go to their places; everything from the first device section on
is streamed to the device-state region.  Nothing is ever written to stdout: under
``exec:`` QEMU reads it.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from qsnap.image.errors import ImageError, NbdError
from qsnap.image.layout import BlockEntry, Header, pass_names
from qsnap.image.snapshot import SnapshotImage, describe_incomplete
from qsnap.image.spec import BlockdevSpec
from qsnap.image.writer import ImageWriter, LentPages, RamSetup, StreamPrologue, WriteStats
from qsnap.page_scatter import PageScatter
from qsnap.read_ahead import ReadAhead
from qsnap.save_input import DEFAULT_TIMEOUT, READ_SIZE, StdinReader
from qsnap.stream import StreamError, StreamOptions, StreamReader
from qsnap.stream import records as r
from qsnap.stream.constants import RAM_IDSTR
from qsnap.stream.reader import PageAhead, RamPageRun, RamZeroRun

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

    from qsnap.image.daemon import StorageDaemon

log = logging.getLogger(__name__)

MAX_SETUP = 4 << 20
PROGRESS_INTERVAL = 1.0


class SaveError(Exception):
    """The stream does not fit what was asked (wrong kind of pass, missing parts)."""


@dataclass(frozen=True)
class SaveResult:
    header: Header
    stream_bytes: int
    seconds: float
    stats: WriteStats
    stream_seconds: float = 0.0  # until the end of the stream: what the source waited for
    shared_writes: bool = False  # pages went through memory shared with the daemon
    read_ahead_bytes: int = 0  # taken off stdin during start-up, held in a memfd
    read_ahead_cpu_seconds: float = 0.0  # the child that took them, a child like the daemon

    def summary(self) -> dict[str, object]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # daemon and read-ahead
        own_cpu = own.ru_utime + own.ru_stime + self.read_ahead_cpu_seconds
        daemon_cpu = children.ru_utime + children.ru_stime - self.read_ahead_cpu_seconds
        return {
            "complete": self.header.complete,
            "missing": pass_names(self.header.missing),
            "machine_type": self.header.machine_type,
            "stream_bytes": self.stream_bytes,
            "seconds": round(self.seconds, 3),
            "stream_seconds": round(self.stream_seconds, 3),
            "mib_per_s": round(self.stream_bytes / (1 << 20) / max(self.seconds, 1e-9), 1),
            "data_pages": self.stats.data_pages,
            "zero_pages": self.stats.zero_pages,
            "device_state_bytes": self.stats.device_state_bytes,
            "written_bytes": self.stats.written_bytes,
            "in_place_pages": self.stats.in_place_pages,
            "shared_writes": self.shared_writes,
            "peak_rss_kib": own.ru_maxrss,
            "read_ahead_bytes": self.read_ahead_bytes,
            "read_ahead_cpu_seconds": round(self.read_ahead_cpu_seconds, 3),
            "cpu_seconds": round(own_cpu, 3),
            "daemon_cpu_seconds": round(max(daemon_cpu, 0.0), 3),
        }

    def line(self) -> str:
        mib = self.stream_bytes / (1 << 20)
        text = (
            f"saved {mib:.1f} MiB in {self.seconds:.2f} s "
            f"({mib / max(self.seconds, 1e-9):.1f} MiB/s): {self.stats.data_pages} data pages, "
            f"{self.stats.zero_pages} zero pages, {self.stats.device_state_bytes} bytes of "
            "device state"
        )
        if self.header.complete:
            return text + "; image complete"
        return text + "; " + describe_incomplete(self.header).replace("save did not finish ", "")


class _Progress:
    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.start = time.monotonic()
        self.next = self.start + PROGRESS_INTERVAL

    def tick(self, nbytes: int, stats: WriteStats) -> None:
        now = time.monotonic()
        if self.out is None or now < self.next:
            return
        self.next = now + PROGRESS_INTERVAL
        mib = nbytes / (1 << 20)
        print(
            f"qsnap save: {mib:.1f} MiB, {stats.data_pages} data + {stats.zero_pages} zero "
            f"pages, {mib / (now - self.start):.1f} MiB/s",
            file=self.out,
            flush=True,
        )


class StreamSaver:
    """Feeds records to the writer; remembers the verbatim setup bytes on the way."""

    def __init__(self, writer: ImageWriter, *, vmstate_only: bool, page_size: int) -> None:
        self.writer = writer
        self.vmstate_only = vmstate_only
        self.reader = StreamReader(StreamOptions(page_size=page_size, expect_ram=False))
        self.head = bytearray()  # input kept until the RAM setup is complete
        self.record_start = 0
        self.prologue: StreamPrologue | None = None
        self.prologue_end = 0
        self.ram_start: r.SectionStart | None = None
        self.ram_start_at = 0
        self.ram_setup_done = False
        self.device_state_at: int | None = None
        self.ended = False
        self._scatters: dict[int, PageScatter] = {}

    def scatter(self, lent: LentPages) -> PageScatter:
        """The scatter list of a slot (see :func:`_read_pages_in_place`), made once."""
        fill = self._scatters.get(lent.slot)
        if fill is None:
            fill = self._scatters[lent.slot] = PageScatter(lent.memory, self.reader.page_size)
        return fill

    def feed(self, data: bytes) -> None:
        if not self.ram_setup_done:
            self.head += data
            if len(self.head) > MAX_SETUP:
                raise SaveError(
                    f"byte {MAX_SETUP}: no complete RAM setup or device state in the first "
                    f"{MAX_SETUP} bytes"
                )
        self.reader.feed(data)
        self._drain()

    def close(self) -> None:
        self.reader.close()
        self._drain()
        if self.device_state_at is None and not self.ended:
            raise StreamError("stream ended without EOF", self.reader.offset)

    def _head_prologue(self) -> StreamPrologue:
        if self.prologue is None:
            config = self.reader.configuration
            self.prologue = StreamPrologue(
                prologue=bytes(self.head[: self.prologue_end]),
                machine_type=config.machine if config is not None else "",
                page_size=self.reader.page_size,
            )
        return self.prologue

    def _drain(self) -> None:
        writer = self.writer
        for rec in self.reader.batches():
            cls = type(rec)
            if cls is RamPageRun:
                assert isinstance(rec, RamPageRun)
                writer.pages(rec.block, rec.offset, rec.pages)
            elif cls is RamZeroRun:
                assert isinstance(rec, RamZeroRun)
                writer.zeros(rec.block, rec.offset, rec.count, self.reader.page_size)
            elif isinstance(rec, r.RamPage):  # left for close() to collect
                writer.page(rec.block, rec.offset, rec.data)
            elif isinstance(rec, r.RamZero):
                writer.zero(rec.block, rec.offset, self.reader.page_size)
            elif isinstance(rec, r.DeviceStateChunk):
                writer.device_state(rec.data)
            else:
                self._other(rec)
            if not self.ram_setup_done:
                self.record_start = self.reader.offset

    def _other(self, rec: r.Record | RamPageRun | RamZeroRun) -> None:
        at = self.record_start
        if isinstance(rec, r.StreamHeader | r.Configuration):
            self.prologue_end = self.reader.offset
        elif isinstance(rec, r.SectionStart) and rec.idstr == RAM_IDSTR:
            if self.vmstate_only:
                raise SaveError(
                    f"byte {at}: --save-vmstate expects a vmstate-only stream, "
                    "but this one carries RAM"
                )
            if self.prologue_end != at:
                raise SaveError(f"byte {self.prologue_end}: unexpected records before RAM setup")
            self.ram_start, self.ram_start_at = rec, at
        elif isinstance(rec, r.SectionFooter) and self.ram_start is not None:
            if not self.ram_setup_done:
                self._ram_setup_complete()
        elif isinstance(rec, r.DeviceStateStart):
            if self.ram_start is None and not self.vmstate_only:
                raise SaveError(
                    f"byte {rec.offset}: the stream has no RAM section (a vmstate-only "
                    "stream is saved with --save-vmstate)"
                )
            if self.ram_start is not None and not self.ram_setup_done:
                raise SaveError(f"byte {rec.offset}: device state inside the RAM setup")
            self.writer.start_device_state(self._head_prologue())
            self.device_state_at = rec.offset
            self.ram_setup_done = True
            self.head = bytearray()
        elif isinstance(rec, r.Eof):
            if self.ram_start is None:
                raise SaveError(f"byte {at}: EOF before any RAM or device state")
            self.ended = True
        else:
            log.debug("byte %d: %s", at, type(rec).__name__)

    def _ram_setup_complete(self) -> None:
        assert self.ram_start is not None
        mem = self.reader.mem_size
        if mem is None:
            raise SaveError(f"byte {self.ram_start_at}: RAM START without a block list")
        blocks = tuple(
            BlockEntry(
                idstr=b.idstr,
                used_length=b.used_length,
                page_size=b.page_size or 0,
                mr_addr=b.mr_addr,
            )
            for b in mem.blocks
        )
        setup = RamSetup(
            section_id=self.ram_start.section_id,
            instance_id=self.ram_start.instance_id,
            version_id=self.ram_start.version_id,
            raw=bytes(self.head[self.ram_start_at : self.reader.offset]),
            blocks=blocks,
        )
        self.writer.start_ram(self._head_prologue(), setup)
        self.ram_setup_done = True
        self.head = bytearray()

    @property
    def device_sections_length(self) -> int | None:
        end = self.reader.device_state_end
        if self.device_state_at is None or end is None:
            return None
        return end.eof_offset - self.device_state_at


def _read_pages_in_place(source: StdinReader, saver: StreamSaver, ahead: PageAhead) -> int | None:
    """Read the data pages that continue ``ahead`` straight into slots of shared memory.

    See :mod:`qsnap.page_scatter`.  Slot after slot while the prediction holds, to the
    end of the block at most.  Returns the bytes read, or None when writes do not go
    through shared memory.
    """
    reader, writer = saver.reader, saver.writer
    page_size = reader.page_size
    offset, word, room, received = ahead.offset, ahead.word, ahead.room, ahead.received
    got = done = 0
    while True:
        lent = writer.lend_pages(ahead.block, offset, page_size)
        if lent is None:
            if not done:
                return None
            break
        try:
            fill = saver.scatter(lent)
            fill.start(word, min(lent.room, room))
            fill.place(received)
            while fill.open:
                n = source.readv(fill.vectors(READ_SIZE))
                if not n:
                    break
                fill.received(n)
                got += n
                if n < fill.asked and fill.open:
                    source.nap()
        except BaseException:
            writer.write_lent(lent, ())
            raise
        writer.write_lent(lent, fill.good_pages())
        done += fill.good
        room -= fill.good
        if fill.broken or fill.good < fill.pages or not room or source.ended:
            break
        offset += fill.good * page_size
        word += fill.good * page_size
        received = b""
    reader.skip_pages(done)
    saver.feed(fill.rest())  # from the first record that was not such a page
    return got


def save(
    spec: BlockdevSpec,
    *,
    read: Callable[[int], bytes] | None = None,
    vmstate_only: bool = False,
    page_size: int = 4096,
    progress: TextIO | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ahead: ReadAhead | None = None,
    shared_writes: bool = True,
    daemon: StorageDaemon | None = None,
) -> SaveResult:
    """Save the stream ``read`` returns (stdin by default) into the image at ``spec``.

    ``timeout``: longest wait for stream data on stdin (a stalled source is an error).
    ``ahead``: what was reading stdin while qsnap started (taken over at the first read).
    ``shared_writes``: pages go through memory shared with the storage daemon where it
    and the host allow (see :class:`SnapshotImage`); False keeps everything on NBD.
    ``daemon``: one already launched for ``spec`` and that access (the image owns it).
    """
    if read is None:
        read = StdinReader(timeout, ahead)

    start = time.monotonic()
    ticker = _Progress(progress)
    with SnapshotImage.open(
        spec, writable=True, shared_writes=shared_writes, daemon=daemon
    ) as image:
        try:
            writer = ImageWriter(image)
            saver = StreamSaver(writer, vmstate_only=vmstate_only, page_size=page_size)
            total = 0
            stdin = read if isinstance(read, StdinReader) else None
            while True:
                if stdin is not None and not stdin.ended:
                    receiving = saver.reader.page_ahead()
                    if receiving is not None:
                        got = _read_pages_in_place(stdin, saver, receiving)
                        if got is not None:
                            total += got
                            ticker.tick(total, writer.stats)
                            continue
                        stdin = None  # no shared memory
                data = read(READ_SIZE)
                if not data:
                    break
                total += len(data)
                saver.feed(data)
                ticker.tick(total, writer.stats)
            saver.close()
            stream_end = time.monotonic()
            header = writer.finish(saver.device_sections_length)
            shared = image.shares_memory
            image.close(flushed=True)
        except NbdError as exc:
            detail = image.daemon_error()
            if detail:
                raise ImageError(f"{exc} ({detail})") from exc
            raise
    end = time.monotonic()
    backlog, backlog_cpu = 0, 0.0
    if ahead is not None:
        ahead.stop()  # normally stopped already, once the save caught up with it
        backlog, backlog_cpu = ahead.buffered()[0], ahead.cpu_seconds
    return SaveResult(
        header, total, end - start, writer.stats, stream_end - start, shared, backlog, backlog_cpu
    )


def report(result: SaveResult, *, as_json: bool, out: TextIO) -> None:
    """The end-of-save summary, on stderr (stdout belongs to QEMU)."""
    if as_json:
        import json  # only for --json (start-up: QEMU starts one qsnap per save)

        print(json.dumps(result.summary(), sort_keys=True), file=out)
    else:
        print(f"qsnap save: {result.line()}", file=out)
