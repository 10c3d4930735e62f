"""The seed's two-pass save on the patched QEMU (`stream-content-list`), end to end.

A paused guest is saved by two background snapshots into one image: the device state
only (`qsnap save --save-vmstate`), then the RAM only (`qsnap save`), or the other way
round. Every revert of it, precopy and postcopy, into a fresh patched QEMU must give
exactly the memory of the paused guest (every page of every block against a reference
taken from the paused source) and the device state of the vmstate-only stream (QEMU's
analyze-migration); then the guest must run on and check itself (the linux agent, the
pattern guest's sweep rule). One pass alone, or passes of two machine types, must never
make a revertable image.

The running-guest test shows the seed's documented limitation: two passes of a running
guest pair device state of one moment with RAM of a later one, yet the image is complete
(docs/two-pass.md has the measured outcome).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qsnap.harness import analyze, memory, scenario
from qsnap.harness.guests import AgentClient, AgentError, AgentPageHeader, LinuxGuest, PatternGuest
from qsnap.harness.patched_qemu import (
    PatchedQemu,
    PatchedQemuError,
    StreamContent,
    build_patched_qemu,
    set_stream_content,
)
from qsnap.harness.qemu import probe_background_snapshot, probe_postcopy_ram
from qsnap.harness.sweep import check_sweep, first_bytes
from qsnap.harness.vm import VM, MigrationStatus, RunState, VMError, VMFactory
from qsnap.stream import StreamReader
from qsnap.stream import records as r

pytestmark = pytest.mark.qemu
log = logging.getLogger(__name__)

LINUX_MIB = 256
REGION_MIB = 64
WRITER_RATE = 2000
PATTERN_MIB = 128
TIMEOUT = 120.0
STALL_LIMIT = 20.0
QMP_TIMEOUT = 120.0
"""A background snapshot of a busy guest can hold QEMU's monitor for a while here."""


class Order(enum.Enum):
    """Which pass comes first."""

    VMSTATE_FIRST = (StreamContent.VMSTATE, StreamContent.RAM)
    RAM_FIRST = (StreamContent.RAM, StreamContent.VMSTATE)


@dataclass(frozen=True)
class TwoPassImage:
    """A paused guest saved in two passes: the image, what it must hold, the guest."""

    image: Path
    reference: memory.MemoryReference
    vmstate_stream: Path
    guest: str


@pytest.fixture(scope="module")
def patched() -> PatchedQemu:
    try:
        built = build_patched_qemu()
    except PatchedQemuError as exc:
        if "no QEMU source" not in str(exc):
            raise
        pytest.skip(f"the patched QEMU cannot be built here: {exc}")
    for probe in (probe_background_snapshot(built.qemu), probe_postcopy_ram(built.qemu)):
        if not probe:
            pytest.skip(probe.reason)
    return built


@pytest.fixture(scope="module")
def vms(patched: PatchedQemu, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMFactory]:
    factory = VMFactory(tmp_path_factory.mktemp("vms"), qemu=patched.qemu, qmp_timeout=QMP_TIMEOUT)
    yield factory
    factory.close()


