"""A QEMU virtual machine driven over QMP, for tests: launch, console, commands, migration.

Nothing here may hang a test run: every wait has a timeout, a dead QEMU ends any wait at
once, and every failure message carries QEMU's exit status, the tail of its stderr and the
tail of the guest console, which is usually all one needs to see what went wrong.

Serial ports: ttyS0 is always the console, captured to `console_log`; `add_serial_socket`
and `add_serial_file` add ttyS1, ttyS2, ... in call order, before `launch`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NoReturn, Self

from qsnap.harness.qemu import Accel, accel_from_env, find_qemu
from qsnap.harness.qmp import QMPCommandError, QMPConnectionError, QMPTimeout, SyncQMP

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
"""How much of the console and stderr logs goes into an error message."""


class VMError(Exception):
    """QEMU failed, exited or misbehaved; the message ends with its diagnostics."""


class VMLaunchError(VMError):
    """QEMU did not start or did not answer QMP."""


class VMTimeout(VMError):
    """A wait on the VM (console, event, migration, command) ran out of time."""


class VMCommandError(VMError):
    """QEMU refused a QMP command; `error_class` and `desc` are QEMU's own."""

    def __init__(self, vm: str, error: QMPCommandError) -> None:
        super().__init__(f"{vm}: {error}")
        self.command = error.command
        self.error_class = error.error_class
        self.desc = error.desc


class RunState(enum.StrEnum):
    """QAPI RunState (qapi/run-state.json)."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


class MigrationStatus(enum.StrEnum):
    """QAPI MigrationStatus (qapi/migration.json)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


