"""What both revert modes share: options, the stream's opening, and how it ends.

How it ends matters because of the ``exec:`` channel: once QEMU has loaded the stream it
sends SHUT and closes the channel, and closing waits (waitpid, in the main loop) for the
command to exit; QEMU kills the command (SIGTERM, SIGKILL 10 ms later) only when the
channel is dropped without a close.  So qsnap must exit promptly after SHUT: the image is
closed before the last bytes go out, and a SIGTERM while waiting for SHUT still looks at
what the return path said.
"""

from __future__ import annotations

from dataclasses import dataclass

from qsnap.revert.errors import RevertError
from qsnap.revert.return_path import Outcome, ReturnPath
from qsnap.revert.signals import Terminated
from qsnap.revert.sink import Buffer, StreamSink
from qsnap.revert.source import RevertSource

SIGTERM_GRACE = 0.005
"""Seconds left to find SHUT after a SIGTERM (QEMU's SIGKILL may follow 10 ms later)."""


@dataclass(frozen=True, slots=True)
class RevertOptions:
    """Tunables of a revert; the defaults suit a local QEMU."""

    postcopy_pct: int | None = None
    """None: precopy; else postcopy after PCT % of the data pages went by precopy."""
    read_bytes: int = 1 << 20
    """Size of the background reads (precopy reads several of these ahead)."""
    postcopy_read_bytes: int = 256 << 10
    """Background reads in postcopy: smaller, so that requests wait less."""
    part_bytes: int = 1 << 20
    """Payload after which a PART section is closed."""
    shut_timeout: float = 60.0
    """Seconds to wait for QEMU's SHUT after the last byte."""
    stall_timeout: float = 60.0
    """Seconds QEMU may read nothing before qsnap gives up."""
    progress: bool = False
    max_bandwidth: int = 0
    """Postcopy: bytes of guest RAM per second the background push may cover (zero pages
    included; 0: no limit).  Requests are never throttled."""


class AbortCheck:
    """Callable for StreamSink: the reason to stop, once the return path has ended."""

    def __init__(self, rp: ReturnPath | None) -> None:
        self.rp = rp

    def __call__(self) -> str | None:
        if self.rp is None or not self.rp.finished():
            return None
        return f"QEMU ended the migration early: {self.rp.describe()}"

    def check(self) -> None:
        """Raise RevertError if the destination already gave up."""
        reason = self()
        if reason is not None:
            raise RevertError(reason)


def finish(
    source: RevertSource,
    sink: StreamSink,
    rp: ReturnPath | None,
    tail: list[Buffer],
    options: RevertOptions,
) -> None:
    """Close the image, send the last bytes, and wait for QEMU's verdict.

    Without a return path (``--no-return-path``, or stdin not a pipe) there is no
    verdict to wait for: the stream was written, that is all qsnap can know.
    """
    source.close()
    AbortCheck(rp).check()
    sink.write(tail)
    if rp is None:
        return
    try:
        outcome = rp.wait(options.shut_timeout)
    except Terminated:
        outcome = rp.wait(SIGTERM_GRACE)
        if outcome is None:
            raise RevertError(
                "terminated by SIGTERM before QEMU reported the outcome on the return path"
            ) from None
    if outcome is None:
        raise RevertError(f"no SHUT from QEMU within {options.shut_timeout:g} s")
    rp.join(1.0)
    if outcome is not Outcome.SHUT_OK:
        raise RevertError(rp.describe())
