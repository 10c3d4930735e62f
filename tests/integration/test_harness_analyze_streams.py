"""QEMU's analyze-migration.py on real background-snapshot streams, and state diffs."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.analyze import (
    AnalyzeError,
    DiffKind,
    analyze_script,
    device_state,
    diff_state,
    find_qemu_source,
    vmstate_description,
)
from qsnap.harness.firmware import write_halt_bios
from qsnap.harness.qemu import find_qemu, probe_background_snapshot
from qsnap.harness.vm import VMFactory

pytestmark = pytest.mark.qemu

TIMER = r'^\["timer \(\d+\)"\]'
"""The timer section holds clock offsets that differ between any two runs."""


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(probe.reason)
    factory = VMFactory(tmp_path, memory_mib=32)
    yield factory
    factory.close()


def snapshot(vms: VMFactory, tmp_path: Path, name: str, rtc_base: str) -> Path:
    """A stream of a halted guest whose RTC starts at `rtc_base` (guest clock: frozen)."""
    bios = write_halt_bios(tmp_path)
    vm = vms(name=name, paused=True, args=["-bios", str(bios), "-rtc", f"base={rtc_base},clock=vm"])
    vm.cont()
    # Stop only once the CPU has reached its HLT: otherwise CPU state differs between runs.
    deadline = time.monotonic() + 30
    while "HLT=1" not in vm.hmp("info registers"):
        assert time.monotonic() < deadline, "the halting BIOS never halted"
        time.sleep(0.01)
    vm.stop()
    stream = tmp_path / f"{name}.stream"
    vm.background_snapshot_to_file(stream, timeout=60)
    vm.shutdown()
    return stream


def test_device_state_of_a_real_stream(vms: VMFactory, tmp_path: Path) -> None:
    stream = snapshot(vms, tmp_path, "one", "2020-01-01T00:00:00")
    state = device_state(stream)
    sections = {key.rsplit(" (", 1)[0] for key in state}
    assert {"ram", "timer", "cpu", "mc146818rtc", "0000:00:02.0/vga", "serial"} <= sections
    desc = vmstate_description(stream)
    assert desc["page_size"] == 4096
    assert "mc146818rtc" in {device["name"] for device in desc["devices"]}
    assert diff_state(state, device_state(stream)) == []

    edited = copy.deepcopy(state)
    rtc = next(key for key in edited if key.startswith("mc146818rtc ("))
    edited[rtc]["base_rtc"] = "0x0000000000000001"
    (difference,) = diff_state(state, edited)
    assert difference.path == (rtc, "base_rtc")
    assert difference.kind is DiffKind.CHANGED
    assert difference.right == "0x0000000000000001"


def test_streams_differing_in_one_property(vms: VMFactory, tmp_path: Path) -> None:
    first = device_state(snapshot(vms, tmp_path, "a", "2020-01-01T00:00:00"))
    same = device_state(snapshot(vms, tmp_path, "b", "2020-01-01T00:00:00"))
    other = device_state(snapshot(vms, tmp_path, "c", "2021-06-15T12:30:00"))

    assert diff_state(first, same, ignore=[TIMER]) == []
    changed = diff_state(first, other, ignore=[TIMER])
    assert changed, "a different RTC base must show in the device state"
    assert {str(d.path[0]).rsplit(" (", 1)[0] for d in changed} == {"mc146818rtc"}
    assert {"cmos_data", "base_rtc"} <= {d.path[1] for d in changed}


def test_unparsable_streams_give_one_short_error(vms: VMFactory, tmp_path: Path) -> None:
    stream = snapshot(vms, tmp_path, "cut", "2020-01-01T00:00:00")
    data = stream.read_bytes()
    truncated = tmp_path / "truncated.stream"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AnalyzeError) as info:
        device_state(truncated)
    assert str(info.value) == (
        f"{truncated}: byte {len(data) // 2}: the device state does not end with EOF "
        f"[+ VMDESCRIPTION] (searched the last {len(data) // 2} bytes): "
        "analyze-migration needs the vmdesc"
    )

    # Header (8) and configuration (1 + 4 + len(machine)), then the RAM START type byte.
    machine_length = int.from_bytes(data[9:13], "big")
    at = 13 + machine_length
    assert data[at] == 0x01
    broken = tmp_path / "broken.stream"
    broken.write_bytes(data[:at] + b"\x09" + data[at + 1 :])
    with pytest.raises(AnalyzeError) as info:
        device_state(broken)
    assert str(info.value) == (
        f"{broken}: analyze-migration failed: Exception: Unknown section type: 9"
    ), "the analyzer's own error line, without the vmdesc dump it appends"


def test_source_tree_discovery(tmp_path: Path) -> None:
    script = analyze_script()
    assert script.name == "analyze-migration.py"
    assert find_qemu_source(script.parents[1]) == script.parents[1]
    with pytest.raises(AnalyzeError, match=r"\(from argument\): no scripts/analyze-migration.py"):
        find_qemu_source(tmp_path)
    with pytest.raises(AnalyzeError, match="not a file"):
        device_state(tmp_path / "missing.stream")
