"""``qsnap save`` failures: one error line, exit status 1, an image never marked complete.

Each case checks the message, the status, and that ``info`` says the image is not complete
and ``verify`` refuses it (or that there is no snapshot at all).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from process_helpers import gone

from qsnap.harness import scenario
from qsnap.harness.guests import PatternGuest
from qsnap.harness.tmpfs import Tmpfs
from qsnap.harness.vm import VM
from qsnap.stream import StreamReader
from qsnap.stream import records as r

pytestmark = pytest.mark.qemu

MIB = 64
QSNAP = str(Path(sys.executable).with_name("qsnap"))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def qsnap(*args: str, stdin: bytes = b"") -> Run:
    done = subprocess.run([QSNAP, *args], input=stdin, capture_output=True, timeout=120)
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def create(path: Path, ram: str = f"{MIB}M") -> Path:
    done = qsnap("create", str(path), "--ram-size", ram)
    assert done.returncode == 0, done.stderr
    return path


def qcow2(path: Path, size: int) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M", str(path), str(size)],
        check=True,
        timeout=30,
    )
    return path


def assert_failed(run: Run, message: str) -> None:
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"qsnap save: error: {message}"), run.stderr


def assert_not_complete(image: Path) -> None:
    info = qsnap("info", "--json", str(image))
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["state"] == "saving"
    verify = qsnap("verify", str(image))
    assert verify.returncode == 1
    assert verify.stderr.startswith("qsnap verify: error: incomplete image: save did not finish")


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("errors")
    vm = VM(name="pattern", memory_mib=MIB, log_dir=tmp)
    try:
        PatternGuest.build().configure(vm)
        vm.launch()
        vm.wait_console(PatternGuest.MARKER.decode(), timeout=90)
        vm.stop()
        vm.background_snapshot_to_file(tmp / "raw.bin", timeout=120)
    finally:
        vm.shutdown()
    return (tmp / "raw.bin").read_bytes()


def ram_setup_end(data: bytes) -> int:
    reader = StreamReader()
    reader.feed(data[: 1 << 20])
    for rec in reader.records():
        if isinstance(rec, r.SectionFooter):
            return reader.offset
    raise AssertionError("no RAM setup footer")


def test_truncated_stream(stream: bytes, tmp_path: Path) -> None:
    """Also over a complete snapshot: a failed save never leaves one behind."""
    image = create(tmp_path / "t.qcow2")
    assert qsnap("save", str(image), stdin=stream).returncode == 0
    assert qsnap("verify", str(image)).returncode == 0
    cut = len(stream) // 2
    assert_failed(
        qsnap("save", str(image), stdin=stream[:cut]),
        f"byte {cut}: stream truncated inside",
    )
    assert_not_complete(image)


def test_stream_truncated_in_the_device_state(stream: bytes, tmp_path: Path) -> None:
    image = create(tmp_path / "d.qcow2")
    run = qsnap("save", str(image), stdin=stream[:-10])
    assert_failed(run, f"byte {len(stream) - 10}: stream truncated")
    assert "inside the device state" in run.stderr
    assert_not_complete(image)


def test_corrupted_stream_names_the_byte(stream: bytes, tmp_path: Path) -> None:
    image = create(tmp_path / "c.qcow2")
    at = ram_setup_end(stream)
    bad = stream[:at] + b"\x55" + stream[at + 1 :]
    assert_failed(qsnap("save", str(image), stdin=bad), f"byte {at}: unknown section type 0x55")
    assert_not_complete(image)


def test_image_too_small_names_the_needed_size(stream: bytes, tmp_path: Path) -> None:
    small = qcow2(tmp_path / "s.qcow2", 16 << 20)
    run = qsnap("save", str(small), stdin=stream)
    assert_failed(run, "image too small: the RAM and its digest table needs a virtual size of")
    needed = int(run.stderr.split("at least ")[1].split()[0])
    assert needed > MIB << 20
    info = qsnap("info", str(small))
    assert info.returncode == 1
    assert "the header is empty" in info.stderr
    exact = qcow2(tmp_path / "exact.qcow2", needed + (1 << 20))
    ok = qsnap("save", str(exact), stdin=stream)
    assert ok.returncode == 0, ok.stderr


def test_not_qcow2(stream: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(256 << 20))
    assert_failed(
        qsnap("save", str(raw), stdin=stream),
        f"cannot open image '{raw}': Image is not in qcow2 format",
    )
    info = qsnap("info", f"{raw},driver=raw")
    assert info.returncode == 1
    assert (
        info.stderr
        == "qsnap info: error: not a qsnap image: the header is empty (nothing saved yet)\n"
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    with Tmpfs(tmp_path / "mnt", size_mib=24) as fs:  # TmpfsError (a failure) without root
        yield fs


def test_read_only_image(stream: bytes, tmpfs: Tmpfs) -> None:
    """Saving needs write access; info and verify of a saved image do not."""
    tmpfs.remount(size_mib=128)
    image = create(tmpfs.path / "ro.qcow2")
    assert qsnap("save", str(image), stdin=stream).returncode == 0
    tmpfs.remount(read_only=True)
    assert_failed(
        qsnap("save", str(image), stdin=stream),
        f"cannot open image '{image}': Could not open '{image}': Read-only file system",
    )
    info = qsnap("info", "--json", str(image))
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["complete"] is True
    assert qsnap("verify", str(image)).returncode == 0


def test_disk_full(stream: bytes, tmpfs: Tmpfs) -> None:
    image = create(tmpfs.path / "full.qcow2")
    run = qsnap("save", str(image), stdin=stream)
    assert_failed(run, "NBD WRITE at 0x")
    assert "No space left on device" in run.stderr
    assert_not_complete(image)


def _throttled_save(tmp_path: Path) -> tuple[VM, Path, Path, Path]:
    """A running guest whose save is slowed to 8 MiB/s, so it can be cut short."""
    vm = VM(name="victim", memory_mib=MIB, log_dir=tmp_path)
    PatternGuest.build().configure(vm)
    vm.launch()
    vm.wait_console(PatternGuest.MARKER.decode(), timeout=90)
    image = create(tmp_path / "k.qcow2")
    err, rc = tmp_path / "err", tmp_path / "rc"
    uri = scenario.save_uri(image, exit_status=rc, stderr=err)
    scenario.start_throttled_save(vm, uri, bandwidth=8 << 20, started=2 << 20, timeout=30)
    return vm, image, err, rc


def test_qemu_killed_mid_migration(tmp_path: Path) -> None:
    vm, image, err, rc = _throttled_save(tmp_path)
    try:
        pid = vm.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert scenario.wait_exit_status(rc, 30) == 1
    finally:
        vm.shutdown()
    text = err.read_text()
    assert text.count("\n") == 1 and "stream truncated inside" in text, text
    assert text.startswith("qsnap save: error: byte ")
    assert_not_complete(image)


def test_migrate_cancel(tmp_path: Path) -> None:
    vm, image, err, rc = _throttled_save(tmp_path)
    try:
        vm.command("migrate_cancel")
        assert scenario.wait_exit_status(rc, 30) == 1
        assert vm.wait_migration(30).status.value == "cancelled"
    finally:
        vm.shutdown()
    text = err.read_text()
    assert text.count("\n") == 1 and "stream truncated inside" in text, text
    assert_not_complete(image)


def _daemons(pid: int) -> list[int]:
    """The storage daemons ``pid`` started (not its start-up read-ahead child)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, rest = stat.split("(", 1)[1].rsplit(")", 1)
            if int(rest.split()[1]) == pid and name.startswith("qemu-storage"):
                found.append(int(entry))
    return found


