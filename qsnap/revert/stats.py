"""Counters and timings of one revert, for the summary line and ``--json``."""

from __future__ import annotations

import sys
import time
from array import array
from dataclasses import dataclass, field


def percentile(sorted_values: array[int] | list[int], pct: float) -> int:
    """Nearest-rank percentile of already sorted values (0 for no values)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


@dataclass
class RevertStats:
    """What a revert did; times are ``time.monotonic_ns()`` values relative to ``start_ns``."""

    start_ns: int = field(default_factory=time.monotonic_ns)
    data_pages: int = 0
    zero_pages: int = 0
    request_pages: int = 0
    background_pages: int = 0
    precopy_pages: int = 0
    requests: int = 0
    ignored_requests: int = 0
    bytes_written: int = 0
    listen_ns: int | None = None
    run_ns: int | None = None
    end_ns: int | None = None
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    page_reads: str = "nbd"
    """How page data came from the storage daemon: "nbd" or "shared memory"."""
    pipe_writes: str = "copied"
    """How shared-memory pages went into the stream: "spliced" (by reference) or "copied"."""

    def mark(self) -> int:
        """Nanoseconds since the start."""
        return time.monotonic_ns() - self.start_ns

    def latency_ms(self, pct: float) -> float:
        """Request latency percentile in milliseconds (request read to page written)."""
        return percentile(sorted(self.latencies_ns), pct) / 1e6

    def as_dict(self) -> dict[str, object]:
        end = self.end_ns if self.end_ns is not None else self.mark()
        seconds = end / 1e9
        result: dict[str, object] = {
            "pages": self.data_pages + self.zero_pages,
            "data_pages": self.data_pages,
            "zero_pages": self.zero_pages,
            "bytes": self.bytes_written,
            "seconds": round(seconds, 3),
            "mib_per_s": round(self.bytes_written / 2**20 / seconds, 1) if seconds else 0.0,
            "page_reads": self.page_reads,
            "pipe_writes": self.pipe_writes,
        }
        if self.listen_ns is not None:
            result.update(
                precopy_pages=self.precopy_pages,
                request_pages=self.request_pages,
                background_pages=self.background_pages,
                requests=self.requests,
                ignored_requests=self.ignored_requests,
                latency_p50_ms=round(self.latency_ms(50), 3),
                latency_p99_ms=round(self.latency_ms(99), 3),
                listen_s=round(self.listen_ns / 1e9, 3),
                run_s=round((self.run_ns or 0) / 1e9, 3),
            )
        return result

    def summary(self) -> str:
        """One human line: sizes, time, rate, and for postcopy the request figures."""
        d = self.as_dict()
        line = (
            f"{d['pages']} pages ({d['data_pages']} data, {d['zero_pages']} zero), "
            f"{d['bytes']} bytes in {d['seconds']:.3f} s ({d['mib_per_s']} MiB/s)"
        )
        if self.listen_ns is not None:
            line += (
                f"; postcopy: {d['precopy_pages']} before listen, {d['request_pages']} on "
                f"request ({d['requests']} requests, {d['ignored_requests']} already sent), "
                f"{d['background_pages']} background; latency p50 {d['latency_p50_ms']} ms "
                f"p99 {d['latency_p99_ms']} ms; LISTEN sent at {d['listen_s']} s, "
                f"RUN at {d['run_s']} s"
            )
        return line


class Progress:
    """``--progress``: at most one stderr line per ``interval`` seconds."""

    def __init__(self, total_pages: int, enabled: bool, interval: float = 1.0) -> None:
        self.total_pages = total_pages
        self.enabled = enabled
        self.interval_ns = int(interval * 1e9)
        self._next_ns = time.monotonic_ns() + self.interval_ns

    def update(self, stats: RevertStats) -> None:
        if not self.enabled or time.monotonic_ns() < self._next_ns:
            return
        self._next_ns = time.monotonic_ns() + self.interval_ns
        done = stats.data_pages + stats.zero_pages
        seconds = stats.mark() / 1e9
        rate = stats.bytes_written / 2**20 / seconds if seconds else 0.0
        pct = 100 * done // self.total_pages if self.total_pages else 100
        print(
            f"qsnap revert: {pct}% ({done}/{self.total_pages} pages), "
            f"{stats.bytes_written >> 20} MiB sent, {rate:.1f} MiB/s",
            file=sys.stderr,
            flush=True,
        )
