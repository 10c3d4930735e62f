"""Signals during a revert: SIGTERM unwinds it (the daemon is stopped), SIGPIPE is ignored."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Terminated(BaseException):
    """SIGTERM arrived (QEMU closing the ``exec:`` channel, or the user)."""


@contextlib.contextmanager
def revert_signals() -> Iterator[None]:
    """For the duration of a revert: SIGTERM raises ``Terminated``, SIGPIPE is ignored.

    With SIGPIPE ignored a vanished QEMU shows up as EPIPE on the write that found it,
    which the sink reports as such.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous_term = signal.signal(signal.SIGTERM, handler)
    previous_pipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGPIPE, previous_pipe)
