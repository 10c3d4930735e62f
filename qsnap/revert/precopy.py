"""``qsnap revert``: the whole snapshot as one precopy stream.

Stream: saved prologue, OPEN_RETURN_PATH + PING (when QEMU can answer), the saved RAM
START section, PART sections with every page once (zero extents without reading, data in
large pipelined reads), the saved device state (sections, EOF, vmdesc) as QEMU's own
source ends a stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from qsnap.revert.ram_sections import RamSectionWriter
from qsnap.revert.return_path import ReturnPath
from qsnap.revert.scheduler import PageScheduler, Run
from qsnap.revert.session import AbortCheck, RevertOptions, finish
from qsnap.revert.sink import Buffer, StreamSink
from qsnap.revert.source import RevertSource, geometry
from qsnap.revert.stats import Progress, RevertStats
from qsnap.stream.constants import MigCommand
from qsnap.stream.wire import encode_command, encode_ping


def opening(source: RevertSource, with_return_path: bool) -> list[bytes]:
    """Prologue, then OPEN_RETURN_PATH and PING 1 as QEMU's migration thread sends them."""
    parts = [source.prologue]
    if with_return_path:
        parts += [encode_command(MigCommand.OPEN_RETURN_PATH), encode_ping(1)]
    return parts


def all_runs(scheduler: PageScheduler, max_bytes: int) -> list[Run]:
    """Every page in block order, as runs of at most ``max_bytes``."""
    runs = []
    while (run := scheduler.next_run(max_bytes)) is not None:
        scheduler.mark_sent(run)
        runs.append(run)
    return runs


def device_state_split(source: RevertSource) -> tuple[Iterator[bytes], list[Buffer]]:
    """The device state as (chunks to send now, last chunk held back until the end)."""
    chunks = source.device_state(sections_only=False)
    held: list[Buffer] = []

    def ahead() -> Iterator[bytes]:
        previous: bytes | None = None
        for chunk in chunks:
            if previous is not None:
                yield previous
            previous = chunk
        if previous is not None:
            held.append(previous)

    return ahead(), held


def revert_precopy(
    source: RevertSource,
    sink: StreamSink,
    rp: ReturnPath | None,
    options: RevertOptions,
    stats: RevertStats | None = None,
) -> RevertStats:
    """Send the snapshot; return the statistics once QEMU accepted it (or RevertError).

    ``stats`` may be started by the caller, so that its times include opening the image.
    """
    stats = stats or RevertStats()
    blocks = geometry(source)
    scheduler = PageScheduler(blocks, [source.zero_extents(b.name) for b in blocks])
    tps = source.target_page_size
    progress = Progress(sum(b.length for b in blocks) // tps, options.progress)
    abort = AbortCheck(rp)
    ram = RamSectionWriter(sink, source.ram_section_id, tps, stats, options.part_bytes)

    sink.write([*opening(source, rp is not None), source.ram_start])
    runs = all_runs(scheduler, options.read_bytes)
    keep = 1 if sink.splicing else 0  # spliced pages must outlive the next span's splice
    reads = source.read_many(
        (
            (
                blocks[r.block].name,
                r.first * blocks[r.block].host_page_size,
                r.count * blocks[r.block].host_page_size,
            )
            for r in runs
            if not r.zero
        ),
        keep,
    )
    spliced: deque[int] = deque()  # where each kept span's records end in the stream
    for run in runs:
        block = blocks[run.block]
        offset = run.first * block.host_page_size
        if run.zero:
            ram.zeros(block.name, offset, run.count * block.host_page_size // tps)
        else:
            if len(spliced) > keep:  # the next read reuses that span's memory
                sink.wait_consumed(spliced.popleft())
            ram.pages(block.name, offset, next(reads))
            ram.push()  # the span is only valid until the next read is asked for
            if keep:
                spliced.append(sink.bytes_written)
        progress.update(stats)
        abort.check()
    ram.close_section()
    stats.bytes_written = sink.bytes_written

    ahead, held = device_state_split(source)
    for chunk in ahead:
        sink.write([chunk])
    finish(source, sink, rp, held, options)
    stats.bytes_written = sink.bytes_written
    stats.end_ns = stats.mark()
    return stats
