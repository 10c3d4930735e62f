"""The test guests of vm-images/: building them, booting them, talking to the linux agent.

Two guests, both checkable page by page (see vm-images/):
- `linux`: a Debian kernel whose init runs the qsnap agent on ttyS1. The agent keeps a
  region of self-checking pages that a writer thread rewrites in sweeps; after a revert
  the agent itself says whether every page is right (`AgentClient.verify`).
- `pattern`: a boot sector incrementing the first byte of every page above 1 MiB, forever;
  it is checked from the host with `qsnap.harness.sweep`.

The artefacts are built by `vm-images/build` (cached by a hash of its inputs); this module
only runs that script and knows how to put the result on a QEMU command line.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from qsnap.harness.project_scripts import SOURCE_TREE, ScriptError, run_for_path

if TYPE_CHECKING:
    from qsnap.harness.vm import VM

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
BUILD_TIMEOUT = 1800.0
"""Seconds a guest build may take (a first build downloads Debian packages)."""


class GuestError(Exception):
    """A guest could not be built, or its agent misbehaved."""


class GuestName(enum.StrEnum):
    LINUX = "linux"
    PATTERN = "pattern"


def vm_images_dir() -> Path:
    """The vm-images/ recipes of this source tree (`QSNAP_VM_IMAGES` overrides)."""
    explicit = os.environ.get("QSNAP_VM_IMAGES")
    path = Path(explicit) if explicit else SOURCE_TREE / "vm-images"
    if not (path / "build").is_file():
        raise GuestError(f"no vm-images/build in {path} (set QSNAP_VM_IMAGES to the recipes)")
    return path


@functools.cache
def build_guest(name: GuestName | str, timeout: float = BUILD_TIMEOUT) -> Path:
    """Build guest `name` if it is not in the cache yet; return its artefact directory.

    Cached per process: the script's answer cannot change while its inputs do not.
    """
    guest = GuestName(name)
    script = vm_images_dir() / "build"
    log.info("building guest %s with %s", guest, script)
    try:
        built = run_for_path([script, guest.value], timeout)
    except ScriptError as exc:
        raise GuestError(str(exc)) from None
    if not built.is_dir():
        raise GuestError(f"{script} {guest}: printed no artefact directory")
    return built


@dataclass(frozen=True, slots=True)
class LinuxGuest:
    """The linux guest's artefacts: kernel, initramfs and kernel command line."""

    kernel: Path
    initrd: Path
    cmdline: str

    AGENT_SERIAL = "agent"

    @classmethod
    def build(cls) -> LinuxGuest:
        root = build_guest(GuestName.LINUX)
        return cls(
            kernel=root / "vmlinuz",
            initrd=root / "initramfs.img",
            cmdline=(root / "cmdline").read_text().strip(),
        )

    def qemu_args(self) -> list[str]:
        """Boot arguments; serial ports come from the VM (console first, then the agent)."""
        return [
            "-kernel", os.fspath(self.kernel),
            "-initrd", os.fspath(self.initrd),
            "-append", self.cmdline,
        ]  # fmt: skip

    def configure(self, vm: VM) -> Path:
        """Give `vm` this kernel and the agent's port (ttyS1); return the agent's socket.

        Also for a revert target: the agent port must exist there too, and be ttyS1.
        """
        socket_path = vm.add_serial_socket(self.AGENT_SERIAL)
        vm.add_args(*self.qemu_args())
        return socket_path

    def boot(self, vm: VM, timeout: float = 120.0) -> AgentClient:
        """Configure and launch `vm`, wait for the agent's ready line; return its client."""
        socket_path = self.configure(vm)
        vm.launch()
        agent = AgentClient.connect(socket_path, timeout=min(timeout, 30.0))
        try:
            agent.wait_ready(timeout)
        except AgentError as exc:
            agent.close()
            raise AgentError(f"{exc}\n{vm.diagnostics()}") from None
        return agent


