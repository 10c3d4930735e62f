"""ImageWriter against a real qemu-storage-daemon: ordering, states, placement, fit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qsnap.image import layout
from qsnap.image.errors import ImageError, ImageTooSmall, IncompleteImage
from qsnap.image.layout import BlockEntry, ImageState, Pass
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.virtqueue import ORDERED_HOST
from qsnap.image.writer import ImageWriter, RamSetup, StreamPrologue

pytestmark = pytest.mark.qemu

MiB = 1 << 20
PAGE = 4096
HEAD = StreamPrologue(b"QEVM\0\0\0\3", "pc-test", PAGE)
SETUP = RamSetup(3, 0, 4, b"\x01setup", (BlockEntry("ram0", 4 * MiB), BlockEntry("rom", 64 << 10)))


def qcow2(path: Path, size: int) -> str:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1M", str(path), str(size)],
        check=True,
        timeout=30,
    )
    return str(path)


def page(n: int) -> bytes:
    return bytes([n]) * PAGE


@pytest.mark.parametrize("shared", [False, True], ids=["nbd", "shared-writes"])
def test_states_resends_and_zeroed_pages(tmp_path: Path, shared: bool) -> None:
    spec = qcow2(tmp_path / "w.qcow2", 32 * MiB)
    with SnapshotImage.open(spec, writable=True, shared_writes=shared) as image:
        assert image.shares_memory is (shared and ORDERED_HOST)
        writer = ImageWriter(image)
        assert writer.previous is None
        writer.start_ram(HEAD, SETUP)
        assert image.read_header().state == ImageState.SAVING
        for i in range(300):  # a run longer than one gathered write
            writer.page("ram0", i * PAGE, page(1))
        writer.page("ram0", 5 * PAGE, page(2))  # resent while the first copy is in flight
        writer.zero("ram0", 7 * PAGE, PAGE)  # zero after data
        writer.zero("ram0", 400 * PAGE, PAGE)  # plain zero page: no I/O
        writer.page("rom", 0, page(3))
        header = writer.finish()
        assert header.state == ImageState.SAVING and header.passes == Pass.RAM
        with pytest.raises(IncompleteImage, match=r"missing: vmstate"):
            image.complete_header()
        ram0 = header.block("ram0")
        assert (ram0.data_pages, ram0.zero_pages) == (299, 1024 - 299)
        assert ram0.image_offset == layout.HEADER_SIZE
        assert header.block("rom").image_offset == layout.HEADER_SIZE + 4 * MiB
        data = image.client.read(ram0.image_offset, 8 * PAGE)
        assert data[5 * PAGE : 6 * PAGE] == page(2)
        assert data[7 * PAGE : 8 * PAGE] == bytes(PAGE)
        assert data[:PAGE] == page(1)
        digests = image.client.read(header.digests.offset, header.digests.length)
        assert digests[5 * 8 : 6 * 8] == layout.page_digest(page(2))
        assert digests[7 * 8 : 8 * 8] == layout.page_digest(bytes(PAGE))
        writer2 = ImageWriter(image)  # the vmstate pass completes it
        writer2.start_device_state(HEAD)
        writer2.device_state(b"\x04device" + b"\x00")
        final = writer2.finish(device_sections_length=7)
        assert final.complete and final.device_state.offset == header.device_state.offset
        result = image.verify()
        assert result.ok and result.pages == 1024 + 16


def test_too_small_is_refused_before_any_write(tmp_path: Path) -> None:
    spec = qcow2(tmp_path / "s.qcow2", 8 * MiB)
    big = RamSetup(3, 0, 4, b"", (BlockEntry("ram0", 16 * MiB),))
    with SnapshotImage.open(spec, writable=True) as image:
        image.client.write(0, b"untouched")
        with pytest.raises(ImageTooSmall) as info:
            ImageWriter(image).start_ram(HEAD, big)
        assert info.value.needed == layout.HEADER_SIZE + 16 * MiB + MiB
        assert image.client.read(0, 9) == b"untouched"


def test_vmstate_first_then_ram_lays_ram_after_the_device_state(tmp_path: Path) -> None:
    spec = qcow2(tmp_path / "v.qcow2", 32 * MiB)
    with SnapshotImage.open(spec, writable=True) as image:
        first = ImageWriter(image)
        first.start_device_state(HEAD)
        first.device_state(bytes(3 * MiB) + b"\x00")
        header = first.finish(device_sections_length=3 * MiB)
        assert header.device_state == layout.Region(layout.HEADER_SIZE, 3 * MiB + 1)
        second = ImageWriter(image)
        second.start_ram(HEAD, SETUP)
        second.page("ram0", 0, page(9))
        final = second.finish()
        assert final.complete
        assert final.block("ram0").image_offset == layout.HEADER_SIZE + 4 * MiB
        assert image.read("ram0", 0, PAGE) == page(9)
        assert b"".join(image.device_state(sections_only=True)) == bytes(3 * MiB)


@pytest.mark.parametrize("shared", [False, True], ids=["nbd", "shared-writes"])
def test_runs_split_resent_and_zeroed(tmp_path: Path, shared: bool) -> None:
    """Runs cut across small writes, a resent run over data in flight, a zero run over
    part of it; then a data page where a zeroed one was (no write may overtake another).
    With shared writes the data goes through vhost-user-blk and the zeroing over NBD."""
    spec = qcow2(tmp_path / "r.qcow2", 32 * MiB)
    with SnapshotImage.open(spec, writable=True, shared_writes=shared) as image:
        assert image.shares_memory is (shared and ORDERED_HOST)
        writer = ImageWriter(image, max_write=5 * PAGE)
        writer.start_ram(HEAD, SETUP)
        writer.pages("ram0", 3 * PAGE, [memoryview(page(10 + i)) for i in range(20)])
        writer.pages("ram0", 12 * PAGE, [page(40 + i) for i in range(4)])  # resent
        writer.zeros("ram0", 0, 6, PAGE)  # pages 3-5 had data
        writer.pages("ram0", 4 * PAGE, [page(60)])
        with pytest.raises(ImageError, match=r"outside the block"):
            writer.pages("rom", 14 * PAGE, [page(1), page(1), page(1)])
        header = writer.finish()
        ram0 = header.block("ram0")
        expected = [bytes(PAGE)] * 3 + [page(10 + i) for i in range(20)]
        expected[3] = expected[5] = bytes(PAGE)
        expected[4] = page(60)
        expected[12:16] = [page(40 + i) for i in range(4)]
        assert (ram0.data_pages, header.block("rom").data_pages) == (18, 0)
        data = image.client.read(ram0.image_offset, len(expected) * PAGE)
        got = [bytes(data[i * PAGE : (i + 1) * PAGE]) for i in range(len(expected))]
        assert got == expected
        digests = image.client.read(header.digests.offset, len(expected) * 8)
        assert bytes(digests) == b"".join(layout.page_digest(p) for p in expected)
