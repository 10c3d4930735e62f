"""The VM class against real QEMU: launch, QMP, events, console, migration, shutdown."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_helpers import gone

from qsnap.harness.qemu import find_qemu, probe_background_snapshot, qemu_version
from qsnap.harness.vm import (
    VM,
    MigrationStatus,
    RunState,
    VMCommandError,
    VMError,
    VMFactory,
    VMLaunchError,
    VMTimeout,
    launch_vm,
)

pytestmark = pytest.mark.qemu

QEVM = b"QEVM\x00\x00\x00\x03"


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    factory = VMFactory(tmp_path, memory_mib=64)
    yield factory
    factory.close()


@pytest.fixture
def snapshots() -> None:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(probe.reason)


def test_boots_answers_qmp_and_reports_events(vms: VMFactory) -> None:
    vm = vms(firmware_console=True)
    version = vm.command("query-version")["qemu"]
    expected = qemu_version(find_qemu())
    assert (version["major"], version["minor"], version["micro"]) == (
        expected.major,
        expected.minor,
        expected.micro,
    )
    assert vm.wait_console("SeaBIOS (version", timeout=30).group() == "SeaBIOS (version"
    assert vm.runstate() is RunState.RUNNING
    vm.stop()
    assert vm.wait_event("STOP", timeout=10)["event"] == "STOP"
    assert vm.runstate() is RunState.PAUSED
    vm.cont()
    assert vm.wait_event("RESUME", timeout=10)["event"] == "RESUME"
    assert vm.hmp("info status").strip() == "VM status: running"
    assert vm.shutdown() == 0
    assert not vm.is_running()
    assert "SeaBIOS" in vm.console_log.read_text(errors="replace")


def test_launch_options_give_their_run_states(vms: VMFactory) -> None:
    assert vms(paused=True).runstate() is RunState.PRELAUNCH
    assert vms(incoming_defer=True).runstate() is RunState.INMIGRATE


def test_launch_failure_names_the_cause(vms: VMFactory) -> None:
    start = time.monotonic()
    with pytest.raises(VMLaunchError, match=r"(?s)exited during start-up.*no-such-device"):
        vms(args=["-device", "no-such-device"])
    assert time.monotonic() - start < 20


def test_console_wait_times_out_quickly_with_the_console_tail(vms: VMFactory) -> None:
    vm = vms(firmware_console=True)
    vm.wait_console("SeaBIOS", timeout=30)
    start = time.monotonic()
    with pytest.raises(VMTimeout, match=r"(?s)did not show 'never here' within 0\.5 s.*SeaBIOS"):
        vm.wait_console("never here", timeout=0.5)
    assert time.monotonic() - start < 5


def test_event_wait_times_out(vms: VMFactory) -> None:
    vm = vms()
    with pytest.raises(VMTimeout, match=r"event NO_SUCH_EVENT not seen within 0\.3 s"):
        vm.wait_event("NO_SUCH_EVENT", timeout=0.3)


def test_dead_qemu_ends_waits_at_once(vms: VMFactory) -> None:
    vm = vms()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(VMError, match=r"(?s)QEMU exited before console showed.*status -9"):
        vm.wait_console("anything", timeout=60)
    with pytest.raises(VMError, match="QEMU exited"):
        vm.wait_event("STOP", timeout=60)
    assert time.monotonic() - start < 10


def test_shutdown_kills_a_qemu_that_does_not_answer(vms: VMFactory) -> None:
    vm = vms()
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGSTOP)
    start = time.monotonic()
    assert vm.shutdown(timeout=1) == -signal.SIGKILL
    assert time.monotonic() - start < 15
    assert not vm.is_running()


def test_background_snapshot_keeps_the_run_state(
    vms: VMFactory, tmp_path: Path, snapshots: None
) -> None:
    vm = vms()
    for expected in (RunState.RUNNING, RunState.PAUSED):
        if expected is RunState.PAUSED:
            vm.stop()
        stream = tmp_path / f"{expected.value}.stream"
        result = vm.background_snapshot_to_file(stream, timeout=120)
        assert result.status is MigrationStatus.COMPLETED
        assert result.error_desc is None
        assert vm.runstate() is expected
        assert stream.read_bytes()[:8] == QEVM
    assert vm.migration_capabilities()["background-snapshot"] is False


def test_failed_migration_gives_qemu_error_desc(vms: VMFactory) -> None:
    vm = vms()
    vm.stop()
    vm.migrate("exec:exit 1")
    result = vm.wait_migration(timeout=60)
    assert result.status is MigrationStatus.FAILED
    assert not result.ok
    assert result.error_desc
    assert str(result) == f"failed: {result.error_desc}"
    assert vm.runstate() is RunState.PAUSED


def test_refused_migration_command_gives_qemu_error(vms: VMFactory) -> None:
    vm = vms()
    with pytest.raises(VMCommandError, match="unknown migration protocol: bogus:x") as info:
        vm.migrate("bogus:x")
    assert info.value.error_class == "GenericError"
    assert vm.query_migrate().get("status", "none") == "none"


def test_plain_migration_into_an_incoming_vm(vms: VMFactory, tmp_path: Path) -> None:
    stream = tmp_path / "plain.stream"
    source = vms(name="source")
    source.stop()
    source.migrate(f"exec:cat > {stream}")
    assert source.wait_migration(timeout=120).ok
    assert source.runstate() is RunState.POSTMIGRATE
    target = vms(name="target", incoming_defer=True)
    target.migrate_incoming(f"exec:cat {stream}")
    assert target.wait_migration(timeout=120).status is MigrationStatus.COMPLETED
    assert target.runstate() is RunState.PAUSED
    with pytest.raises(VMTimeout, match=r"run state still paused, not running, after 0\.2 s"):
        target.wait_runstate(RunState.RUNNING, timeout=0.2)
    target.cont()
    assert target.wait_runstate(RunState.RUNNING, timeout=10) is RunState.RUNNING


def test_serial_ports_after_the_console(vms: VMFactory) -> None:
    vm = vms.create(name="serials")
    socket_path = vm.add_serial_socket("agent")
    file_path = vm.add_serial_file("extra")
    assert re.search(
        r"-serial chardev:console -chardev socket,id=agent,.*-serial chardev:agent"
        r" -chardev file,id=extra,.*-serial chardev:extra",
        " ".join(vm.argv),
    )
    vm.launch()
    assert socket_path.is_socket()
    assert file_path.exists()
    with pytest.raises(RuntimeError, match="already launched"):
        vm.add_serial_file("late")


def test_factory_refuses_a_second_vm_of_the_same_name(vms: VMFactory) -> None:
    vms.create(name="twin")
    with pytest.raises(ValueError, match="a VM named 'twin' exists"):
        vms.create(name="twin")


def test_context_manager_shuts_down(tmp_path: Path) -> None:
    with VM(log_dir=tmp_path, memory_mib=32) as vm:
        assert vm.is_running()
    assert vm.exitcode == 0
    with launch_vm(log_dir=tmp_path, memory_mib=32, name="launched") as launched:
        assert launched.runstate() is RunState.RUNNING
    assert launched.exitcode == 0
    with pytest.raises(VMError, match="not launched"):
        vm.runstate()


def test_stuck_migration_times_out_and_shutdown_ends_everything(
    vms: VMFactory, tmp_path: Path
) -> None:
    vm = vms()
    vm.stop()
    pid_file = tmp_path / "child.pid"
    # The command never reads: the pipe fills and the migration stalls.
    vm.migrate(f"exec:echo $$ > {pid_file}; exec sleep 600")
    start = time.monotonic()
    with pytest.raises(VMTimeout, match=r"migration still (active|setup) after 1 s"):
        vm.wait_migration(timeout=1)
    assert time.monotonic() - start < 10
    child = int(pid_file.read_text())
    assert not gone(child, timeout=0), "the migration command should still be running"
    vm.shutdown(timeout=3)
    assert not vm.is_running()
    assert gone(child), "shutdown left QEMU's migration command running"
    assert time.monotonic() - start < 40