@dataclass(frozen=True, slots=True)
class PatternGuest:
    """The pattern guest: a boot sector on a raw disk, sweeping [1 MiB, top of RAM)."""

    image: Path

    MARKER = b"P"
    """Written to ttyS0 (the console) after every full sweep."""
    SWEEP_START = 0x100000

    @classmethod
    def build(cls) -> PatternGuest:
        return cls(image=build_guest(GuestName.PATTERN) / "pattern.img")

    def qemu_args(self) -> list[str]:
        """The boot disk; `snapshot=on` so parallel VMs can share the image file."""
        drive = os.fspath(self.image).replace(",", ",,")
        return ["-drive", f"file={drive},format=raw,if=ide,index=0,snapshot=on"]

    def configure(self, vm: VM) -> None:
        vm.add_args(*self.qemu_args())

    @classmethod
    def swept_range(cls, memory_mib: int) -> range:
        """Offsets in `pc.ram` of the pages the guest sweeps (RAM below 4 GiB only)."""
        if not 16 <= memory_mib <= 3584:
            raise ValueError(f"pattern guest needs 16..3584 MiB of RAM, not {memory_mib}")
        return range(cls.SWEEP_START, memory_mib << 20, PAGE_SIZE)


# -- the linux agent ---------------------------------------------------------------------


AGENT_PAGE_MAGIC = 0x31475050414E5351
"""First 8 bytes of every agent page (little-endian "QSNAPPG1")."""
_AGENT_HEADER = struct.Struct("<QIIII")


@dataclass(frozen=True, slots=True)
class AgentPageHeader:
    """The header of one agent page as found in guest memory or in a stream."""

    index: int
    generation: int
    seed: int
    checksum: int

    @classmethod
    def parse(cls, page: bytes | memoryview) -> AgentPageHeader | None:
        """The header of `page` if it starts with the agent's magic, else None."""
        if len(page) < _AGENT_HEADER.size:
            return None
        magic, index, generation, seed, checksum = _AGENT_HEADER.unpack_from(page)
        if magic != AGENT_PAGE_MAGIC:
            return None
        return cls(index, generation, seed, checksum)


class PageFault(enum.StrEnum):
    """Why `verify` rejected a page, as the agent names it."""

    ZERO = "zero"
    BAD_MAGIC = "bad-magic"
    BAD_CHECKSUM = "bad-checksum"
    WRONG_INDEX = "wrong-index"
    WRONG_SEED = "wrong-seed"
    GEN_TOO_NEW = "gen-too-new"
    GEN_TOO_OLD = "gen-too-old"
    BAD_BODY = "bad-body"


@dataclass(frozen=True, slots=True)
class BadPage:
    """One rejected page: its index in the region, the reason and the value found."""

    index: int
    fault: PageFault
    value: int | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The agent's `verify` answer.

    `counts` holds the number of bad pages per fault; `first` at most 8 bad pages,
    lowest index first.
    """

    pages: int
    k: int
    g: int
    bad: int
    counts: tuple[tuple[PageFault, int], ...]
    first: tuple[BadPage, ...]

    @property
    def ok(self) -> bool:
        return self.bad == 0

    def faults(self) -> dict[int, PageFault]:
        return {b.index: b.fault for b in self.first}


@dataclass(frozen=True, slots=True)
class WriterState:
    """The writer's position: pages [0, k) hold generation g + 1, [k, pages) hold g."""

    k: int
    g: int


class AgentError(GuestError):
    """The agent answered ERR, answered nonsense, or did not answer in time."""


_FIELD = re.compile(r"(\S+?)=(\S+)")
_BAD = re.compile(r"(\d+):([a-z-]+)(?:=(\d+))?")
_COUNT = re.compile(r"([a-z-]+):(\d+)")
MAX_LINE = 4096


def _fields(line: str) -> dict[str, str]:
    return dict(_FIELD.findall(line))


