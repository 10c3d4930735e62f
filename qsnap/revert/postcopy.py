"""``qsnap revert --postcopy[=PCT]``: the source side of a postcopy migration.

Stream, in the order QEMU 10.0's own source uses (migration.c migration_thread and
postcopy_start): saved prologue, OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE (OR of the
blocks' page sizes, target page size), saved RAM START, PART sections of the optional
precopy phase, POSTCOPY_RAM_DISCARD commands, PING 2, PACKAGED{LISTEN, device sections
without EOF/vmdesc, PING 3, RUN}, PING 4, PART sections of requested and background
pages, RAM END (EOS), EOF.

Before LISTEN, QEMU's source discards (POSTCOPY_RAM_DISCARD) every page it has not sent
yet or that was dirtied since; qsnap discards every page not sent yet, as QEMU does.
This is not redundant with the discard ADVISE made: a page loaded by the precopy phase
may sit in a transparent huge page, or a ZERO record may have mapped the huge zero page,
which makes its unsent neighbours present too; the first discard turns THP off for the
RAM (postcopy_ram_prepare_discard) and the discards split those pages, so that every
unsent page faults and can be placed.  The discard also avoids a QEMU 10.0 destination
bug: LISTEN straight after ADVISE ends in the DISCARD state and RUN then fails with
"wrong postcopy state (2)".  When the precopy phase has sent every page there is nothing
left for postcopy: the stream then ends as a precopy one.
SWITCHOVER_START, which QEMU 10.0 also sends at the switch for machine types newer than
9.2, is left out: only VFIO devices act on it, a background-snapshot stream never carries
it, and a destination of an older machine type would not expect it.
Since the destination may place each host page only once after LISTEN (a second copy is
EEXIST and pauses postcopy), the scheduler's sent map is the single authority.
"""

from __future__ import annotations

import logging
import queue
import struct
import sys
import time

from qsnap.revert.errors import RevertError
from qsnap.revert.precopy import device_state_split, opening
from qsnap.revert.ram_sections import RamSectionWriter
from qsnap.revert.return_path import ReturnPath
from qsnap.revert.scheduler import BlockGeometry, PageScheduler, Run
from qsnap.revert.session import AbortCheck, RevertOptions, finish
from qsnap.revert.sink import Buffer, StreamSink
from qsnap.revert.source import HOST_PAGE_SIZE, RevertSource, geometry
from qsnap.revert.stats import Progress, RevertStats
from qsnap.stream import records
from qsnap.stream.constants import MigCommand, SectionType
from qsnap.stream.writer import encode

log = logging.getLogger(__name__)

MAX_PACKAGED_SIZE = 1 << 24
"""``MAX_VM_CMD_PACKAGED_SIZE``: the destination refuses a larger package."""

_SWITCH_INTERVAL = 0.0005
"""GIL switch interval while requests may come: the return-path thread would otherwise
wait up to 5 ms (Python's default) for the sender to let it hand a request over."""

MAX_DISCARDS_PER_COMMAND = 12
"""As QEMU's source (postcopy_discard_send_range): keeps each command small."""

_SLICE_BYTES = 64 << 10
"""Background data goes out in slices this big, with requests served in between."""

_LISTEN = encode(records.PostcopyListen())
_RUN = encode(records.PostcopyRun())
_PACKAGED_HEAD = struct.Struct(">BHHI")


def check_postcopy(source: RevertSource, blocks: list[BlockGeometry]) -> None:
    """Refuse, before anything is sent, what a postcopy destination could not load."""
    for block, saved in zip(blocks, source.blocks, strict=True):
        if block.host_page_size != max(HOST_PAGE_SIZE, source.target_page_size):
            raise RevertError(
                f"RAM block {saved.name!r} was saved with {block.host_page_size}-byte pages, "
                f"not this host's {HOST_PAGE_SIZE}: postcopy revert of hugepage-backed RAM "
                "is not supported"
            )
    size = package_size(source)
    if size > MAX_PACKAGED_SIZE:
        raise RevertError(
            f"device state of {source.device_sections_length} bytes does not fit in a "
            f"postcopy package (at most {MAX_PACKAGED_SIZE} bytes)"
        )