@contextlib.contextmanager
def _save_under_way(
    stream: bytes, image: Path, **popen: Any
) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """A save given the first quarter of ``stream``, once its storage daemon runs (its
    pids come with it); killed on the way out."""
    proc = subprocess.Popen(
        [QSNAP, "save", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(stream[: len(stream) // 4])
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not (daemons := _daemons(proc.pid)):
            assert time.monotonic() < deadline, "no qemu-storage-daemon started"
            time.sleep(0.02)
        yield proc, daemons
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_save_and_its_daemon(
    stream: bytes, tmp_path: Path, sig: signal.Signals
) -> None:
    image = create(tmp_path / "sig.qcow2")
    with _save_under_way(stream, image) as (proc, daemons):
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert out == b""
    assert err.decode() == f"qsnap save: error: interrupted by {sig.name}\n"
    # qsnap stops and reaps its daemon before exiting
    assert not any(os.path.exists(f"/proc/{pid}") for pid in daemons)
    _assert_never_complete(image)


def _assert_never_complete(image: Path) -> None:
    """Incomplete, or (stopped before the header was written) empty."""
    verify = qsnap("verify", str(image))
    assert verify.returncode == 1
    assert "incomplete image" in verify.stderr or "header is empty" in verify.stderr


def test_a_killed_save_leaves_no_socket_directory(stream: bytes, tmp_path: Path) -> None:
    """SIGKILL cannot be cleaned up after: so the daemon's directory (sockets, pid file,
    log) is gone as soon as qsnap has connected, and the daemon follows qsnap."""
    image = create(tmp_path / "k.qcow2")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with _save_under_way(stream, image, env={**os.environ, "TMPDIR": str(tmp)}) as (
        proc,
        daemons,
    ):
        deadline = time.monotonic() + 30
        while list(tmp.iterdir()):
            assert time.monotonic() < deadline, f"left while connected: {list(tmp.iterdir())}"
            time.sleep(0.02)
        assert proc.poll() is None  # the save waits for the rest of the stream
        proc.kill()
        proc.wait()
        assert all(gone(pid, timeout=30) for pid in daemons), "the daemon outlived qsnap"
    assert list(tmp.iterdir()) == []
    _assert_never_complete(image)


def test_daemon_dying_mid_save_is_reported(stream: bytes, tmp_path: Path) -> None:
    image = create(tmp_path / "dd.qcow2")
    with _save_under_way(stream, image) as (proc, daemons):
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
        # qsnap may have given up already: communicate() ignores the broken pipe
        out, err = proc.communicate(stream[len(stream) // 4 :], timeout=30)
    assert proc.returncode == 1
    assert out == b""
    text = err.decode()
    assert text.count("\n") == 1 and text.startswith("qsnap save: error: "), text
    # mid-save, or (when the kill lands first) while connecting
    assert text.endswith("qemu-storage-daemon was killed by SIGKILL)\n") or text.endswith(
        "': qemu-storage-daemon was killed by SIGKILL\n"
    ), text


def test_stalled_source_times_out(stream: bytes, tmp_path: Path) -> None:
    image = create(tmp_path / "stall.qcow2")
    proc = subprocess.Popen(
        [QSNAP, "save", "--timeout", "2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(stream[:300000])
        proc.stdin.flush()  # and then nothing, with the pipe left open
        proc.wait(timeout=60)
        assert proc.stderr is not None and proc.stdout is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert out == b""
    assert err.decode() == "qsnap save: error: byte 300000: no stream data for 2 s\n"
    assert_not_complete(image)
