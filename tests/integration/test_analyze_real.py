"""`qsnap analyze` on real background-snapshot streams of the pattern guest."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.guests import PatternGuest
from qsnap.harness.qemu import find_qemu, probe_background_snapshot
from qsnap.harness.vm import VMFactory

pytestmark = pytest.mark.qemu

QSNAP = str(Path(sys.executable).with_name("qsnap"))
MEMORY_MIB = 64


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, int]]]:
    """A snapshot of the sweeping guest, and QEMU's own list of its RAM blocks."""
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(probe.reason)
    tmp = tmp_path_factory.mktemp("analyze")
    vms = VMFactory(tmp, memory_mib=MEMORY_MIB)
    try:
        vm = vms.create(name="pattern")
        PatternGuest.build().configure(vm)
        vm.launch()
        vm.wait_console(PatternGuest.MARKER.decode(), timeout=60)
        path = tmp / "pattern.stream"
        vm.background_snapshot_to_file(path, timeout=120)
        yield path, vm.command("query-memory-size-summary")
    finally:
        vms.close()


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [QSNAP, "analyze", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_every_page_once_and_the_device_state_found(stream: tuple[Path, dict[str, int]]) -> None:
    path, memory = stream
    done = analyze("--json", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    summary = json.loads(done.stdout)
    assert summary["complete"] is True
    assert summary["machine_type"].startswith("pc-i440fx-")
    blocks = {b["idstr"]: b for b in summary["blocks"]}
    assert blocks["pc.ram"]["used_length"] == memory["base-memory"] == MEMORY_MIB << 20
    assert {"pc.bios", "pc.rom", "0000:00:02.0/vga.vram"} <= blocks.keys()
    for block in blocks.values():
        pages = block["used_length"] // 4096
        assert block["data_pages"] + block["zero_pages"] == pages, block
        assert (block["missing_pages"], block["repeated_pages"]) == (0, 0), block
    # The guest sweeps every page above 1 MiB: all of them hold data.
    assert blocks["pc.ram"]["data_pages"] >= ((MEMORY_MIB - 1) << 20) // 4096
    assert summary["device_state_offset"] < summary["eof_offset"] < path.stat().st_size
    assert summary["vmdesc_length"] == path.stat().st_size - summary["eof_offset"] - 6
    devices = {d.split("/")[0] for d in summary["devices"]}
    assert {"timer", "cpu", "mc146818rtc", "serial"} <= devices


def test_a_cut_stream_names_the_byte_and_the_missing_pages(
    stream: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, _ = stream
    cut = tmp_path / "cut.stream"
    cut.write_bytes(path.read_bytes()[: 5 << 20])
    done = analyze(str(cut))
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"qsnap analyze: error: {cut}: byte {5 << 20}: stream truncated")
    missing = [line for line in done.stdout.splitlines() if "block pc.ram:" in line]
    assert missing and " 0 missing" not in missing[0], done.stdout
