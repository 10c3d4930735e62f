"""qsnap.stream against real QEMU streams: a background snapshot of a guest with
no OS (SeaBIOS spinning), saved with ``exec:cat > FILE`` and parsed back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from qsnap.stream import (
    RamEncoder,
    ReturnPathReader,
    StreamReader,
    encode,
    split_device_state_tail,
)
from qsnap.stream import records as r
from qsnap.stream import return_path as rp

pytestmark = pytest.mark.qemu

QEMU = os.environ.get("QSNAP_QEMU", "qemu-system-x86_64")
MEMORY_MIB = 128
TIMEOUT = 60.0
BIOS = "bios-256k.bin"


def _firmware(name: str) -> Path:
    """The firmware file QEMU loads, from its own search path (``-L help``)."""
    dirs = subprocess.run(
        [QEMU, "-L", "help"], capture_output=True, text=True, check=True, timeout=TIMEOUT
    ).stdout.split()
    for folder in dirs:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise AssertionError(f"{name} not in QEMU's firmware path {dirs}")


@dataclass(frozen=True)
class Snapshot:
    data: bytes
    base_memory: int
    machine: str


def _wait_migration(qmp: QEMUMonitorProtocol) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        info = qmp.cmd("query-migrate")
        assert isinstance(info, dict)
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise AssertionError(f"migration {status}: {info.get('error-desc')}")
        time.sleep(0.1)
    raise AssertionError(f"migration not completed within {TIMEOUT} s")


@contextlib.contextmanager
def _qemu(tmp_path: Path, machine: str, *extra: str) -> Iterator[QEMUMonitorProtocol]:
    """A QEMU with no OS (SeaBIOS finds nothing to boot and waits), under TCG."""
    sock = tmp_path / "qmp.sock"
    qmp = QEMUMonitorProtocol(str(sock), server=True)
    qmp.settimeout(TIMEOUT)
    log = (tmp_path / "qemu.log").open("wb")
    proc = subprocess.Popen(
        [QEMU, "-accel", "tcg", "-machine", machine, "-m", str(MEMORY_MIB),
         "-nodefaults", "-nographic", "-device", "VGA", "-qmp", f"unix:{sock}", *extra],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        qmp.accept(timeout=TIMEOUT)
        yield qmp
        qmp.cmd("quit")
        proc.wait(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(EOFError):
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        log.close()


def _background_snapshot(qmp: QEMUMonitorProtocol, out: Path) -> bytes:
    qmp.cmd(
        "migrate-set-capabilities",
        capabilities=[{"capability": "background-snapshot", "state": True}],
    )
    qmp.cmd("migrate", uri=f"exec:cat > {out}")
    _wait_migration(qmp)
    return out.read_bytes()


def _snapshot(tmp_path: Path, machine: str) -> Snapshot:
    with _qemu(tmp_path, machine) as qmp:
        summary = qmp.cmd("query-memory-size-summary")
        assert isinstance(summary, dict)
        data = _background_snapshot(qmp, tmp_path / "stream.bin")
    return Snapshot(data, int(summary["base-memory"]), machine)


@pytest.fixture(scope="module", params=["pc", "q35"])
def snapshot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} not found (run ci/bootstrap)")
    return _snapshot(tmp_path_factory.mktemp(request.param), request.param)


@dataclass
class Parsed:
    records: list[r.Record]
    reader: StreamReader


def _parse(data: bytes, chunk: int) -> Parsed:
    reader = StreamReader()
    out: list[r.Record] = []
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
        out.extend(reader.records())
    reader.close()
    return Parsed(out, reader)


@pytest.fixture(scope="module")
def parsed(snapshot: Snapshot) -> Parsed:
    return _parse(snapshot.data, 65536)


def _pages(records: list[r.Record]) -> Iterator[r.RamPage | r.RamZero]:
    for rec in records:
        if isinstance(rec, r.RamPage | r.RamZero):
            yield rec


def test_prologue(snapshot: Snapshot, parsed: Parsed) -> None:
    recs = parsed.records
    assert recs[0] == r.StreamHeader(3)
    assert isinstance(recs[1], r.Configuration)
    prefix = "pc-i440fx-" if snapshot.machine == "pc" else "pc-q35-"
    assert recs[1].machine.startswith(prefix)
    start = recs[2]
    assert isinstance(start, r.SectionStart)
    assert (start.idstr, start.instance_id, start.version_id) == ("ram", 0, 4)
    assert isinstance(recs[3], r.RamMemSize)
    assert recs[4:6] == [r.RamEos(), r.SectionFooter(start.section_id)]


def test_block_list(snapshot: Snapshot, parsed: Parsed) -> None:
    mem = parsed.reader.mem_size
    assert mem is not None
    blocks = {b.idstr: b.used_length for b in mem.blocks}
    assert blocks["pc.ram"] == snapshot.base_memory == MEMORY_MIB << 20
    assert any(name.endswith("/vga.vram") for name in blocks)
    assert blocks["pc.bios"] == _firmware(BIOS).stat().st_size
    assert "pc.rom" in blocks
    assert all(b.page_size is None and b.mr_addr is None for b in mem.blocks)


def test_every_page_exactly_once(parsed: Parsed) -> None:
    mem = parsed.reader.mem_size
    assert mem is not None
    seen: dict[str, set[int]] = {b.idstr: set() for b in mem.blocks}
    count = 0
    for rec in _pages(parsed.records):
        assert rec.offset not in seen[rec.block], (rec.block, rec.offset)
        seen[rec.block].add(rec.offset)
        count += 1
    for block in mem.blocks:
        assert seen[block.idstr] == set(range(0, block.used_length, 4096)), block.idstr
    assert count == mem.total // 4096


def test_bios_block_is_the_seabios_image(parsed: Parsed) -> None:
    bios = _firmware(BIOS).read_bytes()
    image = bytearray(len(bios))
    for rec in _pages(parsed.records):
        if rec.block == "pc.bios" and isinstance(rec, r.RamPage):
            image[rec.offset : rec.offset + 4096] = rec.data
    assert bytes(image) == bios


def test_device_state_part(snapshot: Snapshot, parsed: Parsed) -> None:
    recs = parsed.records
    starts = [i for i, rec in enumerate(recs) if isinstance(rec, r.DeviceStateStart)]
    assert len(starts) == 1
    device = recs[starts[0]]
    assert isinstance(device, r.DeviceStateStart)
    before = recs[starts[0] - 2 : starts[0]]
    assert isinstance(before[1], r.SectionFooter)
    assert before[0] == r.RamEos()
    assert isinstance(device.section, r.SectionFull)
    ram_bytes = b"".join(encode(rec) for rec in recs[: starts[0]])
    assert device.offset == len(ram_bytes)
    assert snapshot.data[device.offset] == 0x04
    assert all(isinstance(rec, r.DeviceStateChunk) for rec in recs[starts[0] + 1 :])
    assert not any(isinstance(rec, r.Command | r.SectionEnd) for rec in recs)

    end = parsed.reader.device_state_end
    assert end is not None and end.vmdesc_length is not None
    assert snapshot.data[end.eof_offset : end.eof_offset + 2] == b"\x00\x06"
    assert end.eof_offset + 6 + end.vmdesc_length == len(snapshot.data)
    vmdesc = json.loads(snapshot.data[end.eof_offset + 6 :])
    assert "devices" in vmdesc
    assert split_device_state_tail(snapshot.data[-(1 << 20) :], len(snapshot.data)) == end


@pytest.mark.parametrize("chunk", [1 << 20, 4093])
def test_reserialises_byte_identical(snapshot: Snapshot, chunk: int) -> None:
    parsed = _parse(snapshot.data, chunk)
    assert b"".join(encode(rec) for rec in parsed.records) == snapshot.data


def _memory(records: list[r.Record]) -> dict[tuple[str, int], bytes | None]:
    return {
        (rec.block, rec.offset): rec.data if isinstance(rec, r.RamPage) else None
        for rec in _pages(records)
    }


def test_qemu_loads_what_the_writer_generates(
    snapshot: Snapshot, parsed: Parsed, tmp_path: Path
) -> None:
    """Re-encode the RAM records without CONTINUE (RamEncoder, reset per record), have a
    fresh QEMU load the stream, snapshot it while paused: the memory is the same."""
    ram = RamEncoder()
    out = bytearray()
    for rec in parsed.records:
        if isinstance(rec, r.RamPage):
            ram.reset()
            out += ram.page(rec.block, rec.offset, rec.data)
        elif isinstance(rec, r.RamZero):
            ram.reset()
            out += ram.zero(rec.block, rec.offset)
        else:
            out += encode(rec)
    assert len(out) > len(snapshot.data)
    generated = tmp_path / "generated.bin"
    generated.write_bytes(out)
    with _qemu(tmp_path, snapshot.machine, "-S", "-incoming", "defer") as qmp:
        qmp.cmd("migrate-incoming", uri=f"exec:cat {generated}")
        _wait_migration(qmp)
        status = qmp.cmd("query-status")
        assert isinstance(status, dict) and status["status"] == "paused"
        again = _background_snapshot(qmp, tmp_path / "again.bin")
    assert _memory(_parse(again, 1 << 20).records) == _memory(parsed.records)


def test_commands_and_return_path_with_qemu(
    snapshot: Snapshot, parsed: Parsed, tmp_path: Path
) -> None:
    """QEMU accepts OPEN_RETURN_PATH, PING and SWITCHOVER_START as encoded here, and
    its return path (PONG, then SHUT 0 after the load) decodes as expected."""
    recs = list(parsed.records)
    first_device = next(i for i, rec in enumerate(recs) if isinstance(rec, r.DeviceStateStart))
    recs[first_device:first_device] = [r.SwitchoverStart()]
    recs[2:2] = [r.OpenReturnPath(), r.Ping(0x51534E50)]
    stream = tmp_path / "commands.bin"
    stream.write_bytes(b"".join(encode(rec) for rec in recs))
    rp_file = tmp_path / "rp.bin"
    with _qemu(tmp_path, snapshot.machine, "-S", "-incoming", "defer") as qmp:
        qmp.cmd("migrate-incoming", uri=f"exec:cat {stream} & cat > {rp_file}")
        _wait_migration(qmp)
    reader = ReturnPathReader()
    reader.feed(rp_file.read_bytes())
    assert list(reader.messages()) == [rp.Pong(0x51534E50), rp.Shut(0)]
    reader.close()
