"""SyncQMP's connect: a refused connection raises, and qemu.qmp logs no ERROR for it.

The harness retries connecting while QEMU starts, so each refusal is expected; an ERROR
record for it would land in the golden output of the iotests. No QEMU is needed: a unix
socket bound but not listening refuses connections exactly as QEMU's does at start-up.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.qmp import QMPConnectionError, SyncQMP


@pytest.fixture
def client() -> Iterator[SyncQMP]:
    qmp = SyncQMP("unit")
    yield qmp
    qmp.close()


@pytest.fixture
def refusing_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening: connect() is refused
        yield path


def library_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        rec.getMessage()
        for rec in caplog.records
        if rec.name.startswith("qemu.qmp") and rec.levelno >= logging.ERROR
    ]


def test_refused_connect_raises_without_library_errors(
    client: SyncQMP, refusing_socket: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(QMPConnectionError, match=r"qmp\.sock: .*Connection refused"):
        client.connect(str(refusing_socket), timeout=5.0)
    assert library_errors(caplog) == []


def test_missing_socket_raises_without_library_errors(
    client: SyncQMP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(QMPConnectionError, match="No such file or directory"):
        client.connect(str(tmp_path / "absent.sock"), timeout=5.0)
    assert library_errors(caplog) == []


def test_library_errors_pass_again_after_connect(
    client: SyncQMP, refusing_socket: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the connection attempt is quiet: later errors of the session are logged."""
    with pytest.raises(QMPConnectionError):
        client.connect(str(refusing_socket), timeout=5.0)
    client._client.logger.error("a later failure")
    assert library_errors(caplog) == ["a later failure"]
