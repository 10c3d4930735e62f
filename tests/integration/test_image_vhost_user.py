"""Reads, writes and flushes through qemu-storage-daemon's vhost-user-blk export, checked
against the image's contents as qemu-img wrote them (a qcow2 converted from a random raw
file), against NBD reads of the same daemon and against qemu-img reading the file."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.tmpfs import Tmpfs
from qsnap.image.daemon import StorageDaemon, qsd_binary
from qsnap.image.errors import NbdError
from qsnap.image.nbd import NbdClient
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.spec import parse_spec
from qsnap.image.vhost_blk import VhostBlkDevice, VhostWriteError
from qsnap.image.vhost_user import VhostUserError
from qsnap.image.virtqueue import ORDERED_HOST

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not ORDERED_HOST, reason="shared reads need an x86-64 host"),
]

MiB = 1 << 20
SIZE = 24 * MiB


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A qcow2 with 1 MiB clusters holding random data, some of it zeros, and its contents."""
    work = tmp_path_factory.mktemp("vhost")
    rnd = random.Random(7)
    data = bytearray(rnd.randbytes(SIZE))
    data[3 * MiB : 5 * MiB + 4096] = bytes(2 * MiB + 4096)
    raw, qcow2 = work / "data.raw", work / "data.qcow2"
    raw.write_bytes(data)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=1M",
         str(raw), str(qcow2)],
        check=True, timeout=60,
    )  # fmt: skip
    return qcow2, bytes(data)


@pytest.fixture
def daemon(image: tuple[Path, bytes]) -> Iterator[StorageDaemon]:
    with StorageDaemon(parse_spec(str(image[0])), writable=False, vhost_user=True) as d:
        yield d


@pytest.fixture
def writable(tmp_path: Path, image: tuple[Path, bytes]) -> Iterator[StorageDaemon]:
    """A writable daemon on a copy of the image."""
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(image[0], copy)
    with StorageDaemon(parse_spec(str(copy)), writable=True, vhost_user=True) as d:
        yield d


def _reader(daemon: StorageDaemon, depth: int = 4, writable: bool = False) -> VhostBlkDevice:
    return VhostBlkDevice.open(
        daemon.vhost_user_path,
        depth=depth,
        slot_size=MiB,
        timeout=10,
        death=daemon.death,
        writable=writable,
    )


def _nbd(daemon: StorageDaemon) -> NbdClient:
    return NbdClient.connect(daemon.socket_path, daemon.export_name)


def _pieces(rnd: random.Random, data: bytes) -> list[bytes | memoryview]:
    """``data`` cut at random places, as a mix of bytes and memoryviews."""
    cuts = sorted(rnd.sample(range(1, len(data)), min(6, len(data) - 1)))
    return [
        data[a:b] if i % 2 else memoryview(data)[a:b]
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(data)], strict=True))
    ]