def qsnap(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    """The qsnap command, stdin from /dev/null (a revert then has no return path)."""
    return subprocess.run(
        [scenario.qsnap_program(), *args],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=TIMEOUT,
        check=False,
    )


def create_image(path: Path, mib: int) -> None:
    created = qsnap("create", os.fspath(path), "--ram-size", f"{mib}M")
    assert created.returncode == 0, created.stderr


def info(image: Path) -> dict[str, Any]:
    shown = qsnap("info", "--json", os.fspath(image))
    assert shown.returncode == 0, shown.stderr
    result = json.loads(shown.stdout)
    assert isinstance(result, dict)
    return result


def save_pass(
    vm: VM,
    image: Path,
    part: StreamContent,
    keep_stream: Path | None = None,
    refused: bool = False,
) -> tuple[int, str]:
    """One background-snapshot pass of `part` into `exec:qsnap save`: exit status, stderr.

    The save's exit status is waited for (QEMU reports "completed" before the command is
    done); the parameter is reset afterwards so later migrations are whole. `refused`:
    qsnap is expected to stop reading, so QEMU's migration fails.
    """
    options = ["--save-vmstate"] if part is StreamContent.VMSTATE else []
    status = image.with_name(f"{image.name}.{part.value}.status")
    errors = image.with_name(f"{image.name}.{part.value}.stderr")
    status.unlink(missing_ok=True)
    uri = scenario.save_uri(image, *options, keep_stream=keep_stream, exit_status=status)
    set_stream_content(vm, [part])
    try:
        command = uri.removeprefix("exec:")
        uri = f"exec:{{ {command}; }} 2> {shlex.quote(os.fspath(errors))}"
        if refused:
            with pytest.raises(VMError, match="failed"):
                vm.background_snapshot(uri, TIMEOUT)
        else:
            result = vm.background_snapshot(uri, TIMEOUT)
            assert result.status is MigrationStatus.COMPLETED, result
        code = scenario.wait_exit_status(status, TIMEOUT)
    finally:
        set_stream_content(vm, ())
    return code, errors.read_text().strip()


def two_pass_save(vm: VM, image: Path, order: Order, vmstate_stream: Path) -> None:
    """Both passes of a paused `vm`; the vmstate-only stream is kept for analyze-migration."""
    assert vm.runstate() is RunState.PAUSED
    for part in order.value:
        keep = vmstate_stream if part is StreamContent.VMSTATE else None
        code, errors = save_pass(vm, image, part, keep)
        assert code == 0, errors
        assert vm.runstate() is RunState.PAUSED
    shown = info(image)
    assert shown["complete"] is True and shown["missing"] == [], shown


def pattern_source(vms: VMFactory, name: str, machine: str = "pc") -> VM:
    """The pattern guest, sweeping, then paused (a background snapshot needs a VM that ran)."""
    vm = vms.create(name=name, memory_mib=PATTERN_MIB, machine=machine)
    PatternGuest.build().configure(vm)
    vm.launch()
    vm.wait_console(PatternGuest.MARKER.decode(), timeout=TIMEOUT)
    vm.stop()
    return vm


@pytest.fixture(scope="module")
def saved_pattern(vms: VMFactory, tmp_path_factory: pytest.TempPathFactory) -> TwoPassImage:
    tmp = tmp_path_factory.mktemp("pattern")
    image = tmp / "pattern.qcow2"
    create_image(image, PATTERN_MIB)
    vm = pattern_source(vms, "pattern-src")
    reference = memory.take_reference(vm, TIMEOUT)
    two_pass_save(vm, image, Order.VMSTATE_FIRST, tmp / "vmstate.stream")
    vm.shutdown()
    return TwoPassImage(image, reference, tmp / "vmstate.stream", "pattern")


@pytest.fixture(scope="module")
def saved_linux(vms: VMFactory, tmp_path_factory: pytest.TempPathFactory) -> TwoPassImage:
    """The linux guest, paused while its writer ran over the agent's region."""
    tmp = tmp_path_factory.mktemp("linux")
    image = tmp / "linux.qcow2"
    create_image(image, LINUX_MIB)
    vm = vms.create(name="linux-src", memory_mib=LINUX_MIB)
    with LinuxGuest.build().boot(vm, timeout=TIMEOUT) as agent:
        agent.fill(REGION_MIB, seed=0x2BA55)
        agent.writer_start(WRITER_RATE)
        time.sleep(0.5)
        vm.stop()
        reference = memory.take_reference(vm, TIMEOUT)
        two_pass_save(vm, image, Order.VMSTATE_FIRST, tmp / "vmstate.stream")
    vm.shutdown()
    return TwoPassImage(image, reference, tmp / "vmstate.stream", "linux")


def state_without_ram(stream: Path) -> dict[str, Any]:
    """analyze-migration's device state of `stream`, its RAM section left out."""
    state = analyze.device_state(stream)
    return {key: value for key, value in state.items() if not key.startswith("ram (")}


def check_device_state(saved: TwoPassImage, tmp: Path) -> None:
    """The stream a revert sends holds the device state of the vmstate-only stream."""
    sent = tmp / f"{saved.guest}-revert.stream"
    with sent.open("wb") as out:
        reverted = qsnap("revert", os.fspath(saved.image), stdout=out)
    assert reverted.returncode == 0, reverted.stderr
    expected = analyze.device_state(saved.vmstate_stream)
    assert not [key for key in expected if key.startswith("ram (")], sorted(expected)
    assert {"cpu", "apic", "timer"} <= {key.split(" (")[0] for key in expected}, sorted(expected)
    differences = analyze.diff_state(expected, state_without_ram(sent))
    assert differences == [], [str(d) for d in differences[:8]]


def revert_into(vms: VMFactory, saved: TwoPassImage, name: str, postcopy: bool) -> VM:
    """A fresh patched QEMU (-S) loading the image; for linux its agent port is added."""
    mib = LINUX_MIB if saved.guest == "linux" else PATTERN_MIB
    vm = vms.create(name=name, memory_mib=mib, incoming_defer=True, paused=True)
    if saved.guest == "linux":
        assert LinuxGuest.build().configure(vm) == agent_socket(vm)
    else:
        PatternGuest.build().configure(vm)
    vm.launch()
    if postcopy:
        vm.set_migration_capabilities({"postcopy-ram": True})
    options = ("--postcopy",) if postcopy else ()
    vm.migrate_incoming(scenario.revert_uri(saved.image, *options))
    result = vm.wait_migration(TIMEOUT)
    assert result.status is MigrationStatus.COMPLETED, f"{result}\n{vm.diagnostics()}"
    assert vm.runstate() is RunState.PAUSED
    if postcopy:  # a background snapshot (the memory reference) refuses postcopy-ram
        vm.set_migration_capabilities({"postcopy-ram": False})
    return vm


def agent_socket(vm: VM) -> Path:
    return vm.run_dir / f"{LinuxGuest.AGENT_SERIAL}.sock"


def check_runs_on(vm: VM, saved: TwoPassImage, tmp: Path) -> None:
    """After the revert the guest runs and checks itself."""
    if saved.guest == "linux":
        with AgentClient.connect(agent_socket(vm)) as agent:
            agent.send("verify")  # waits on the serial port until the guest runs
            vm.cont()
            verified = agent.parse_verify(agent.answer("verify", timeout=TIMEOUT))
        assert verified.ok and verified.pages == REGION_MIB * 256, verified
        return
    start = vm.console_size()
    vm.cont()
    vm.wait_console(PatternGuest.MARKER.decode() * 2, timeout=TIMEOUT, start=start)
    vm.stop()
    dump = tmp / f"{vm.name}.ram"
    vm.command("pmemsave", val=0, size=PATTERN_MIB << 20, filename=os.fspath(dump))
    swept = PatternGuest.swept_range(PATTERN_MIB)
    values = first_bytes(dump.read_bytes(), swept.start, swept.stop)
    report = check_sweep(values, block="pc.ram", start=swept.start)
    assert report.ok, str(report.violation)


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
@pytest.mark.parametrize("guest", ["pattern", "linux"])
def test_paused_two_pass_reverts_exactly(
    request: pytest.FixtureRequest,
    vms: VMFactory,
    tmp_path: Path,
    guest: str,
    postcopy: bool,
) -> None:
    saved: TwoPassImage = request.getfixturevalue(f"saved_{guest}")
    if not postcopy:
        check_device_state(saved, tmp_path)
    vm = revert_into(vms, saved, f"{guest}-{'post' if postcopy else 'pre'}copy", postcopy)
    diff = memory.compare(saved.reference, memory.take_reference(vm, TIMEOUT, crosscheck=False))
    assert diff.matches, diff.summary()
    assert diff.pages == saved.reference.pages
    check_runs_on(vm, saved, tmp_path)
    vm.shutdown()


def test_ram_pass_first_reverts_the_same(vms: VMFactory, tmp_path: Path) -> None:
    """The reversed order (RAM, then device state) makes the same snapshot."""
    image = tmp_path / "reversed.qcow2"
    create_image(image, PATTERN_MIB)
    vm = pattern_source(vms, "reversed-src")
    reference = memory.take_reference(vm, TIMEOUT)
    two_pass_save(vm, image, Order.RAM_FIRST, tmp_path / "vmstate.stream")
    vm.shutdown()
    saved = TwoPassImage(image, reference, tmp_path / "vmstate.stream", "pattern")
    check_device_state(saved, tmp_path)
    dst = revert_into(vms, saved, "reversed-dst", postcopy=False)
    diff = memory.compare(reference, memory.take_reference(dst, TIMEOUT, crosscheck=False))
    assert diff.matches and diff.pages == reference.pages, diff.summary()
    check_runs_on(dst, saved, tmp_path)
    dst.shutdown()


@pytest.mark.parametrize("part", [StreamContent.VMSTATE, StreamContent.RAM])
def test_one_pass_alone_is_never_reverted(
    vms: VMFactory, tmp_path: Path, part: StreamContent
) -> None:
    image = tmp_path / "half.qcow2"
    create_image(image, PATTERN_MIB)
    vm = pattern_source(vms, f"half-{part.value}-src")
    code, errors = save_pass(vm, image, part)
    vm.shutdown()
    assert code == 0, errors
    missing = "ram" if part is StreamContent.VMSTATE else "vmstate"
    shown = info(image)
    assert shown["complete"] is False and shown["passes"] == [part.value], shown
    assert shown["missing"] == [missing], shown

    sent = tmp_path / "half.stream"
    with sent.open("wb") as out:
        refused = qsnap("revert", os.fspath(image), stdout=out)
    assert refused.returncode != 0
    assert sent.stat().st_size == 0
    lines = refused.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "incomplete" in lines[0] and missing in lines[0], lines

    # Through QEMU too: the destination sees a failed incoming migration, not a guest.
    dst = vms.create(
        name=f"half-{part.value}-dst", memory_mib=PATTERN_MIB, incoming_defer=True, paused=True
    )
    dst.launch()
    dst.command("migrate-incoming", uri=scenario.revert_uri(image), **{"exit-on-error": False})
    result = dst.wait_migration(TIMEOUT)
    assert result.status is MigrationStatus.FAILED, result
    dst.shutdown()


def test_passes_of_two_machine_types_do_not_combine(vms: VMFactory, tmp_path: Path) -> None:
    image = tmp_path / "mixed.qcow2"
    create_image(image, PATTERN_MIB)
    pc = pattern_source(vms, "mixed-pc")
    code, errors = save_pass(pc, image, StreamContent.VMSTATE)
    pc.shutdown()
    assert code == 0, errors
    q35 = pattern_source(vms, "mixed-q35", machine="q35")
    code, errors = save_pass(q35, image, StreamContent.RAM, refused=True)
    q35.shutdown()
    assert code != 0
    assert "does not belong to the saved one" in errors and "q35" in errors, errors
    shown = info(image)
    assert shown["complete"] is False and shown["missing"] == ["ram"], shown
    refused = qsnap("revert", os.fspath(image), stdout=subprocess.DEVNULL)
    assert refused.returncode != 0 and b"incomplete" in refused.stderr


# -- a running guest: two moments ------------------------------------------------------


@dataclass(frozen=True)
class WriterPosition:
    """How far the agent's writer has gone: generation `g`, next page `k`, of `pages`."""

    g: int
    k: int
    pages: int

    @property
    def written(self) -> int:
        """Pages rewritten since the fill: grows by one per page the writer writes."""
        return self.g * self.pages + self.k


def agent_position(agent: AgentClient) -> WriterPosition:
    fields = agent.command("status")
    try:
        return WriterPosition(int(fields["g"]), int(fields["k"]), int(fields["pages"]))
    except (KeyError, ValueError):
        raise AgentError(f"agent: not a status answer: {fields}") from None


def writer_stall(agent: AgentClient) -> float:
    """Host seconds until the writer moves on (`STALL_LIMIT` if it never does).

    The writer is paced by the guest's monotonic clock, so this is how long that clock
    stands still from the guest's point of view.
    """
    first = agent_position(agent).written
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < STALL_LIMIT:
        if agent_position(agent).written != first:
            return round(elapsed, 1)
        time.sleep(0.2)
    return STALL_LIMIT


def region_position(stream: Path, seed: int) -> WriterPosition:
    """The writer's position as the agent's pages in `stream` show it.

    Pages [0, k) hold generation g + 1 and [k, N) generation g: the count of pages of
    the newer generation is k.
    """
    generations: dict[int, int] = {}
    reader = StreamReader()
    with stream.open("rb") as f:
        while chunk := f.read(1 << 20):
            reader.feed(chunk)
            for record in reader.records():
                if isinstance(record, r.RamPage) and record.block == "pc.ram":
                    header = AgentPageHeader.parse(record.data)
                    if header is not None and header.seed == seed:
                        generations[header.index] = header.generation
    reader.close()
    pages = REGION_MIB * 256
    assert sorted(generations) == list(range(pages)), f"{len(generations)} agent pages found"
    low = min(generations.values())
    newer = sum(1 for generation in generations.values() if generation != low)
    assert set(generations.values()) <= {low, low + 1}
    assert all(generations[i] == low + 1 for i in range(newer)), "not one sweep boundary"
    return WriterPosition(low, newer, pages)


def test_running_guest_two_moments(vms: VMFactory, tmp_path: Path) -> None:
    """Two passes of a running guest against one background snapshot of it.

    The single pass is one instant: its region is where the writer stood while the
    snapshot began, and the reverted guest verifies. The two passes are two instants: the
    image's RAM shows the writer past where it stood when the device-state pass had
    ended, yet qsnap reports the image complete (the seed's documented limitation; what
    the reverted guest does is logged, see docs/two-pass.md).
    """
    seed = 0x7110
    single, double = tmp_path / "single.qcow2", tmp_path / "two-pass.qcow2"
    create_image(single, LINUX_MIB)
    create_image(double, LINUX_MIB)
    guest = LinuxGuest.build()
    vm = vms.create(name="running-src", memory_mib=LINUX_MIB)
    with guest.boot(vm, timeout=TIMEOUT) as agent:
        agent.fill(REGION_MIB, seed)
        agent.writer_start(WRITER_RATE)
        time.sleep(0.5)
        before_single = agent_position(agent)
        uri = scenario.save_uri(single, exit_status=tmp_path / "single.status")
        assert vm.background_snapshot(uri, TIMEOUT).ok
        assert scenario.wait_exit_status(tmp_path / "single.status", TIMEOUT) == 0
        after_single = agent_position(agent)

        code, errors = save_pass(vm, double, StreamContent.VMSTATE)
        assert code == 0, errors
        after_vmstate = agent_position(agent)
        vmstate_done = time.monotonic()
        time.sleep(2.0)
        ram_start = time.monotonic()
        code, errors = save_pass(vm, double, StreamContent.RAM)
        assert code == 0, errors
        assert vm.runstate() is RunState.RUNNING
    vm.shutdown()

    shown = info(double)
    assert shown["complete"] is True and shown["missing"] == [], shown
    checked = qsnap("verify", os.fspath(double))
    assert checked.returncode == 0, checked.stderr

    positions = {}
    for name, image in (("single", single), ("two-pass", double)):
        sent = tmp_path / f"{name}.stream"
        with sent.open("wb") as out:
            assert qsnap("revert", os.fspath(image), stdout=out).returncode == 0
        positions[name] = region_position(sent, seed)
    assert before_single.written <= positions["single"].written <= after_single.written
    assert positions["two-pass"].written > after_vmstate.written, (positions, after_vmstate)
    log.info(
        "writer position: single pass %s (status %s..%s); device-state pass ended at %s, "
        "RAM pass (started %.1f s later) shows %s",
        positions["single"].written,
        before_single.written,
        after_single.written,
        after_vmstate.written,
        ram_start - vmstate_done,
        positions["two-pass"].written,
    )

    for name, image in (("single", single), ("two-pass", double)):
        dst = vms.create(
            name=f"running-{name}-dst", memory_mib=LINUX_MIB, incoming_defer=True, paused=True
        )
        socket_path = guest.configure(dst)
        dst.launch()
        with AgentClient.connect(socket_path) as agent:
            dst.migrate_incoming(scenario.revert_uri(image))
            result = dst.wait_migration(TIMEOUT)
            assert result.status is MigrationStatus.COMPLETED, result
            start = dst.console_size()
            agent.send("verify")
            dst.cont()
            answer, stall = "no answer", None
            try:
                answer = agent.answer("verify", timeout=60)
                stall = writer_stall(agent)
            except AgentError as exc:
                answer += f" ({exc})"
            console = dst.console_text(start)
        log.info(
            "%s revert: agent %r; writer still for %s s after verify; console after cont: %r",
            name,
            answer,
            stall,
            console[-2000:],
        )
        if name == "single":
            verified = agent.parse_verify(answer)
            assert verified.ok and verified.pages == REGION_MIB * 256, verified
            assert stall is not None and stall < STALL_LIMIT, stall
        dst.shutdown()
