"""The patched QEMU (qemu-patches/, ci/build-qemu) and its `stream-content-list` parameter.

The first test builds the patched QEMU once (ci/build-qemu caches it by a hash of its
inputs, so only a new series pays the few minutes of the build). The stream checks use
QEMU's own tools: the patched scripts/analyze-migration.py, `pmemsave` for the memory of
the paused guest; the RAM-only stream is also parsed with qsnap.stream.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.guests import PatternGuest
from qsnap.harness.patched_qemu import (
    PatchedQemu,
    StreamContent,
    background_snapshot_parts,
    build_patched_qemu,
    set_stream_content,
    stream_content,
)
from qsnap.harness.qemu import find_qemu_img, find_storage_daemon
from qsnap.harness.vm import RunState, VMCommandError, VMFactory
from qsnap.stream import StreamReader
from qsnap.stream import records as r

pytestmark = pytest.mark.qemu

MEMORY_MIB = 64
PAGE_SIZE = 4096
SNAPSHOT_TIMEOUT = 120.0
IOTEST = "migrate-ram-stream-content-test"
IOTEST_TIMEOUT = 600.0
LEGACY_VGA = range(0xA0000, 0x100000)
"""Guest-physical addresses where pmemsave sees VGA and ROM windows rather than pc.ram."""


@pytest.fixture(scope="module")
def patched() -> PatchedQemu:
    return build_patched_qemu()


@pytest.fixture
def vms(tmp_path: Path, patched: PatchedQemu) -> Iterator[VMFactory]:
    factory = VMFactory(tmp_path, qemu=patched.qemu, memory_mib=MEMORY_MIB)
    yield factory
    factory.close()


def analyze(patched: PatchedQemu, stream: Path, *args: str) -> dict[str, object]:
    """`analyze-migration.py -d state` of the patched tree, as JSON."""
    done = subprocess.run(
        [sys.executable, os.fspath(patched.analyze_migration), "-f", os.fspath(stream), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def read_stream(path: Path) -> list[r.Record]:
    """Every record of a stream file, parsed in 1 MiB chunks; page data is kept."""
    reader = StreamReader()
    found: list[r.Record] = []
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            reader.feed(chunk)
            found.extend(reader.records())
    reader.close()
    found.extend(reader.records())
    return found


def test_parameter_in_qmp_and_hmp(vms: VMFactory) -> None:
    vm = vms(paused=True)
    assert stream_content(vm) is None
    set_stream_content(vm, [StreamContent.VMSTATE, StreamContent.RAM])
    assert stream_content(vm) == (StreamContent.VMSTATE, StreamContent.RAM)
    assert "stream-content-list: vmstate,ram" in vm.hmp("info migrate_parameters")

    assert vm.hmp("migrate_set_parameter stream-content-list ram") == ""
    assert stream_content(vm) == (StreamContent.RAM,)
    assert "Parameter 'stream-content-list' does not accept value 'disk'" in vm.hmp(
        "migrate_set_parameter stream-content-list ram,disk"
    )
    assert stream_content(vm) == (StreamContent.RAM,)

    set_stream_content(vm, ())
    assert stream_content(vm) is None
    assert "stream-content-list" not in vm.hmp("info migrate_parameters")


def test_partial_lists_refused_where_they_cannot_work(vms: VMFactory, tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(
        [os.fspath(find_qemu_img()), "create", "-q", "-f", "qcow2", os.fspath(disk), "16M"],
        check=True,
        timeout=60,
    )
    vm = vms(paused=True, args=["-drive", f"file={disk},format=qcow2,if=virtio"])
    target = f"exec:cat > {tmp_path / 'unused.stream'}"

    set_stream_content(vm, [StreamContent.VMSTATE, StreamContent.DIRTY_BITMAPS])
    with pytest.raises(VMCommandError, match="'dirty-bitmaps', which needs the dirty-bitmaps"):
        vm.migrate(target)

    set_stream_content(vm, [StreamContent.RAM])
    vm.set_migration_capabilities({"postcopy-ram": True})
    with pytest.raises(VMCommandError, match="postcopy-ram capability needs 'vmstate' and 'ram'"):
        vm.migrate(target)
    vm.set_migration_capabilities({"postcopy-ram": False})

    assert "Snapshots need 'vmstate' and 'ram'" in vm.hmp("savevm partial")
    assert "partial" not in vm.hmp("info snapshots")

    with pytest.raises(VMCommandError, match="lists 'ram' more than once"):
        set_stream_content(vm, [StreamContent.RAM, StreamContent.RAM])
    assert stream_content(vm) == (StreamContent.RAM,)


def test_qemu_iotest(patched: PatchedQemu, tmp_path: Path) -> None:
    """QEMU's own `check` runs the series' iotest against the patched binary."""
    qemu_io = shutil.which("qemu-io")
    qemu_nbd = shutil.which("qemu-nbd")
    assert qemu_io is not None and qemu_nbd is not None, "qemu-io/qemu-nbd not in PATH"
    env = {
        **os.environ,
        "QEMU_PROG": os.fspath(patched.qemu),
        "QEMU_IMG_PROG": os.fspath(find_qemu_img()),
        "QEMU_IO_PROG": qemu_io,
        "QEMU_NBD_PROG": qemu_nbd,
        "QSD_PROG": os.fspath(find_storage_daemon()),
    }
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            os.fspath(patched.iotests / "check"),
            "--source-dir",
            os.fspath(patched.iotests),
            "--build-dir",
            os.fspath(build_dir),
            "-raw",
            IOTEST,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=IOTEST_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^{IOTEST}\s+pass", done.stdout, re.MULTILINE), done.stdout
    assert "Passed all 1 iotests" in done.stdout, done.stdout


def test_two_background_passes_of_a_paused_vm(
    patched: PatchedQemu, vms: VMFactory, tmp_path: Path
) -> None:
    """[vmstate] then [ram]: the VM stays paused and the two streams split the state."""
    vm = vms.create()
    PatternGuest.build().configure(vm)
    vm.launch()
    vm.wait_console(PatternGuest.MARKER.decode(), timeout=60)
    vm.stop()

    vmstate_stream = tmp_path / "vmstate.stream"
    ram_stream = tmp_path / "ram.stream"
    background_snapshot_parts(vm, [StreamContent.VMSTATE], vmstate_stream, SNAPSHOT_TIMEOUT)
    background_snapshot_parts(vm, [StreamContent.RAM], ram_stream, SNAPSHOT_TIMEOUT)
    assert vm.runstate() is RunState.PAUSED
    assert stream_content(vm) is None

    memory = tmp_path / "memory.dump"
    vm.command("pmemsave", val=0, size=MEMORY_MIB << 20, filename=os.fspath(memory))
    guest_memory = memory.read_bytes()
    assert len(guest_memory) == MEMORY_MIB << 20

    # The device state: analyze-migration.py describes it, without any RAM section.
    sections = analyze(patched, vmstate_stream, "-d", "state")
    names = {key.split(" (")[0] for key in sections}
    assert "ram" not in names
    assert {"timer", "cpu", "apic", "i8259"} <= names, sorted(names)

    # The RAM: the analyzer accepts it as RAM-only, and qsnap.stream sees every page once.
    assert [key.split(" (")[0] for key in analyze(patched, ram_stream, "--ram-only")] == ["ram"]
    records = read_stream(ram_stream)
    assert isinstance(records[0], r.StreamHeader)
    assert isinstance(records[1], r.Configuration)
    assert isinstance(records[-1], r.Eof), records[-3:]
    assert not [rec for rec in records if isinstance(rec, r.SectionFull | r.DeviceStateStart)]
    assert not [rec for rec in records if isinstance(rec, r.VmDescription)]
    (mem_size,) = [rec for rec in records if isinstance(rec, r.RamMemSize)]
    blocks = {block.idstr: block.used_length for block in mem_size.blocks}
    assert blocks["pc.ram"] == MEMORY_MIB << 20

    seen: dict[str, list[int]] = {name: [] for name in blocks}
    mismatched: list[int] = []
    compared = 0
    for rec in records:
        if not isinstance(rec, r.RamPage | r.RamZero):
            continue
        seen[rec.block].append(rec.offset)
        if rec.block != "pc.ram" or rec.offset in LEGACY_VGA:
            continue
        compared += isinstance(rec, r.RamPage)
        data = rec.data if isinstance(rec, r.RamPage) else bytes(PAGE_SIZE)
        if data != guest_memory[rec.offset : rec.offset + PAGE_SIZE]:
            mismatched.append(rec.offset)
    for name, offsets in seen.items():
        assert sorted(offsets) == list(range(0, blocks[name], PAGE_SIZE)), name
    assert mismatched == [], [hex(offset) for offset in mismatched[:8]]
    # The guest wrote every page it sweeps: most of them are compared as data pages.
    assert compared >= len(PatternGuest.swept_range(MEMORY_MIB)) // 2, compared
