"""Reads through qemu-storage-daemon's vhost-user-blk export, checked against the image's
contents as qemu-img wrote them (a qcow2 converted from a random raw file)."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.image.daemon import StorageDaemon, qsd_binary
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.spec import parse_spec
from qsnap.image.vhost_blk import VhostBlkReader
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


def _reader(daemon: StorageDaemon, depth: int = 4) -> VhostBlkReader:
    return VhostBlkReader.open(
        daemon.vhost_user_path, depth=depth, slot_size=MiB, timeout=10, death=daemon.death
    )


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


def test_shared_reads_are_used_where_possible(image: tuple[Path, bytes]) -> None:
    with SnapshotImage.open(str(image[0]), shared_reads=True) as img:
        assert img.shares_memory
    with SnapshotImage.open(str(image[0]), writable=True, shared_reads=True) as img:
        assert not img.shares_memory  # the export is read-only: never for a save


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
