"""The reader thread for QEMU's return path (the command's stdin).

QEMU writes page requests and, when its incoming side is torn down, SHUT (0: loaded,
1: failed).  A thread blocks on the descriptor so that the sender never has to: page
requests are handed over through a queue, stamped with the time they were read, and the
outcome (SHUT, end of input, undecodable bytes) is published once.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

from qsnap.stream import return_path as rp
from qsnap.stream.errors import StreamError

log = logging.getLogger(__name__)

_READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One REQ_PAGES / REQ_PAGES_ID, with its block resolved and its arrival time."""

    block: str
    offset: int
    length: int
    received_ns: int


class Outcome(enum.Enum):
    """How the return path ended."""

    SHUT_OK = "QEMU loaded the snapshot"
    SHUT_ERROR = "QEMU reported that loading the snapshot failed (return path SHUT 1)"
    EOF = "QEMU closed the return path without reporting an outcome"
    CORRUPT = "QEMU's return path could not be decoded"


class ReturnPath:
    """Decodes the return path on ``fd`` in a daemon thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.requests: queue.SimpleQueue[PageRequest] = queue.SimpleQueue()
        self.outcome: Outcome | None = None
        self.detail = ""
        self.pongs: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qsnap-return-path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _finish(self, outcome: Outcome, detail: str = "") -> None:
        self.outcome, self.detail = outcome, detail
        self._done.set()

    def _run(self) -> None:
        reader = rp.ReturnPathReader()
        last_block: str | None = None
        try:
            while True:
                try:
                    data = os.read(self.fd, _READ_SIZE)
                except OSError as exc:
                    self._finish(Outcome.EOF, f"reading the return path: {exc.strerror}")
                    return
                now = time.monotonic_ns()
                if not data:
                    reader.close()
                    self._finish(Outcome.EOF)
                    return
                reader.feed(data)
                for msg in reader.messages():
                    if isinstance(msg, rp.ReqPagesId):
                        last_block = msg.block
                        self.requests.put(PageRequest(msg.block, msg.start, msg.length, now))
                    elif isinstance(msg, rp.ReqPages):
                        if last_block is None:
                            self._finish(Outcome.CORRUPT, "REQ_PAGES before any REQ_PAGES_ID")
                            return
                        self.requests.put(PageRequest(last_block, msg.start, msg.length, now))
                    elif isinstance(msg, rp.Shut):
                        ok = msg.status == 0
                        self._finish(Outcome.SHUT_OK if ok else Outcome.SHUT_ERROR)
                        return
                    elif isinstance(msg, rp.Pong):
                        self.pongs.append(msg.value)
                    else:
                        log.debug("ignoring return path message %r", msg)
        except StreamError as exc:
            self._finish(Outcome.CORRUPT, str(exc))

    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> Outcome | None:
        """The outcome, waiting at most ``timeout`` seconds for it (None: still open)."""
        self._done.wait(timeout)
        return self.outcome

    def describe(self) -> str:
        """One line for the user about how the return path ended."""
        if self.outcome is None:
            return "the return path is still open"
        return f"{self.outcome.value}: {self.detail}" if self.detail else self.outcome.value

    def join(self, timeout: float) -> None:
        """Wait for the thread once the outcome is known (it stops at SHUT or EOF)."""
        if self._done.is_set():
            self._thread.join(timeout)
