"""Finding the QEMU programs and probing what the host and the binary support.

Tests must skip, with a reason that says what is missing, rather than fail or pass when a
feature is unavailable; every probe therefore returns a `Probe` carrying that reason.
Probes start the real binary (QMP over stdio, `-machine none` or a tiny `pc`), because
only QEMU knows whether it accepts a capability on this host.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 30.0
"""Seconds a probe's QEMU may take; generous because CI machines are shared and slow."""


class QemuNotFound(Exception):
    """A QEMU program could not be found, or is not executable."""


class QemuProbeError(Exception):
    """A probe could not talk to QEMU at all (as opposed to a feature being absent)."""


class Program(enum.Enum):
    """The QEMU programs the harness runs, with their environment override and name."""

    SYSTEM = ("QSNAP_QEMU", "qemu-system-x86_64")
    IMG = ("QSNAP_QEMU_IMG", "qemu-img")
    STORAGE_DAEMON = ("QSNAP_QSD", "qemu-storage-daemon")

    @property
    def env_var(self) -> str:
        return self.value[0]

    @property
    def default_name(self) -> str:
        return self.value[1]


class Accel(enum.StrEnum):
    """Accelerators the harness knows. TCG is the default: see `accel_from_env`."""

    TCG = "tcg"
    KVM = "kvm"


