"""Running one test and judging its output against the golden file.

The judgement follows QEMU's tests/qemu-iotests/testrunner.py: a non-zero exit status
fails; a ``NAME.notrun`` file left in TEST_DIR means "not run" (never a pass); otherwise
the combined stdout and stderr, saved as ``NAME.out.bad``, must equal ``NAME.out``
(trailing blanks ignored), and the ``.bad`` file is removed when it does.
Unlike QEMU's runner, every test runs under a timeout, in its own session so that the
QEMU processes it started are killed with it.
"""

from __future__ import annotations

import difflib
import enum
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .catalog import TestScript
from .environment import SuiteEnvironment

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0
KILL_GRACE = 10.0
PYTHON_SHEBANG = "#!/usr/bin/env python3"
REGEN_VARIABLE = "QEMU_IOTESTS_REGEN"


class Status(enum.Enum):
    """A test's verdict, spelled as QEMU's check prints it."""

    PASS = "pass"
    FAIL = "fail"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class Outcome:
    """What happened to one test."""

    test: TestScript
    status: Status
    description: str = ""
    elapsed: float | None = None
    diff: tuple[str, ...] = ()
    output: str = ""
    case_notrun: str = ""


def file_diff(reference: Path, output: Path) -> tuple[str, ...]:
    """Unified diff of two outputs, ignoring blanks at line ends (as QEMU's check)."""
    expected = [ln.rstrip() for ln in reference.read_text(encoding="utf-8").splitlines()]
    actual = [ln.rstrip() for ln in output.read_text(encoding="utf-8").splitlines()]
    return tuple(
        ln.rstrip() for ln in difflib.unified_diff(expected, actual, str(reference), str(output))
    )


def command(test: TestScript, python: str) -> list[str]:
    """How to start the test: Python tests run under the suite's interpreter.

    That interpreter is the one qsnap is installed in, which is how a test finds
    ``qsnap.harness`` both here and when QEMU's check runs it.
    """
    with test.path.open(encoding="utf-8", errors="replace") as script:
        first = script.readline().rstrip()
    return [python, str(test.path)] if first == PYTHON_SHEBANG else [str(test.path)]


_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()


def stop_all() -> None:
    """Kill every test still running (and its QEMUs): the runner itself is being stopped."""
    with _running_lock:
        running = list(_running)
    for proc in running:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the test's whole session: the test and every QEMU it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE)
            return
        except subprocess.TimeoutExpired:
            continue


def run_test(test: TestScript, env: SuiteEnvironment, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
    """Run ``test`` in ``env`` and compare its output with its golden file."""
    if not os.access(test.path, os.X_OK):
        return Outcome(test, Status.FAIL, f"not executable: {test.path}")
    variables = env.for_test(test.name)
    test_dir = Path(variables["TEST_DIR"])
    bad = test_dir / f"{test.name}.out.bad"
    notrun = test_dir / f"{test.name}.notrun"
    casenotrun = test_dir / f"{test.name}.casenotrun"
    for stale in (notrun, casenotrun):
        stale.unlink(missing_ok=True)

    start = time.monotonic()
    timed_out = False
    with bad.open("wb") as out:
        proc = subprocess.Popen(
            command(test, env.python),
            cwd=test.path.parent,
            env=variables,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with _running_lock:
            _running.add(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:
            _stop(proc)
            raise
        finally:
            with _running_lock:
                _running.discard(proc)
    elapsed = round(time.monotonic() - start, 1)
    output = bad.read_text(encoding="utf-8", errors="replace")
    case_notrun = casenotrun.read_text(encoding="utf-8") if casenotrun.exists() else ""

    def failed(description: str) -> Outcome:
        diff = file_diff(test.reference, bad)
        return Outcome(test, Status.FAIL, description, elapsed, diff, output, case_notrun)

    if timed_out:
        return failed(f"timed out after {timeout:g} s")
    if proc.returncode != 0:
        return failed(f"failed, exit status {proc.returncode}")
    if notrun.exists():
        reason = notrun.read_text(encoding="utf-8").strip()
        return Outcome(test, Status.NOT_RUN, reason, elapsed, (), output, case_notrun)
    diff = file_diff(test.reference, bad)
    if diff:
        if os.environ.get(REGEN_VARIABLE) is not None:
            shutil.copyfile(bad, test.reference)
            log.warning("%s: reference output updated", test.name)
        return Outcome(
            test, Status.FAIL, f"output mismatch (see {bad})", elapsed, diff, output, case_notrun
        )
    bad.unlink()
    return Outcome(test, Status.PASS, "", elapsed, (), output, case_notrun)
