"""A synchronous QMP connection on top of the asyncio `qemu.qmp.QMPClient`.

The client runs in an event loop of its own, on a daemon thread, so that synchronous
tests can use it next to any other event loop (pytest plugins, other VMs) and so that
events are collected while the caller is blocked elsewhere. Every call has a timeout.

A refused connection is normal while QEMU starts (it creates the socket before it
listens), so callers retry `connect`. qemu.qmp logs every failed attempt at ERROR, which
would land in the golden output of every iotest; `connect` drops those records, because
the failure itself still surfaces as a `QMPConnectionError` (or `QMPTimeout`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_EVENTS = 4096
"""Events kept until consumed; the oldest are dropped beyond this (memory stays bounded)."""


class QMPCommandError(Exception):
    """QEMU answered a command with an error: `error_class` and `desc` are QEMU's."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPTimeout(Exception):
    """A QMP command or an event wait did not finish in time."""


class QMPConnectionError(Exception):
    """The QMP connection failed or was lost."""


class SyncQMP:
    """One QMP session, used from synchronous code; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client = QMPClient(name)
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._cond = threading.Condition()
        self._pump: concurrent.futures.Future[None] | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            # The inner wait_for normally fires first; the outer bound guards the loop itself.
            return future.result(timeout + 5.0)
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            raise QMPTimeout(f"{what}: no answer within {timeout:g} s") from None

    def connect(self, path: str, timeout: float) -> None:
        """Connect to QEMU's QMP unix socket and negotiate capabilities."""
        library_log = self._client.logger
        library_log.addFilter(_drop_errors)
        try:
            self._run(self._client.connect(path), timeout, f"QMP connect to {path}")
        except QMPTimeout:
            raise
        except Exception as exc:
            log.debug("%s: QMP connect to %s failed: %s", self.name, path, exc)
            raise QMPConnectionError(f"QMP connect to {path}: {exc}") from exc
        finally:
            library_log.removeFilter(_drop_errors)
        self._pump = asyncio.run_coroutine_threadsafe(self._pump_events(), self._loop)

    async def _pump_events(self) -> None:
        while True:
            event = await self._client.events.get()
            with self._cond:
                self._events.append(dict(event))
                self._cond.notify_all()

    def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 30.0
    ) -> Any:
        """Run `command`; return its result or raise `QMPCommandError` with QEMU's error."""
        log.debug("%s: %s %s", self.name, command, arguments or "")
        try:
            return self._run(self._client.execute(command, dict(arguments or {})), timeout, command)
        except ExecuteError as exc:
            raise QMPCommandError(command, exc.error_class, exc.error.error.desc) from None
        except QMPTimeout:
            raise
        except Exception as exc:
            raise QMPConnectionError(f"{command}: QMP connection lost ({exc})") from exc

    def wait_event(
        self,
        name: str,
        timeout: float,
        match: Mapping[str, object] | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Remove and return the oldest unconsumed event `name` whose data contains `match`.

        `alive` is polled while waiting so that a dead QEMU ends the wait at once.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self._events:
                    if event.get("event") == name and _contains(event.get("data", {}), match):
                        self._events.remove(event)
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QMPTimeout(f"event {name} not seen within {timeout:g} s")
                if alive is not None and not alive():
                    raise QMPConnectionError(f"event {name}: QEMU exited")
                self._cond.wait(min(remaining, 0.1))

    def events(self) -> list[dict[str, Any]]:
        """A copy of the unconsumed events, oldest first."""
        with self._cond:
            return list(self._events)

    def clear_events(self) -> None:
        with self._cond:
            self._events.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect and stop the event loop thread; safe to call more than once."""
        if self._loop.is_closed():
            return
        if self._pump is not None:
            self._pump.cancel()
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), timeout, "QMP disconnect")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()


def _drop_errors(record: logging.LogRecord) -> bool:
    """A logging filter for qemu.qmp during `connect`: its failures are raised instead.

    CRITICAL stays: qemu.qmp uses it for its own bugs.
    """
    return record.levelno != logging.ERROR


def _contains(data: object, match: Mapping[str, object] | None) -> bool:
    if not match:
        return True
    if not isinstance(data, Mapping):
        return False
    return all(key in data and data[key] == value for key, value in match.items())
