"""``iotests/check``: select tests, run them (in parallel if asked), report.

Options that QEMU's ``./check`` has keep its spelling (``-g``, ``-x``, ``-j``, ``-n``,
``-d``); ``--qemu``, ``--tap FILE``, ``--junit FILE`` and ``--timeout`` are ours.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import catalog, environment, reports
from .execution import DEFAULT_TIMEOUT, Outcome, Status, run_test, stop_all

log = logging.getLogger("iotests.check")

EXIT_FAILED = 1
EXIT_USAGE = 2


def _split(groups: str | None) -> list[str]:
    return [g for g in (groups or "").split(",") if g]


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``iotests/check``."""
    p = argparse.ArgumentParser(
        prog="check",
        description="Run qsnap's iotests and compare their output with the golden files.",
    )
    p.add_argument("tests", nargs="*", metavar="TEST", help="tests to run, by name")
    p.add_argument("-g", "--groups", metavar="G1,...", help="include tests from these groups")
    p.add_argument("-x", "--exclude-groups", metavar="G1,...", help="exclude these groups")
    p.add_argument("-j", dest="jobs", type=int, default=1, help="run N tests in parallel")
    p.add_argument("-n", "--dry-run", action="store_true", help="list the tests, run nothing")
    p.add_argument("-d", dest="debug", action="store_true", help="debug logging of the runner")
    p.add_argument("--qemu", metavar="PATH", help="qemu-system-x86_64 to test (QSNAP_QEMU)")
    p.add_argument("--tap", metavar="FILE", type=Path, help="also write TAP results to FILE")
    p.add_argument("--junit", metavar="FILE", type=Path, help="also write JUnit XML to FILE")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="fail a test still running after this long",
    )
    p.add_argument(
        "--source-dir",
        type=Path,
        default=environment.IOTESTS_DIR,
        help="directory whose tests/ holds the tests (as in QEMU's check)",
    )
    p.add_argument(
        "--test-dir",
        type=Path,
        default=Path(os.environ.get("TEST_DIR") or environment.IOTESTS_DIR / "scratch"),
        help="where tests keep their files and NAME.out.bad",
    )
    return p


class _Console:
    """Prints result lines as tests finish, one at a time when tests run in parallel."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.lock = threading.Lock()

    @staticmethod
    def now() -> str:
        return datetime.datetime.now().strftime("%H:%M:%S")

    def finished(self, outcome: Outcome, start: str) -> None:
        with self.lock:
            print(reports.status_line(outcome, self.width, start, self.now()))
            if outcome.case_notrun:
                print(outcome.case_notrun.rstrip())
            if outcome.status is Status.FAIL and outcome.diff:
                print("\n".join(outcome.diff))
            sys.stdout.flush()


def run(
    tests: Sequence[catalog.TestScript],
    env: environment.SuiteEnvironment,
    jobs: int,
    timeout: float,
) -> list[Outcome]:
    """Run ``tests``, printing each result as it comes; results in the order given."""
    console = _Console(max(len(t.name) for t in tests) + 2)

    def one(test: catalog.TestScript) -> Outcome:
        start = console.now()
        outcome = run_test(test, env, timeout)
        console.finished(outcome, start)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, tests))


def _stop_and_exit(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT/SIGHUP: kill the running tests and their QEMUs, then exit."""
    stop_all()
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``iotests/check``; returns the exit status."""
    args = make_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_and_exit)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="check: %(message)s",
    )
    try:
        tests = catalog.select(
            catalog.discover(args.source_dir / "tests"),
            names=args.tests,
            groups=_split(args.groups),
            exclude_groups=_split(args.exclude_groups),
        )
    except catalog.SelectionError as exc:
        print(f"check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        print("\n".join(t.name for t in tests))
        return 0
    if args.jobs < 1:
        print(f"check: -j {args.jobs}: needs at least 1", file=sys.stderr)
        return EXIT_USAGE

    sock_root = Path(tempfile.mkdtemp(prefix="qsnap-iotests-"))
    try:
        env = environment.build(
            environment.find_binaries(args.qemu), args.test_dir.resolve(), sock_root
        )
        print("\n".join(env.header()) + "\n")
        sys.stdout.flush()
        outcomes = run(tests, env, args.jobs, args.timeout)
    except environment.SetupError as exc:
        print(f"check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        shutil.rmtree(sock_root, ignore_errors=True)

    print("\n".join(reports.summary(outcomes)))
    if args.tap:
        reports.write_tap(outcomes, args.tap)
    if args.junit:
        reports.write_junit(outcomes, args.junit)
    return EXIT_FAILED if any(o.status is Status.FAIL for o in outcomes) else 0
