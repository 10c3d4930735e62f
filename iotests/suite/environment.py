"""The environment every test runs in: the variables QEMU's ``./check`` exports.

QEMU's tests/qemu-iotests/testenv.py defines them; a test written against QEMU's
iotests.py reads them at import time (TEST_DIR, SOCK_DIR, QEMU_DEFAULT_MACHINE... are
mandatory there), so we export the same set, plus the ``QSNAP_*`` variables through
which qsnap and its harness find the very same binaries.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IOTESTS_DIR = Path(__file__).resolve().parent.parent
REPO_VENV_PYTHON = IOTESTS_DIR.parent / ".venv" / "bin" / "python"
PROBE_TIMEOUT = 60.0
QEMU_OPTIONS = "-nodefaults -display none -accel tcg"


class SetupError(RuntimeError):
    """A binary the suite needs is missing or unusable."""


@dataclass(frozen=True)
class Binaries:
    """The QEMU programs under test."""

    qemu: str
    qemu_img: str
    qemu_io: str
    qemu_nbd: str
    qsd: str


# (attribute, program name, variables consulted in order)
_TOOLS = (
    ("qemu", "qemu-system-x86_64", ("QSNAP_QEMU", "QEMU_PROG")),
    ("qemu_img", "qemu-img", ("QSNAP_QEMU_IMG", "QEMU_IMG_PROG")),
    ("qemu_io", "qemu-io", ("QEMU_IO_PROG",)),
    ("qemu_nbd", "qemu-nbd", ("QEMU_NBD_PROG",)),
    ("qsd", "qemu-storage-daemon", ("QSNAP_QSD", "QSD_PROG")),
)


def _find(program: str, variables: tuple[str, ...], explicit: str | None) -> str:
    for where, value in [("--qemu", explicit), *((v, os.environ.get(v)) for v in variables)]:
        if not value:
            continue
        path = shutil.which(value)
        if path is None:
            raise SetupError(f"{where}={value}: not an executable file")
        return os.path.abspath(path)
    path = shutil.which(program)
    if path is None:
        names = " or ".join(variables)
        raise SetupError(f"{program} not found in PATH (set {names})")
    return path


def find_binaries(qemu: str | None = None) -> Binaries:
    """Locate the programs: ``qemu`` if given, else the variables, else PATH."""
    found = {
        attr: _find(program, variables, qemu if attr == "qemu" else None)
        for attr, program, variables in _TOOLS
    }
    return Binaries(**found)


def default_machine(qemu: str) -> str:
    """The machine type QEMU picks without ``-M`` (QEMU_DEFAULT_MACHINE)."""
    try:
        listing = subprocess.run(
            [qemu, "-machine", "help"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"{qemu} -machine help failed: {exc}") from exc
    lines = listing.splitlines()
    default = next((ln.split(" ", 1)[0] for ln in lines if " (default)" in ln), "")
    alias = next((ln for ln in lines if ln.endswith(f" (alias of {default})")), None)
    return alias.split(" ", 1)[0] if alias and default else default


def test_python() -> str:
    """The interpreter tests run under: one where qsnap is installed.

    This one if qsnap is importable here, else the repository's .venv, so that
    ``./iotests/check`` or a test started by avocado works from any Python.
    """
    if importlib.util.find_spec("qsnap") is None and REPO_VENV_PYTHON.is_file():
        return str(REPO_VENV_PYTHON)
    return sys.executable


@dataclass(frozen=True)
class SuiteEnvironment:
    """Variables shared by all tests, and where each test gets its own directories."""

    variables: Mapping[str, str]
    test_root: Path
    sock_root: Path
    python: str = field(default=sys.executable)

    def header(self) -> list[str]:
        """The lines QEMU's check prints before the results (without the platform)."""
        v = self.variables
        return [
            f'QEMU          -- "{v["QEMU_PROG"]}" {v["QEMU_OPTIONS"]}',
            f'QEMU_IMG      -- "{v["QEMU_IMG_PROG"]}"',
            f'QEMU_IO       -- "{v["QEMU_IO_PROG"]}" {v["QEMU_IO_OPTIONS"]}',
            f'QEMU_NBD      -- "{v["QEMU_NBD_PROG"]}"',
            f'QSD           -- "{v["QSD_PROG"]}"',
            f"IMGFMT        -- {v['IMGFMT']}",
            f"IMGPROTO      -- {v['IMGPROTO']}",
            f"TEST_DIR      -- {self.test_root}",
            f"SOCK_DIR      -- {self.sock_root}",
        ]

    def for_test(self, name: str) -> dict[str, str]:
        """The full environment of one test, with its own TEST_DIR and SOCK_DIR created.

        Separate directories per test, named as QEMU's testrunner names them, keep
        tests running in parallel apart. The test's TEST_DIR starts empty: files left by an
        earlier run (another QEMU's column, an interrupted test) must not be taken for
        this run's.
        """
        env = dict(os.environ)
        env.update(self.variables)
        # stdout and stderr share one pipe: unbuffered, their lines keep their order.
        env["PYTHONUNBUFFERED"] = "1"
        tag = f"{self.variables['IMGFMT']}-{self.variables['IMGPROTO']}-{name}"
        for var, root in (("TEST_DIR", self.test_root), ("SOCK_DIR", self.sock_root)):
            path = root / tag
            if var == "TEST_DIR":
                shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
        return env


def build(
    binaries: Binaries,
    test_root: Path,
    sock_root: Path,
    *,
    imgfmt: str = "raw",
    imgproto: str = "file",
    aiomode: str = "threads",
    cachemode: str = "writeback",
    python: str | None = None,
) -> SuiteEnvironment:
    """The environment QEMU's check would set up for these binaries and options."""
    python = python or test_python()
    test_root.mkdir(parents=True, exist_ok=True)
    sock_root.mkdir(parents=True, exist_ok=True)
    io_options = f"--cache {cachemode} --aio {aiomode}"
    pythonpath = os.pathsep.join(filter(None, (str(IOTESTS_DIR), os.environ.get("PYTHONPATH"))))
    variables = {
        "PYTHONPATH": pythonpath,
        "TEST_DIR": str(test_root),
        "SOCK_DIR": str(sock_root),
        "SAMPLE_IMG_DIR": str(IOTESTS_DIR / "sample_images"),
        "PYTHON": python,
        "QEMU_PROG": binaries.qemu,
        "QEMU_IMG_PROG": binaries.qemu_img,
        "QEMU_IO_PROG": binaries.qemu_io,
        "QEMU_NBD_PROG": binaries.qemu_nbd,
        "QSD_PROG": binaries.qsd,
        "QEMU_OPTIONS": QEMU_OPTIONS,
        "QEMU_IO_OPTIONS": f"{io_options} -f {imgfmt}",
        "QEMU_IO_OPTIONS_NO_FMT": io_options,
        "IMGFMT": imgfmt,
        "IMGPROTO": imgproto,
        "AIOMODE": aiomode,
        "CACHEMODE": cachemode,
        "CACHEMODE_IS_DEFAULT": "true" if cachemode == "writeback" else "false",
        "IMGFMT_GENERIC": "true",
        "IMGOPTSSYNTAX": "false",
        "QEMU_DEFAULT_MACHINE": default_machine(binaries.qemu),
        "QSNAP_QEMU": binaries.qemu,
        "QSNAP_QEMU_IMG": binaries.qemu_img,
        "QSNAP_QSD": binaries.qsd,
    }
    log.debug("iotests environment: %s", variables)
    return SuiteEnvironment(variables, test_root, sock_root, python)