def find_program(
    program: Program,
    explicit: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Locate `program`: the explicit path, else its environment variable, else PATH.

    An explicit or environment value may be a path or a bare name looked up in PATH.
    """
    environ = os.environ if env is None else env
    origin = "argument"
    wanted: str | None = os.fspath(explicit) if explicit is not None else None
    if wanted is None and environ.get(program.env_var):
        wanted = environ[program.env_var]
        origin = program.env_var
    if wanted is None:
        wanted = program.default_name
        origin = "PATH"
    found = shutil.which(wanted, path=environ.get("PATH", os.defpath))
    if found is None:
        raise QemuNotFound(f"{program.default_name}: {wanted!r} (from {origin}) not found")
    return Path(found).resolve()


def find_qemu(explicit: str | os.PathLike[str] | None = None) -> Path:
    """qemu-system-x86_64 from `explicit`, `QSNAP_QEMU`, else PATH."""
    return find_program(Program.SYSTEM, explicit)


def find_qemu_img(explicit: str | os.PathLike[str] | None = None) -> Path:
    """qemu-img from `explicit`, `QSNAP_QEMU_IMG`, else PATH."""
    return find_program(Program.IMG, explicit)


def find_storage_daemon(explicit: str | os.PathLike[str] | None = None) -> Path:
    """qemu-storage-daemon from `explicit`, `QSNAP_QSD`, else PATH."""
    return find_program(Program.STORAGE_DAEMON, explicit)


def accel_from_env(accel: str | Accel | None = None, env: Mapping[str, str] | None = None) -> Accel:
    """The accelerator asked for by `accel`, else `QSNAP_ACCEL`, else TCG.

    KVM is never chosen because /dev/kvm exists: nested KVM without hardware paging help
    is far slower than TCG on the machines this runs on (see the environment notes).
    """
    environ = os.environ if env is None else env
    wanted = accel if accel is not None else environ.get("QSNAP_ACCEL") or Accel.TCG
    try:
        return Accel(str(wanted).lower())
    except ValueError:
        known = ", ".join(a.value for a in Accel)
        raise ValueError(f"accelerator {wanted!r} unknown (known: {known})") from None


@dataclass(frozen=True, slots=True, order=True)
class QemuVersion:
    """A QEMU version as printed by `--version`; ordered by (major, minor, micro)."""

    major: int
    minor: int
    micro: int
    package: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        """Parse the first line of `qemu-* --version` output."""
        first = text.strip().splitlines()[0] if text.strip() else ""
        match = _VERSION.search(first)
        if match is None:
            raise ValueError(f"no QEMU version in {first!r}")
        major, minor, micro, package = match.groups()
        return cls(int(major), int(minor), int(micro or 0), package or "")

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


_VERSION = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?(?:\s*\(([^)]*)\))?")


@functools.cache
def qemu_version(binary: Path) -> QemuVersion:
    """The version of any QEMU program (system emulator, qemu-img, qemu-storage-daemon)."""
    out = _run([os.fspath(binary), "--version"], what=f"{binary} --version")
    return QemuVersion.parse(out)


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a feature is usable; `reason` says why not (a pytest skip reason)."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


_NR_USERFAULTFD_X86_64 = 323


def userfaultfd_available() -> Probe:
    """Whether this process can create a userfaultfd, the way QEMU tries it.

    QEMU opens /dev/userfaultfd first, then falls back to the userfaultfd(2) syscall,
    which needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1. Background snapshots
    (write protection) and postcopy (missing-page faults) both depend on it.
    """
    try:
        fd = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        dev_error = f"/dev/userfaultfd: {exc.strerror}"
    else:
        os.close(fd)
        return Probe(True)
    if os.uname().machine != "x86_64":
        return Probe(False, f"userfaultfd unavailable ({dev_error}; syscall not probed)")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_NR_USERFAULTFD_X86_64, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd >= 0:
        os.close(fd)
        return Probe(True)
    err = ctypes.get_errno()
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    setting = sysctl.read_text().strip() if sysctl.exists() else "absent"
    return Probe(
        False,
        f"userfaultfd unavailable ({dev_error}; syscall: {errno.errorcode.get(err, err)}, "
        f"vm.unprivileged_userfaultfd={setting})",
    )


def qmp_stdio(
    binary: Path,
    qemu_args: Sequence[str],
    commands: Sequence[Mapping[str, Any]],
    timeout: float = PROBE_TIMEOUT,
) -> list[dict[str, Any]]:
    """Run QEMU with QMP on stdio, send `commands` then quit, return their responses.

    Meant for probes: one short-lived process, no sockets, no event loop. Responses are in
    command order; each is the raw `{"return": ...}` or `{"error": ...}` object.
    """
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    argv = [os.fspath(binary), "-nodefaults", "-display", "none", *qemu_args, "-qmp", "stdio"]
    out = _run(argv, what=f"{binary.name} probe", stdin=stdin, timeout=timeout)
    replies: list[dict[str, Any]] = []
    for line in out.splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(message, dict) and ("return" in message or "error" in message):
            replies.append(message)
    # The reply to quit may be lost when QEMU exits first; the others are needed.
    if len(replies) < len(lines) - 1:
        raise QemuProbeError(
            f"{binary.name} probe: expected {len(lines) - 1} QMP replies, got {len(replies)}"
        )
    return replies[1 : len(lines) - 1]


def _set_capability(name: str) -> dict[str, Any]:
    return {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": name, "state": True}]},
    }


def _capability_probe(
    binary: Path, capability: str, qemu_args: Sequence[str], host: Probe
) -> Probe:
    if not host:
        return host
    query, setting = qmp_stdio(
        binary, qemu_args, [{"execute": "query-migrate-capabilities"}, _set_capability(capability)]
    )
    names = {c["capability"] for c in query.get("return", [])}
    if capability not in names:
        version = qemu_version(binary)
        return Probe(False, f"{binary.name} {version} has no {capability} capability")
    if "error" in setting:
        return Probe(False, f"{capability}: {setting['error'].get('desc', setting['error'])}")
    return Probe(True)


@functools.cache
def probe_background_snapshot(binary: Path, machine: str = "pc") -> Probe:
    """Whether `binary` accepts the background-snapshot capability on this host.

    QEMU checks both kernel write-protect support and the guest memory layout when the
    capability is set, so the probe sets it on a small guest of the given machine type.
    """
    args = ["-machine", machine, "-m", "16", "-accel", "tcg", "-S"]
    return _capability_probe(binary, "background-snapshot", args, userfaultfd_available())


@functools.cache
def probe_postcopy_ram(binary: Path, machine: str = "pc") -> Probe:
    """Whether `binary` can be a postcopy destination on this host.

    QEMU checks host support (userfaultfd features, page sizes) only when postcopy-ram is
    set on a destination waiting for an incoming migration, hence `-incoming defer`.
    """
    args = ["-machine", machine, "-m", "16", "-accel", "tcg", "-S", "-incoming", "defer"]
    return _capability_probe(binary, "postcopy-ram", args, userfaultfd_available())


@functools.cache
def machine_types(binary: Path) -> frozenset[str]:
    """Machine type names `binary` accepts, aliases included (`pc`, `q35`, ...)."""
    (reply,) = qmp_stdio(binary, ["-machine", "none"], [{"execute": "query-machines"}])
    names: set[str] = set()
    for machine in reply.get("return", []):
        names.add(machine["name"])
        if machine.get("alias"):
            names.add(machine["alias"])
    return frozenset(names)


def probe_machine(binary: Path, machine: str) -> Probe:
    """Whether `binary` knows machine type `machine`."""
    if machine in machine_types(binary):
        return Probe(True)
    return Probe(False, f"{binary.name} has no machine type {machine!r}")


def _run(argv: list[str], what: str, stdin: str | None = None, timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise QemuProbeError(f"{what}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise QemuProbeError(f"{what}: {exc.strerror}") from None
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [""]
        raise QemuProbeError(f"{what}: exit status {proc.returncode}: {last[0]}")
    return proc.stdout
