"""The NBD client and SnapshotImage against a real qemu-storage-daemon (qcow2, 1 MiB clusters)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.image.daemon import StorageDaemon
from qsnap.image.errors import ImageError, NbdError, NotAnImage
from qsnap.image.layout import create_size
from qsnap.image.nbd import AllocFlag, NbdClient, StatusExtent
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.spec import parse_spec

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def qcow2(path: Path, size: int) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=1M,preallocation=off,refcount_bits=8", str(path), str(size)],
        check=True, timeout=30,
    )  # fmt: skip
    return path


@pytest.fixture
def client(tmp_path: Path) -> Iterator[NbdClient]:
    spec = parse_spec(str(qcow2(tmp_path / "a.qcow2", 64 * MiB)))
    with StorageDaemon(spec, writable=True) as d, NbdClient.connect(d.socket_path, "qsnap") as c:
        yield c


def test_pipelined_writes_then_reads_round_trip(client: NbdClient) -> None:
    assert client.size == 64 * MiB
    assert not client.read_only
    cookies = [client.submit_write(i * MiB, bytes([i + 1]) * MiB) for i in range(12)]
    assert client.in_flight <= client.window
    for cookie in cookies:
        client.wait(cookie)
    reads = {i: client.submit_read(i * MiB + 4096, 8192) for i in range(12)}
    for i, cookie in reversed(reads.items()):
        assert client.wait_read(cookie) == bytes([i + 1]) * 8192
    client.flush()


def test_zeroes_trim_and_block_status(client: NbdClient) -> None:
    client.write(0, b"\xaa" * (4 * MiB))
    client.write_zeroes(MiB, MiB)  # may trim: cluster becomes a zero cluster
    client.write_zeroes(2 * MiB, MiB, may_trim=False)
    client.trim(3 * MiB, MiB)
    client.wait(client.submit_write_zeroes(8 * MiB, MiB, fast=True))  # unallocated: fast
    client.flush()
    assert client.read(MiB, MiB) == bytes(MiB)
    assert client.read(2 * MiB, MiB) == bytes(MiB)
    assert client.read(0, 16) == b"\xaa" * 16
    extents = list(client.iter_block_status(0, 64 * MiB))
    assert extents[0] == StatusExtent(0, MiB, AllocFlag.NONE)
    assert extents[1].offset == MiB and extents[1].flags & AllocFlag.ZERO
    assert sum(e.length for e in extents) == 64 * MiB
    tail = [e for e in extents if e.offset >= 4 * MiB]
    assert all(e.flags & AllocFlag.ZERO for e in tail)


def test_unaligned_small_io_and_sparse_read(client: NbdClient) -> None:
    client.write(5 * MiB + 100, b"hello")
    data = client.read(5 * MiB, 2 * MiB)  # second MiB is a hole: OFFSET_HOLE chunk
    assert data[100:105] == b"hello"
    assert data.count(0) == 2 * MiB - 5


def test_read_only_export_surfaces_the_server_error(tmp_path: Path) -> None:
    spec = parse_spec(str(qcow2(tmp_path / "ro.qcow2", 8 * MiB)))
    with StorageDaemon(spec, writable=False) as d, NbdClient.connect(d.socket_path, "qsnap") as c:
        assert c.read_only
        with pytest.raises(NbdError, match=r"NBD WRITE at 0x0\+0x1000: .*read-only"):
            c.write(0, bytes(4096))
        assert c.read(0, 4096) == bytes(4096)


def _open_flags(pid: int, path: Path) -> int:
    """The open(2) flags of ``pid``'s descriptor for ``path`` (from /proc/PID/fdinfo)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("flags:"):
                        return int(line.split()[1], 8)
    raise AssertionError(f"{path} is not open in process {pid}")


def test_seed_spec_opens_the_file_with_o_direct(tmp_path: Path) -> None:
    """The seed's example spec works, and cache.direct=on really reaches the file."""
    path = qcow2(tmp_path / "d.qcow2", 8 * MiB)
    data = os.urandom(MiB)
    with StorageDaemon(parse_spec(f"{path},cache.direct=on,file.aio=native"), writable=True) as d:
        assert d.pid is not None
        assert _open_flags(d.pid, path) & os.O_DIRECT
        with NbdClient.connect(d.socket_path, "qsnap") as c:
            c.write(2 * MiB, data)
            c.flush()
            assert c.read(2 * MiB, MiB) == data
    with StorageDaemon(parse_spec(str(path)), writable=False) as d:
        assert d.pid is not None
        assert not _open_flags(d.pid, path) & os.O_DIRECT
        with NbdClient.connect(d.socket_path, "qsnap") as c:
            assert c.read(2 * MiB, MiB) == data