class AgentClient:
    """The host side of the agent's line protocol over the socket behind ttyS1.

    Every command is answered by exactly one line; a reply that does not come within the
    timeout, or a line longer than `MAX_LINE`, raises `AgentError` (never a hang).
    """

    def __init__(self, sock: socket.socket, where: str, timeout: float = 30.0) -> None:
        self._sock = sock
        self.where = where
        self.timeout = timeout
        self._buffer = bytearray()

    @classmethod
    def connect(cls, path: str | os.PathLike[str], timeout: float = 30.0) -> AgentClient:
        """Connect to QEMU's listening serial socket `path`, retrying until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(path))
                return cls(sock, os.fspath(path), timeout)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise AgentError(f"agent socket {path}: {exc}") from None
                time.sleep(0.05)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def read_line(self, timeout: float | None = None) -> str:
        """The next line from the agent, without its newline."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                raise AgentError(f"agent {self.where}: line longer than {MAX_LINE} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"agent {self.where}: no answer within {limit:g} s")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                raise AgentError(f"agent {self.where}: connection closed by QEMU")
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        text = line.decode("ascii", "replace").strip()
        log.debug("agent %s: < %s", self.where, text)
        return text

    def send(self, command: str) -> None:
        """Send one command line without waiting for its answer."""
        log.debug("agent %s: > %s", self.where, command)
        self._sock.settimeout(self.timeout)
        self._sock.sendall(command.encode("ascii") + b"\n")

    def request(self, command: str, timeout: float | None = None) -> str:
        """Send `command`; return its answer line, `OK` or `ERR` included."""
        self.send(command)
        return self.answer(command, timeout)

    def answer(self, command: str, timeout: float | None = None) -> str:
        """Wait for the answer to an already sent `command`."""
        line = self.read_line(timeout)
        if not line.startswith(("OK ", "ERR ")):
            raise AgentError(f"agent {self.where}: {command!r}: unexpected line {line!r}")
        return line

    def command(self, command: str, timeout: float | None = None) -> dict[str, str]:
        """Send `command`, require `OK`, return the answer's key=value fields."""
        line = self.request(command, timeout)
        if not line.startswith("OK "):
            raise AgentError(f"agent {self.where}: {command!r}: {line}")
        return _fields(line)

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Wait for the agent's start-up line; return it."""
        line = self.read_line(timeout)
        if not line.startswith("OK ready qsnap-agent"):
            raise AgentError(f"agent {self.where}: expected the ready line, got {line!r}")
        return line

    def ping(self) -> None:
        if self.request("ping") != "OK pong":
            raise AgentError(f"agent {self.where}: ping not answered by pong")

    def fill(self, mib: int, seed: int) -> int:
        """Allocate and write the region (generation 0); return its page count."""
        return int(self.command(f"fill {mib} {seed}", max(self.timeout, mib * 1.0))["pages"])

    def writer_start(self, pages_per_second: int) -> None:
        self.command(f"writer start {pages_per_second}")

    def writer_stop(self) -> WriterState:
        fields = self.command("writer stop")
        return WriterState(int(fields["k"]), int(fields["g"]))

    def verify(self, timeout: float | None = None) -> VerifyReport:
        """Ask the agent to check every page; a report, also when pages are bad."""
        return self.parse_verify(self.request("verify", timeout))

    def parse_verify(self, line: str) -> VerifyReport:
        """The report in a `verify` answer line."""
        fields = _fields(line)
        try:
            first = tuple(
                BadPage(int(index), PageFault(fault), int(value) if value else None)
                for index, fault, value in _BAD.findall(fields.get("first", ""))
            )
            counts = tuple(
                (PageFault(fault), int(count))
                for fault, count in _COUNT.findall(fields.get("counts", ""))
            )
            report = VerifyReport(
                pages=int(fields["pages"]),
                k=int(fields["k"]),
                g=int(fields["g"]),
                bad=int(fields["bad"]),
                counts=counts,
                first=first,
            )
        except (KeyError, ValueError) as exc:
            raise AgentError(f"agent {self.where}: verify: bad answer {line!r} ({exc})") from None
        if report.ok != line.startswith("OK ") or report.bad != sum(n for _, n in counts):
            raise AgentError(f"agent {self.where}: verify: inconsistent answer {line!r}")
        return report

    def digest(self) -> str:
        return self.command("digest")["digest"]

    def touch(self, order: str) -> None:
        """Read every page in `order` ("random" or "reverse"): out-of-order page faults."""
        self.command(f"touch {order}")