def test_random_reads_return_the_image_contents(
    daemon: StorageDaemon, image: tuple[Path, bytes]
) -> None:
    contents = image[1]
    rnd = random.Random(1)
    requests = []
    for _ in range(400):
        length = rnd.randrange(1, MiB // 512 + 1) * 512
        requests.append((rnd.randrange(0, (SIZE - length) // 512 + 1) * 512, length))
    reader = _reader(daemon)
    try:
        got = [bytes(span.view()) for span in reader.reads(requests)]
    finally:
        reader.close()
    assert got == [contents[o : o + n] for o, n in requests]


def test_a_span_is_reused_only_after_the_next_is_asked_for(
    daemon: StorageDaemon, image: tuple[Path, bytes]
) -> None:
    contents = image[1]
    reader = _reader(daemon, depth=2)
    try:
        requests = [(i * MiB, MiB) for i in range(12)]
        previous = None
        for (offset, _), span in zip(requests, reader.reads(requests), strict=True):
            # Two reads are in flight in the other slot meanwhile: this one stays intact.
            assert bytes(span.view()) == contents[offset : offset + MiB]
            if previous is not None:
                assert previous.start != span.start
            previous = span
        # A sequence abandoned with reads in flight, then a new one: nothing mixes up.
        sequence = reader.reads([(i * MiB, MiB) for i in range(8)])
        assert bytes(next(sequence).view()) == contents[:MiB]
        sequence.close()
        again = [bytes(s.view()) for s in reader.reads([(20 * MiB, MiB), (2 * MiB, 4096)])]
        assert again == [contents[20 * MiB : 21 * MiB], contents[2 * MiB : 2 * MiB + 4096]]
    finally:
        reader.close()


def test_many_small_requests_keep_the_rings_in_step(
    daemon: StorageDaemon, image: tuple[Path, bytes]
) -> None:
    """The available index was once stored with struct.pack_into, which clears it first:
    the daemon, reading 0 in between, gave up on the queue after some thousands of
    requests (vu_panic "Virtqueue size exceeded").  60000 requests, 8 in flight."""
    contents = image[1]
    reader = _reader(daemon, depth=8)
    try:
        count = 0
        for i, span in enumerate(reader.reads((i % 4096 * 4096, 512) for i in range(60_000))):
            count += 1
            if i % 997 == 0:
                at = i % 4096 * 4096
                assert bytes(span.view()) == contents[at : at + 512]
        assert count == 60_000
    finally:
        reader.close()


def test_a_read_beyond_the_end_fails_with_the_device_status(daemon: StorageDaemon) -> None:
    reader = _reader(daemon)
    try:
        with pytest.raises(
            VhostUserError, match=rf"read at {SIZE:#x}\+0x1000 failed: status IOERR"
        ):
            list(reader.reads([(0, 4096), (SIZE, 4096)]))
        with pytest.raises(ValueError, match="whole sectors"):
            list(reader.reads([(100, 4096)]))
    finally:
        reader.close()


def test_a_daemon_killed_mid_sequence_is_named(daemon: StorageDaemon) -> None:
    reader = _reader(daemon)
    try:
        sequence = reader.reads((i % 16 * MiB, MiB) for i in range(10_000))
        next(sequence)
        assert daemon.pid is not None
        os.kill(daemon.pid, signal.SIGKILL)
        with pytest.raises(VhostUserError, match=r"dropped the vhost-user-blk connection.*SIGKILL"):
            for _ in sequence:
                pass
        with pytest.raises(VhostUserError, match="unusable"):
            next(reader.reads([(0, 4096)]))
    finally:
        reader.close()


def _fake_qsd(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(
    "body",
    [
        # A daemon that does not know the export type.
        'case "$*" in *vhost-user-blk*) echo "qemu-storage-daemon: --export type=vhost-user-blk:'
        " Parameter 'type' does not accept value 'vhost-user-blk'\" >&2; exit 1;; esac\n"
        'exec "$REAL_QSD" "$@"',
        # A daemon whose vhost-user socket cannot be reached.
        'for a; do shift; case "$a" in *vhost-user-blk*) set -- "$@" '
        '"$(echo "$a" | sed s/vhost-user.sock/elsewhere.sock/)";; *) set -- "$@" "$a";; esac; '
        'done\nexec "$REAL_QSD" "$@"',
    ],
    ids=["export-refused", "socket-unreachable"],
)
def test_without_vhost_user_the_image_reads_over_nbd(
    tmp_path: Path, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    monkeypatch.setenv("REAL_QSD", qsd_binary())
    monkeypatch.setenv("QSNAP_QSD", str(_fake_qsd(tmp_path / "qsd", body)))
    with SnapshotImage.open(str(image[0]), shared_reads=True) as img:
        assert not img.shares_memory
        assert img.size == SIZE  # served over NBD


def test_shared_memory_is_used_where_asked_for(tmp_path: Path, image: tuple[Path, bytes]) -> None:
    with SnapshotImage.open(str(image[0]), shared_reads=True) as img:
        assert img.shares_memory
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(image[0], copy)
    with SnapshotImage.open(str(copy), writable=True, shared_reads=True) as img:
        assert not img.shares_memory  # reads only: a save asks for shared writes
    with SnapshotImage.open(str(copy), writable=True, shared_writes=True) as img:
        assert img.shares_memory
    with SnapshotImage.open(str(image[0]), shared_writes=True) as img:
        assert not img.shares_memory  # a read-only image has no writable export


def test_writes_land_and_read_back_over_nbd_and_vhost(
    writable: StorageDaemon, image: tuple[Path, bytes]
) -> None:
    """Writes in flight together (none overlapping: they are not ordered), some into
    never-allocated clusters; then the image read back both ways."""
    contents = bytearray(image[1])
    rnd = random.Random(3)
    device = _reader(writable, writable=True)
    try:
        cells = list(range(SIZE // MiB))
        rnd.shuffle(cells)
        for cell in cells:
            length = rnd.randrange(1, MiB // 512 + 1) * 512
            offset = cell * MiB + rnd.randrange(0, (MiB - length) // 512 + 1) * 512
            data = rnd.randbytes(length)
            device.write(offset, _pieces(rnd, data), length)
            contents[offset : offset + length] = data
        device.drain()
        with _nbd(writable) as nbd:
            assert bytes(nbd.read(0, SIZE // 2)) + bytes(nbd.read(SIZE // 2, SIZE // 2)) == contents
        spans = device.reads((pos, MiB) for pos in range(0, SIZE, MiB))
        assert b"".join(bytes(span.view()) for span in spans) == contents
    finally:
        device.close()


def test_flush_puts_the_writes_in_the_file(tmp_path: Path) -> None:
    """After a flush, another reader of the qcow2 file (qemu-img) sees the writes: qcow2
    keeps new clusters' mappings in the daemon's cache until then."""
    path = tmp_path / "fresh.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M", str(path),
         str(SIZE)],
        check=True, timeout=30,
    )  # fmt: skip
    rnd = random.Random(5)
    writes = [(3 * MiB + 4096, rnd.randbytes(MiB)), (17 * MiB, rnd.randbytes(8192))]
    with StorageDaemon(parse_spec(str(path)), writable=True, vhost_user=True) as daemon:
        device = _reader(daemon, writable=True)
        try:
            for offset, data in writes:
                device.write(offset, [data], len(data))
            device.flush()
            raw = tmp_path / "fresh.raw"
            subprocess.run(
                ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
                check=True, timeout=30,
            )  # fmt: skip
            on_disk = raw.read_bytes()
            for offset, data in writes:
                assert on_disk[offset : offset + len(data)] == data
            assert on_disk[: 3 * MiB] == bytes(3 * MiB)
        finally:
            device.close()


def test_a_failed_write_is_handed_back_with_its_data(writable: StorageDaemon) -> None:
    device = _reader(writable, writable=True)
    try:
        data = random.Random(9).randbytes(4096)
        device.write(0, [b"\1" * 512], 512)
        device.write(SIZE, [data], 4096)
        with pytest.raises(
            VhostWriteError, match=rf"write at {SIZE:#x}\+0x1000 failed: status IOERR"
        ):
            device.drain()
        try:
            device.drain()  # each failure is raised once
        except VhostWriteError as exc:
            pytest.fail(f"raised twice: {exc}")
        device.write(MiB, [data], 4096)  # and the device goes on
        device.drain()
        assert bytes(next(device.reads([(MiB, 4096)])).view()) == data
        with pytest.raises(ValueError, match="do not add up"):
            device.write(0, [data, data], 4096)
        with pytest.raises(ValueError, match="whole sectors"):
            device.write(100, [data], 4096)
    finally:
        device.close()
    try:
        device = _reader(writable, writable=True)
        device.write(SIZE - 512, [data], 4096)
        with pytest.raises(VhostWriteError) as failed:
            device.flush()
        assert (failed.value.offset, failed.value.data) == (SIZE - 512, data)
    finally:
        device.close()


def test_a_read_only_device_or_export_takes_no_write(
    daemon: StorageDaemon, writable: StorageDaemon
) -> None:
    device = _reader(writable)
    try:
        with pytest.raises(VhostUserError, match="opened read-only"):
            device.write(0, [bytes(512)], 512)
    finally:
        device.close()
    with pytest.raises(VhostUserError, match="export is read-only"):
        _reader(daemon, writable=True)


def test_a_daemon_killed_while_writing_is_named(writable: StorageDaemon) -> None:
    device = _reader(writable, writable=True)
    try:
        data = bytes(MiB)
        device.write(0, [data], MiB)
        assert writable.pid is not None
        os.kill(writable.pid, signal.SIGKILL)
        with pytest.raises(VhostUserError, match=r"dropped the vhost-user-blk connection.*SIGKILL"):
            for i in range(10_000):
                device.write(i % 16 * MiB, [data], MiB)
            device.drain()
    finally:
        device.close()


def test_a_full_disk_is_named_with_the_errno_of_the_same_write_over_nbd(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """virtio-blk only says IOERR: the image redoes the write over NBD to learn ENOSPC."""
    with Tmpfs(tmp_path / "mnt", size_mib=8) as fs:
        path = fs.path / "full.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M", str(path),
             str(SIZE)],
            check=True, timeout=30,
        )  # fmt: skip
        data = random.Random(4).randbytes(2 * MiB)
        with (
            caplog.at_level(logging.DEBUG, logger="qsnap.image.snapshot"),
            SnapshotImage.open(str(path), writable=True, shared_writes=True) as img,
        ):
            assert img.shares_memory
            with pytest.raises(
                NbdError, match=r"NBD WRITE at 0x[0-9a-f]+\+0x200000: No space left"
            ):
                for offset in range(0, SIZE, 2 * MiB):
                    img.submit_writev(offset, [data], len(data))
                img.drain()
        retried = [r.getMessage() for r in caplog.records if "retrying over NBD" in r.getMessage()]
        assert len(retried) == 1 and "status IOERR" in retried[0], retried


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