FINAL_STATUSES = frozenset(
    {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """How a migration ended (or where it was when the wait stopped)."""

    status: MigrationStatus
    error_desc: str | None
    info: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is MigrationStatus.COMPLETED

    def __str__(self) -> str:
        return self.status.value + (f": {self.error_desc}" if self.error_desc else "")


def _opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's key=value option syntax (a comma is doubled)."""
    return os.fspath(value).replace(",", ",,")


def _tail(path: Path, limit: int = TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return ("..." if size > limit else "") + text


class VM:
    """One QEMU process. Configure with the constructor (and `add_*`), then `launch`.

    `log_dir` keeps the console and stderr logs (a test's tmp_path); without it they live
    in the private run directory, which is removed by `shutdown`. The QMP and serial
    sockets always live in a short private directory (unix socket paths are limited to
    108 bytes, test directories can be longer).
    """

    def __init__(
        self,
        *,
        qemu: str | os.PathLike[str] | None = None,
        machine: str = "pc",
        memory_mib: int = 128,
        smp: int = 1,
        accel: str | Accel | None = None,
        args: Sequence[str] = (),
        incoming_defer: bool = False,
        paused: bool = False,
        firmware_console: bool = False,
        name: str = "vm",
        log_dir: str | os.PathLike[str] | None = None,
        qmp_timeout: float = 30.0,
    ) -> None:
        """`paused` is `-S` (run state prelaunch), `incoming_defer` is `-incoming defer`
        (then `migrate_incoming`), `firmware_console` makes SeaBIOS print on ttyS0 too
        (progress without any OS), `args` are appended to the command line as given."""
        self.name = name
        self.binary = find_qemu(qemu)
        self.machine = machine
        self.memory_mib = memory_mib
        self.accel = accel_from_env(accel)
        self.qmp_timeout = qmp_timeout
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"qsnap-{name}-"))
        self.log_dir = Path(log_dir) if log_dir is not None else self.run_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.log_dir / f"{name}-console.log"
        self.stderr_log = self.log_dir / f"{name}-stderr.log"
        self.qmp_socket = self.run_dir / "qmp.sock"
        self._serial_args: list[str] = []
        self._extra: list[str] = list(args)
        self._head = [
            "-name", name,
            "-machine", machine,
            "-accel", self.accel.value,
            "-m", f"{memory_mib}M",
            "-smp", str(smp),
            "-display", "none",
            "-nic", "none",
            "-monitor", "none",
            "-parallel", "none",
        ]  # fmt: skip
        if paused:
            self._head.append("-S")
        if incoming_defer:
            self._head += ["-incoming", "defer"]
        if firmware_console:
            port = self.run_dir / "sercon-port"
            port.write_bytes((0x3F8).to_bytes(2, "little"))
            self._head += ["-fw_cfg", f"name=etc/sercon-port,file={_opt(port)}"]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._qmp: SyncQMP | None = None
        self._closed = False

    # -- configuration, before launch --------------------------------------------------

    def add_args(self, *args: str) -> None:
        """Append QEMU command-line arguments."""
        self._check_not_launched()
        self._extra.extend(args)

    def add_serial_socket(self, name: str) -> Path:
        """Add the next serial port as a unix socket (QEMU listens); returns its path."""
        path = self.run_dir / f"{name}.sock"
        self._add_serial(name, f"socket,id={name},path={_opt(path)},server=on,wait=off")
        return path

    def add_serial_file(self, name: str) -> Path:
        """Add the next serial port, its output captured to a file; returns its path."""
        path = self.log_dir / f"{self.name}-{name}.log"
        self._add_serial(name, f"file,id={name},path={_opt(path)}")
        return path

    def _add_serial(self, name: str, chardev: str) -> None:
        self._check_not_launched()
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or name in ("qmp", "console"):
            raise ValueError(f"serial name {name!r} is not a free chardev id")
        self._serial_args += ["-chardev", chardev, "-serial", f"chardev:{name}"]

    def _check_not_launched(self) -> None:
        if self._proc is not None:
            raise RuntimeError(f"{self.name}: already launched")

    @property
    def argv(self) -> list[str]:
        """The full QEMU command line."""
        return [
            os.fspath(self.binary),
            *self._head,
            "-chardev", f"socket,id=qmp,path={_opt(self.qmp_socket)},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"file,id=console,path={_opt(self.console_log)}",
            "-serial", "chardev:console",
            *self._serial_args,
            *self._extra,
        ]  # fmt: skip

    # -- life cycle ----------------------------------------------------------------------

    def launch(self, timeout: float = 30.0) -> Self:
        """Start QEMU and connect QMP; raise `VMLaunchError` with diagnostics on failure."""
        self._check_not_launched()
        argv = self.argv
        log.info("%s: launching %s", self.name, " ".join(argv))
        self._stderr = self.stderr_log.open("wb")
        # A session of its own, so that kill() also reaches exec: migration children.
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_resources()
            raise VMLaunchError(f"{self.name}: cannot run {self.binary}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while True:
            if self.exitcode is not None:
                self._fail_launch("QEMU exited during start-up")
            if self.qmp_socket.exists():
                qmp = SyncQMP(self.name)
                try:
                    qmp.connect(os.fspath(self.qmp_socket), max(1.0, deadline - time.monotonic()))
                except (QMPTimeout, QMPConnectionError) as exc:
                    # QEMU binds the socket before it listens: refused for a moment.
                    qmp.close()
                    error = exc
                else:
                    self._qmp = qmp
                    return self
            if time.monotonic() > deadline:
                cause = f": {error}" if error is not None else ""
                self._fail_launch(f"no QMP connection within {timeout:g} s{cause}")
            time.sleep(0.02)

    def _fail_launch(self, what: str) -> NoReturn:
        message = f"{self.name}: {what}"
        self.kill()
        diagnostics = self.diagnostics()
        self._close_resources()
        raise VMLaunchError(f"{message}\n{diagnostics}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """Whether the QEMU process exists and has not exited."""
        return self._proc is not None and self.exitcode is None

    @property
    def exitcode(self) -> int | None:
        """QEMU's exit status (negative: killed by that signal), None while it runs.

        An exited QEMU is not reaped here: as long as it is an unreaped zombie, its pid,
        which is also the id of its process group, cannot be reused, so `_reap` can kill
        what is left of the group (exec: migration children) without reaching anyone else.
        """
        if self._proc is None:
            return None
        if self._proc.returncode is not None:
            return self._proc.returncode
        info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None or info.si_pid == 0:
            return None
        if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            return -info.si_status
        return info.si_status

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """Quit QEMU (QMP `quit`), kill it if it does not exit in time, release everything.

        Processes QEMU started (exec: migration commands) are killed too. Safe to call
        more than once and after a failure. Returns QEMU's exit status.
        """
        if self._closed:
            return self.exitcode
        if self.is_running() and self._qmp is not None:
            try:
                self._qmp.execute("quit", timeout=min(timeout, 5.0))
            except (QMPCommandError, QMPConnectionError, QMPTimeout) as exc:
                log.debug("%s: quit: %s", self.name, exc)
        deadline = time.monotonic() + timeout
        while self.is_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.is_running():
            log.warning("%s: QEMU did not quit within %g s, killing it", self.name, timeout)
        self._reap()
        status = self.exitcode
        self._close_resources()
        return status

    def kill(self) -> None:
        """SIGKILL QEMU and the processes it started, and reap it."""
        self._reap()

    def _reap(self) -> None:
        """SIGKILL QEMU's process group (QEMU itself if still running), then reap QEMU."""
        if self._proc is None or self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        try:
            self._proc.wait(10.0)
        except subprocess.TimeoutExpired:
            log.error("%s: QEMU pid %d survives SIGKILL", self.name, self._proc.pid)

    def _close_resources(self) -> None:
        self._closed = True
        if self._qmp is not None:
            self._qmp.close()
        if self._stderr is not None:
            self._stderr.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- diagnostics and console --------------------------------------------------------

    def diagnostics(self) -> str:
        """Exit status, stderr tail and console tail, for error messages."""
        status = self.exitcode
        state = "running" if status is None else f"exited with status {status}"
        return (
            f"QEMU {state}\n"
            f"--- stderr ({self.stderr_log}) ---\n{_tail(self.stderr_log)}\n"
            f"--- console ({self.console_log}) ---\n{_tail(self.console_log)}"
        )

    def console_text(self, start: int = 0) -> str:
        """The console log from byte `start` on, decoded leniently."""
        try:
            with self.console_log.open("rb") as f:
                f.seek(start)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def console_size(self) -> int:
        """Current size of the console log: pass it as `start` to wait for new output."""
        try:
            return self.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_console(
        self, pattern: str | re.Pattern[str], timeout: float, start: int = 0
    ) -> re.Match[str]:
        """Wait until the console log (from byte `start`) contains `pattern`.

        A `str` is matched literally, a compiled pattern as a regular expression.
        """
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        shown = pattern if isinstance(pattern, str) else pattern.pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.is_running()
            found = regex.search(self.console_text(start))
            if found is not None:
                return found
            if exited:
                raise VMError(
                    f"{self.name}: QEMU exited before console showed {shown!r}\n"
                    + self.diagnostics()
                )
            if time.monotonic() > deadline:
                raise VMTimeout(
                    f"{self.name}: console did not show {shown!r} within {timeout:g} s\n"
                    + self.diagnostics()
                )
            time.sleep(0.05)

    # -- QMP -----------------------------------------------------------------------------

    def command(self, command: str, /, **arguments: object) -> Any:
        """Run a QMP command; arguments whose QAPI names have dashes go in `**{...}`."""
        return self.command_args(command, arguments)

    def command_args(
        self, name: str, arguments: Mapping[str, object], timeout: float | None = None
    ) -> Any:
        """Run QMP command `name` with an argument mapping (QAPI names with dashes)."""
        qmp = self._connected()
        try:
            return qmp.execute(name, arguments, timeout or self.qmp_timeout)
        except QMPCommandError as exc:
            raise VMCommandError(self.name, exc) from None
        except QMPTimeout as exc:
            raise VMTimeout(f"{self.name}: {exc}\n{self.diagnostics()}") from None
        except QMPConnectionError as exc:
            raise VMError(f"{self.name}: {exc}\n{self.diagnostics()}") from None

    def hmp(self, command_line: str, timeout: float | None = None) -> str:
        """Run a human monitor command; return its output."""
        result = self.command_args("human-monitor-command", {"command-line": command_line}, timeout)
        return str(result)

    def _connected(self) -> SyncQMP:
        if self._qmp is None or self._closed:
            raise VMError(f"{self.name}: not launched")
        return self._qmp

    def wait_event(
        self, name: str, timeout: float, match: Mapping[str, object] | None = None
    ) -> dict[str, Any]:
        """Consume and return the oldest event `name` (its data containing `match`).

        Events are recorded from launch on, so an event that came before the call counts.
        """
        try:
            return self._connected().wait_event(name, timeout, match, self.is_running)
        except QMPTimeout as exc:
            raise VMTimeout(f"{self.name}: {exc}\n{self.diagnostics()}") from None
        except QMPConnectionError as exc:
            raise VMError(f"{self.name}: {exc}\n{self.diagnostics()}") from None

    def events(self) -> list[dict[str, Any]]:
        """Events received and not consumed yet, oldest first."""
        return self._connected().events()

    def clear_events(self) -> None:
        self._connected().clear_events()

    def runstate(self) -> RunState:
        """The VM run state (`query-status`)."""
        return RunState(self.command("query-status")["status"])

    def wait_runstate(
        self, states: RunState | Iterable[RunState], timeout: float, poll: float = 0.05
    ) -> RunState:
        """Poll `query-status` until the run state is one of `states`; return it."""
        wanted = frozenset({states} if isinstance(states, RunState) else states)
        deadline = time.monotonic() + timeout
        while (state := self.runstate()) not in wanted:
            if time.monotonic() > deadline:
                names = ", ".join(sorted(s.value for s in wanted))
                raise VMTimeout(
                    f"{self.name}: run state still {state.value}, not {names}, "
                    f"after {timeout:g} s\n{self.diagnostics()}"
                )
            time.sleep(poll)
        return state

    def stop(self) -> None:
        self.command("stop")

    def cont(self) -> None:
        self.command("cont")

    # -- migration -----------------------------------------------------------------------

    def migration_capabilities(self) -> dict[str, bool]:
        """Every migration capability QEMU knows, with its current state."""
        reply = self.command("query-migrate-capabilities")
        return {c["capability"]: bool(c["state"]) for c in reply}

    def set_migration_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        """Set capabilities by QAPI name, e.g. `{"background-snapshot": True}`."""
        self.command(
            "migrate-set-capabilities",
            capabilities=[{"capability": k, "state": v} for k, v in capabilities.items()],
        )

    def migration_parameters(self) -> dict[str, Any]:
        return dict(self.command("query-migrate-parameters"))

    def set_migration_parameters(self, parameters: Mapping[str, object]) -> None:
        """Set parameters by QAPI name, e.g. `{"max-bandwidth": 1 << 30}`."""
        self.command_args("migrate-set-parameters", parameters)

    def migrate(self, uri: str) -> None:
        """Start an outgoing migration to `uri`; see `wait_migration`."""
        self.command("migrate", uri=uri)

    def migrate_incoming(self, uri: str) -> None:
        """Start the incoming migration of a VM launched with `incoming_defer=True`."""
        self.command("migrate-incoming", uri=uri)

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.command("query-migrate"))

    def wait_migration(
        self,
        timeout: float,
        until: Iterable[MigrationStatus] = FINAL_STATUSES,
        poll: float = 0.05,
    ) -> MigrationResult:
        """Poll `query-migrate` until the status is one of `until` (by default: final).

        Works on both sides. Returns the status with QEMU's error-desc when it failed;
        raises `VMTimeout` (with the last status) when time runs out.
        """
        wanted = frozenset(until)
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            status = MigrationStatus(info.get("status", "none"))
            if status in wanted:
                return MigrationResult(status, info.get("error-desc"), info)
            if time.monotonic() > deadline:
                raise VMTimeout(
                    f"{self.name}: migration still {status.value} after {timeout:g} s\n"
                    + self.diagnostics()
                )
            time.sleep(poll)

    def await_migration_event(
        self, timeout: float, until: Iterable[MigrationStatus] = FINAL_STATUSES
    ) -> MigrationResult:
        """Wait for a MIGRATION event whose status is one of `until` (by default: final).

        Needs the `events` capability set before the migration starts.  Unlike
        `wait_migration` it costs nothing while waiting, and it knows the moment QEMU
        changed state: what a benchmark wants, since polling `query-migrate` takes CPU
        from the QEMU being measured.
        """
        wanted = frozenset(until)
        deadline = time.monotonic() + timeout
        while True:
            event = self.wait_event("MIGRATION", max(deadline - time.monotonic(), 0.0))
            status = MigrationStatus(event.get("data", {}).get("status", "none"))
            if status in wanted:
                info = self.query_migrate()
                return MigrationResult(status, info.get("error-desc"), info)

    def background_snapshot(self, uri: str, timeout: float) -> MigrationResult:
        """Migrate with the background-snapshot capability to `uri` and wait for the end.

        Unlike a plain migration, the VM keeps (or returns to) its run state afterwards, so
        it can be snapshotted again; this checks that it did. The capability is restored
        to its previous value. Raises `VMError` with QEMU's error-desc on failure.
        """
        before = self.runstate()
        had = self.migration_capabilities().get("background-snapshot")
        if had is None:
            raise VMError(f"{self.name}: QEMU has no background-snapshot capability")
        if not had:
            self.set_migration_capabilities({"background-snapshot": True})
        try:
            self.migrate(uri)
            result = self.wait_migration(timeout)
        except VMTimeout:
            with contextlib.suppress(VMError):
                self.command("migrate_cancel")
            raise
        finally:
            if not had and self.is_running():
                try:
                    self.set_migration_capabilities({"background-snapshot": False})
                except VMError as exc:
                    log.warning("%s: background-snapshot not reset: %s", self.name, exc)
        if not result.ok:
            raise VMError(f"{self.name}: background snapshot to {uri}: {result}")
        after = self.runstate()
        if after is not before:
            raise VMError(
                f"{self.name}: run state {before.value} became {after.value} "
                "after a background snapshot"
            )
        return result

    def background_snapshot_to_file(
        self, path: str | os.PathLike[str], timeout: float
    ) -> MigrationResult:
        """`background_snapshot` into a file, through `exec:cat`.

        QEMU reports "completed" when it has written the stream to the pipe, not when the
        command has finished writing the file. So `cat` writes `PATH.part`, renamed to
        PATH once complete, and this waits for PATH: a reader never sees a cut stream.
        """
        final = Path(path)
        part = final.with_name(final.name + ".part")
        final.unlink(missing_ok=True)
        target, staging = shlex.quote(os.fspath(final)), shlex.quote(os.fspath(part))
        result = self.background_snapshot(f"exec:cat > {staging} && mv {staging} {target}", timeout)
        deadline = time.monotonic() + timeout
        while not final.exists():
            if time.monotonic() > deadline:
                raise VMTimeout(f"{self.name}: {final} not complete {timeout:g} s after migration")
            time.sleep(0.01)
        return result


def launch_vm(**kwargs: Any) -> VM:
    """Create and launch a `VM` (keyword arguments as for `VM`)."""
    return VM(**kwargs).launch()


class VMFactory:
    """Makes VMs whose logs go to one directory and shuts them all down at the end.

    Meant to back a pytest fixture: `factory = VMFactory(tmp_path); yield factory;
    factory.close()`. Names default to vm0, vm1, ... so logs do not collide.
    """

    def __init__(self, log_dir: str | os.PathLike[str], **defaults: Any) -> None:
        self.log_dir = Path(log_dir)
        self.defaults = defaults
        self.vms: list[VM] = []

    def create(self, **kwargs: Any) -> VM:
        """A configured VM, not launched yet (to add serial ports or arguments first)."""
        options = {**self.defaults, **kwargs}
        options.setdefault("name", f"vm{len(self.vms)}")
        options.setdefault("log_dir", self.log_dir)
        if any(vm.name == options["name"] for vm in self.vms):
            raise ValueError(f"a VM named {options['name']!r} exists: its logs would be lost")
        vm = VM(**options)
        self.vms.append(vm)
        return vm

    def __call__(self, **kwargs: Any) -> VM:
        """A launched VM."""
        return self.create(**kwargs).launch()

    def close(self) -> None:
        for vm in reversed(self.vms):
            try:
                vm.shutdown()
            except Exception:
                log.exception("%s: shutdown failed", vm.name)
