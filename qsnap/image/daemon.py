"""A private qemu-storage-daemon exporting one blockdev over NBD on a unix socket.

For bulk reads and writes the same node can also be exported as vhost-user-blk (writable
only when the NBD export is), on a second socket (see :mod:`qsnap.image.vhost_blk`).
qsnap never parses qcow2 itself: QEMU's block layer does, in this child process.  The
socket lives in a fresh 0700 directory so no other user can reach the export; it is
removed once qsnap has connected.  The daemon dies with qsnap (PR_SET_PDEATHSIG) even if
qsnap is killed with SIGKILL, and runs in its own session so a terminal's Ctrl-C reaches
only qsnap, which then shuts it down cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import TracebackType

from qsnap.image.errors import ImageError
from qsnap.image.spec import FORMAT_NODE, BlockdevSpec

log = logging.getLogger(__name__)

EXPORT_NAME = "qsnap"
_NO_MESSAGE = "qemu-storage-daemon exited without a message"
_PR_SET_PDEATHSIG = 1


def qsd_binary() -> str:
    """``$QSNAP_QSD`` or ``qemu-storage-daemon`` from ``PATH``."""
    path = os.environ.get("QSNAP_QSD") or shutil.which("qemu-storage-daemon")
    if not path:
        raise ImageError("qemu-storage-daemon not found (set QSNAP_QSD or install qemu-utils)")
    return path


def _die_with_parent() -> None:
    # The signal mask survives exec: without this the daemon would ignore the SIGTERM
    # of stop() (blocked by _signals_deferred around Popen) and stop() wait its timeout.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# glibc serves a posix_memalign() of the NBD server's 1-2 MiB request buffers with a fresh
# mmap every time (the dynamic mmap threshold never catches up with memalign's padding):
# page faults and munmap were half of the daemon's CPU.  A fixed threshold and trim
# threshold keep those buffers in the heap (at most a window of them).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864"


def _daemon_env() -> dict[str, str]:
    """The environment for the daemon; the user's own GLIBC_TUNABLES take precedence."""
    env = dict(os.environ)
    own = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{MALLOC_TUNABLES}:{own}" if own else MALLOC_TUNABLES
    return env