def package_size(source: RevertSource) -> int:
    """Bytes inside PACKAGED: LISTEN, device sections, PING 3, RUN."""
    return len(_LISTEN) + source.device_sections_length + len(_ping(3)) + len(_RUN)


def _ping(value: int) -> bytes:
    return encode(records.Ping(value))


class PostcopySender:
    """Runs one postcopy revert; ``run()`` returns the statistics or raises RevertError."""

    def __init__(
        self,
        source: RevertSource,
        sink: StreamSink,
        rp: ReturnPath,
        options: RevertOptions,
        stats: RevertStats | None = None,
    ) -> None:
        """``stats`` may be started by the caller (times then include opening the image)."""
        self.source = source
        self.sink = sink
        self.rp = rp
        self.options = options
        self.stats = stats or RevertStats()
        self.blocks = geometry(source)
        check_postcopy(source, self.blocks)
        self.tps = source.target_page_size
        self.scheduler = PageScheduler(
            self.blocks, [source.zero_extents(b.name) for b in self.blocks]
        )
        self.ram = RamSectionWriter(
            sink, source.ram_section_id, self.tps, self.stats, options.part_bytes
        )
        self.abort = AbortCheck(rp)
        self.progress = Progress(sum(b.length for b in self.blocks) // self.tps, options.progress)
        self._current: tuple[Run, bytes | bytearray] | None = None

    def _pages(self, run: Run) -> int:
        return run.count * self.blocks[run.block].host_page_size // self.tps

    def _write(self, run: Run, data: bytes | bytearray | None) -> None:
        """Encode ``run`` (``data`` None for a zero run) and mark it sent."""
        block = self.blocks[run.block]
        offset = run.first * block.host_page_size
        if data is None:
            self.ram.zeros(block.name, offset, self._pages(run))
        else:
            self.ram.pages(block.name, offset, data)
        self.scheduler.mark_sent(run)

    def _data(self, run: Run) -> bytes | bytearray:
        """The data of ``run``: from the read-ahead buffer when it holds it, else read."""
        block = self.blocks[run.block]
        hps = block.host_page_size
        if self._current is not None:
            have, data = self._current
            if (
                have.block == run.block
                and have.first <= run.first
                and (run.first + run.count <= have.first + have.count)
            ):
                start = (run.first - have.first) * hps
                return data[start : start + run.count * hps]
        return self.source.read(block.name, run.first * hps, run.count * hps)

    def _send_run(self, run: Run) -> None:
        self._write(run, None if run.zero else self._data(run))

    def serve_requests(self, wait: float = 0.0) -> None:
        """Send every pending requested page at once, before any background page.

        ``wait``: seconds to wait for a first request when none is pending (throttling).
        """
        served = False
        while True:
            try:
                if wait > 0:
                    request = self.rp.requests.get(timeout=wait)
                    wait = 0.0
                else:
                    request = self.rp.requests.get_nowait()
            except queue.Empty:
                break
            self.stats.requests += 1
            runs = self.scheduler.request(request.block, request.offset, request.length)
            if not runs:
                self.stats.ignored_requests += 1
                continue
            for run in runs:
                self._send_run(run)
                self.stats.request_pages += self._pages(run)
            self.ram.push()
            served = True
            self.stats.latencies_ns.append(time.monotonic_ns() - request.received_ns)
        if served:
            log.debug("served requests, %d pages left", self.scheduler.remaining)

    def _background_step(self, max_bytes: int) -> int:
        """Send the next slice of background pages; returns the target pages sent."""
        if self._current is None:
            run = self.scheduler.next_run(max_bytes)
            if run is None:
                return 0
            if run.zero:
                self._write(run, None)
                return self._pages(run)
            block = self.blocks[run.block]
            hps = block.host_page_size
            data = self.source.read(block.name, run.first * hps, run.count * hps)
            self._current = (run, data)
        have, _ = self._current
        hps = self.blocks[have.block].host_page_size
        slice_pages = max(1, _SLICE_BYTES // hps)
        pending = self.scheduler.unsent(have)
        if not pending:
            self._current = None
            return 0
        first = pending[0]
        piece = Run(first.block, first.first, min(first.count, slice_pages), first.zero)
        self._send_run(piece)
        if piece.first + piece.count >= have.first + have.count:
            self._current = None
        return self._pages(piece)

    def _precopy_phase(self) -> None:
        pct = self.options.postcopy_pct or 0
        target = -(-self.scheduler.data_pages * pct // 100)
        sent_data = 0
        smallest = min(b.host_page_size for b in self.blocks)
        while sent_data < target:
            wanted = (target - sent_data) * smallest
            run = self.scheduler.next_run(min(self.options.read_bytes, wanted))
            if run is None:
                break
            self._send_run(run)
            self.stats.precopy_pages += self._pages(run)
            if not run.zero:
                sent_data += run.count
            self.progress.update(self.stats)
            self.abort.check()
        self.ram.close_section()

    def _discards(self) -> list[bytes]:
        """POSTCOPY_RAM_DISCARD commands covering every unsent page, 12 ranges each."""
        commands = []
        for index, block in enumerate(self.blocks):
            hps = block.host_page_size
            ranges = [
                (first * hps, count * hps) for first, count in self.scheduler.unsent_ranges(index)
            ]
            for pos in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
                chunk = tuple(ranges[pos : pos + MAX_DISCARDS_PER_COMMAND])
                commands.append(encode(records.PostcopyRamDiscard(block.name, chunk)))
        return commands

    def _package(self) -> None:
        """Discard, PING 2, PACKAGED{LISTEN, device sections, PING 3, RUN}, PING 4."""
        size = package_size(self.source)
        head = _PACKAGED_HEAD.pack(SectionType.COMMAND, MigCommand.PACKAGED, 4, size)
        self.sink.write([*self._discards(), _ping(2), head, _LISTEN])
        self.stats.listen_ns = self.stats.mark()
        sent = 0
        for chunk in self.source.device_state(sections_only=True):
            self.sink.write([chunk])
            sent += len(chunk)
        if sent != self.source.device_sections_length:
            raise RevertError(
                f"image device state: read {sent} bytes of device sections, "
                f"expected {self.source.device_sections_length}"
            )
        self.sink.write([_ping(3), _RUN])
        self.stats.run_ns = self.stats.mark()
        self.sink.write([_ping(4)])

    def run(self) -> RevertStats:
        advise = records.PostcopyAdvise(
            ram_pagesize_summary=self._pagesize_summary(), target_page_size=self.tps
        )
        self.sink.write([*opening(self.source, True), encode(advise), self.source.ram_start])
        self._precopy_phase()
        if not self.scheduler.remaining:
            log.info("every page went before LISTEN: ending as a precopy stream")
            return self._end_as_precopy()
        self._package()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(_SWITCH_INTERVAL)
        try:
            self._postcopy_phase()
        finally:
            sys.setswitchinterval(switch_interval)
        tail: list[Buffer] = [*self.ram.end_section(), encode(records.Eof())]
        finish(self.source, self.sink, self.rp, tail, self.options)
        self.stats.bytes_written = self.sink.bytes_written
        self.stats.end_ns = self.stats.mark()
        return self.stats

    def _postcopy_phase(self) -> None:
        """Requested pages first, then background slices, until every page is sent."""
        started = time.monotonic()
        while self.scheduler.remaining:
            self.serve_requests(self._throttle(started))
            self.stats.background_pages += self._background_step(self.options.postcopy_read_bytes)
            self.progress.update(self.stats)
            self.abort.check()
        self.serve_requests()

    def _throttle(self, started: float) -> float:
        """Seconds the background push is ahead of ``max_bandwidth`` (0 without limit)."""
        limit = self.options.max_bandwidth
        if not limit:
            return 0.0
        covered = self.stats.background_pages * self.tps
        ahead = covered / limit - (time.monotonic() - started)
        return min(ahead, 0.05) if ahead > 0 else 0.0

    def _end_as_precopy(self) -> RevertStats:
        ahead, held = device_state_split(self.source)
        for chunk in ahead:
            self.sink.write([chunk])
        finish(self.source, self.sink, self.rp, held, self.options)
        self.stats.bytes_written = self.sink.bytes_written
        self.stats.end_ns = self.stats.mark()
        return self.stats

    def _pagesize_summary(self) -> int:
        summary = 0
        for block in self.blocks:
            summary |= block.host_page_size
        return summary