def test_daemon_error_reaches_the_user_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    with pytest.raises(ImageError) as info, StorageDaemon(parse_spec(str(missing)), writable=True):
        pass
    assert str(info.value) == (
        f"cannot open image '{missing}': Could not open '{missing}': No such file or directory"
    )
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(MiB))
    with pytest.raises(ImageError) as info:
        SnapshotImage.open(str(raw))
    assert str(info.value) == f"cannot open image '{raw}': Image is not in qcow2 format"


def test_socket_dir_is_private_and_daemon_is_cleaned_up(tmp_path: Path) -> None:
    spec = parse_spec(str(qcow2(tmp_path / "p.qcow2", 8 * MiB)))
    with pytest.raises(RuntimeError, match="boom"), StorageDaemon(spec, writable=True) as d:
        directory = os.path.dirname(d.socket_path)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(d.socket_path).st_mode)
        pid = d.pid
        assert d.alive() and pid is not None
        raise RuntimeError("boom")
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(directory)


# SIGTERM sent by qsnap to itself the moment the daemon is forked: launch() holds it back
# and delivers it as it returns, the narrowest window in which the daemon could be lost.
_SIGNAL_AT_LAUNCH = """
import os, signal, subprocess, sys
from qsnap.cli import main
real = subprocess.Popen
def popen(argv, **kwargs):
    proc = real(argv, **kwargs)
    with open(sys.argv[1], "w") as f:
        print(proc.pid, argv[argv.index("--pidfile") + 1], file=f)
    os.kill(os.getpid(), signal.SIGTERM)
    return proc
subprocess.Popen = popen
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("command", "message"),
    [("save", "interrupted by SIGTERM"), ("revert", "terminated by SIGTERM")],
)
def test_a_signal_as_the_daemon_starts_still_stops_it(
    tmp_path: Path, command: str, message: str
) -> None:
    image = qcow2(tmp_path / "s.qcow2", 8 * MiB)
    seen = tmp_path / "daemon"
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_LAUNCH, str(seen), command, str(image)],
        input=b"",
        capture_output=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr.decode()) == (1, f"qsnap {command}: error: {message}\n")
    pid, pidfile = seen.read_text().split()
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(os.path.dirname(pidfile))


def test_a_daemon_deaf_to_sigterm_is_killed_after_the_grace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """stop(grace=...) waits that long, not the whole timeout (a flushed image has
    nothing left to lose, and QEMU's monitor waits for qsnap under exec:), and the
    warning keeps what the daemon said (its log is deleted with the socket directory)."""
    fake = tmp_path / "qsd"
    fake.write_text(
        "#!/bin/sh\ntrap '' TERM\necho 'qemu-storage-daemon: stuck in shutdown' >&2\n"
        'while [ "$#" -gt 1 ]; do [ "$1" = --pidfile ] && echo $$ > "$2"; shift; done\n'
        "exec sleep 60\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("QSNAP_QSD", str(fake))
    daemon = StorageDaemon(parse_spec(str(tmp_path / "x.qcow2")), writable=True)
    daemon.start()
    pid = daemon.pid
    start = time.monotonic()
    daemon.stop(grace=0.2)
    assert time.monotonic() - start < daemon.timeout / 2
    assert not os.path.exists(f"/proc/{pid}")
    assert caplog.messages == [
        "qemu-storage-daemon ignored SIGTERM for 0.2 s; killing it (it said: stuck in shutdown)"
    ]


def test_empty_and_raw_images_are_not_snapshots(tmp_path: Path) -> None:
    path = qcow2(tmp_path / "e.qcow2", 8 * MiB)
    with SnapshotImage.open(str(path)) as image, pytest.raises(NotAnImage, match="empty"):
        image.read_header()
    raw = tmp_path / "r.img"
    raw.write_bytes(b"\x7fELF" + bytes(4 * MiB))
    with (
        SnapshotImage.open(f"{raw},driver=raw") as image,
        pytest.raises(NotAnImage, match=r"magic b'\\x7fELF"),
    ):
        image.read_header()


def test_qsnap_create_makes_the_seed_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("qsnap")), "create", str(path), "--ram-size", "1G"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["cluster-size"] == MiB
    assert info["format-specific"]["data"]["refcount-bits"] == 8
    assert info["virtual-size"] == create_size(1 << 30)
    assert done.stdout == f"{path}: qcow2, virtual size {info['virtual-size']}\n"
    assert os.stat(path).st_blocks * 512 < 4 * MiB  # preallocation=off