def _one_line(text: str) -> str:
    """The daemon's stderr as one line, without its ``qemu-storage-daemon: --opt ...:`` prefix."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = []
    for line in lines:
        if line.startswith("qemu-storage-daemon: "):
            line = line[len("qemu-storage-daemon: ") :]
            if line.startswith("--") and ": " in line:
                line = line.split(": ", 1)[1]
        out.append(line)
    return "; ".join(out)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP back while a child is started or stopped, so that an
    interruption can never lose track of the daemon; they are delivered right after."""
    deferred = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StorageDaemon:
    """Context manager: start the daemon, wait for its socket, always stop it.

    ``socket_path`` and ``export_name`` are what :class:`qsnap.image.nbd.NbdClient` needs.
    """

    def __init__(
        self,
        spec: BlockdevSpec,
        *,
        writable: bool,
        timeout: float = 30.0,
        vhost_user: bool = False,
    ) -> None:
        """``vhost_user``: also export the image as vhost-user-blk (bulk I/O)."""
        self.spec = spec
        self.writable = writable
        self.vhost_user = vhost_user
        self.timeout = timeout
        self.export_name = EXPORT_NAME
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = ""
        self._log_fd: int | None = None
        self.socket_path = ""
        self.vhost_user_path = ""
        self.pid_path = ""

    def __enter__(self) -> StorageDaemon:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def argv(self) -> list[str]:
        writable = "on" if self.writable else "off"
        vhost_user = [
            "--export",
            f"type=vhost-user-blk,id=qsnap-vhost-user,node-name={FORMAT_NODE},writable={writable},"
            f"addr.type=unix,addr.path={self.vhost_user_path.replace(',', ',,')}",
        ]
        return [
            qsd_binary(),
            *self.spec.qsd_blockdev_args(read_only=not self.writable),
            "--nbd-server",
            f"addr.type=unix,addr.path={self.socket_path.replace(',', ',,')}",
            "--export",
            f"type=nbd,id=qsnap-export,node-name={FORMAT_NODE},"
            f"name={self.export_name},writable={writable}",
            *(vhost_user if self.vhost_user else []),
            # Written once the NBD server listens: the documented readiness signal.
            "--pidfile",
            self.pid_path,
        ]

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the daemon without waiting for it (:meth:`wait_ready` does)."""
        self._dir = tempfile.mkdtemp(prefix="qsnap-")
        os.chmod(self._dir, 0o700)
        self.socket_path = os.path.join(self._dir, "nbd.sock")
        self.vhost_user_path = os.path.join(self._dir, "vhost-user.sock")
        self.pid_path = os.path.join(self._dir, "qsd.pid")
        self._stderr_path = os.path.join(self._dir, "qsd.log")
        argv = self.argv()
        log.debug("starting %s", " ".join(argv))
        # Should qsnap die before it can stop the daemon, PDEATHSIG still ends it.
        with open(self._stderr_path, "wb") as err, _signals_deferred():
            self._log_fd = os.open(self._stderr_path, os.O_RDONLY | os.O_CLOEXEC)
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=_daemon_env(),
            )

    def connected(self) -> None:
        """qsnap has made its connections: the sockets, the pid file and their directory
        go now, so that a qsnap killed with SIGKILL (the daemon follows it through
        PR_SET_PDEATHSIG) leaves nothing behind.  The log stays readable through an open
        descriptor (:meth:`stderr_text`)."""
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def launched(self) -> bool:
        return self._proc is not None

    def wait_ready(self) -> None:
        """Wait until the daemon has written its pid file: its exports are then set up.

        It is ready some 15-20 ms after its start, so the first checks come quickly.
        """
        proc = self._proc
        if proc is None:
            raise RuntimeError("wait_ready() before launch()")
        deadline = time.monotonic() + self.timeout
        delay = 0.0005
        while not os.path.exists(self.pid_path):
            if proc.poll() is not None:
                raise ImageError(f"cannot open image {self.spec.text!r}: {self.death(grace=0)}")
            if time.monotonic() > deadline:
                raise ImageError(f"qemu-storage-daemon was not ready within {self.timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.25, 0.05)

    def stderr_text(self) -> str:
        """What the daemon printed so far, as one line (empty when nothing)."""
        if self._log_fd is None:
            return ""
        text = os.pread(self._log_fd, 64 * 1024, 0).decode("utf-8", errors="replace")
        return _one_line(text) or _NO_MESSAGE

    def death(self, grace: float = 1.0) -> str:
        """Why the daemon is gone, as one line; empty if it still runs after ``grace`` s.

        Called after an NBD error: a dying process closes its socket a moment before it
        can be reaped, hence the grace period.
        """
        proc = self._proc
        if proc is None:
            return ""
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            return ""
        code = proc.returncode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0
            else f"exited with status {code}"
        )
        text = self.stderr_text()
        if text == _NO_MESSAGE:
            return f"qemu-storage-daemon {how}"
        return text if code == 1 else f"qemu-storage-daemon {how}: {text}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM (the daemon flushes and closes the image), SIGKILL after ``grace``
        seconds (default: the timeout)."""
        with _signals_deferred():
            self._stop(self.timeout if grace is None else grace)

    def _stop(self, grace: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    # its log is closed below: say what it said
                    log.warning(
                        "qemu-storage-daemon ignored SIGTERM for %g s; killing it (it said: %s)",
                        grace,
                        self.stderr_text(),
                    )
                    proc.kill()
                    proc.wait(timeout=self.timeout)
            if proc.returncode not in (0, -signal.SIGTERM):
                log.debug("qemu-storage-daemon exited with %s", proc.returncode)
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._remove_dir()
