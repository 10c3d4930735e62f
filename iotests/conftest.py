"""pytest collects each iotest as one test: ``pytest iotests`` (or ``-k GROUP``).

The item runs the script exactly as ``iotests/check`` does (same environment, same
verdict rules, same ``NAME.out.bad``), so a pass or a failure means the same in both
runners; a test that reports "not run" is a pytest skip with its reason, never a pass.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from suite import catalog, environment, execution

_ENV_KEY = pytest.StashKey[environment.SuiteEnvironment]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("iotests")
    # Another conftest may define --qemu already; the iotests then read that option.
    with contextlib.suppress(ValueError):
        group.addoption("--qemu", metavar="PATH", help="qemu-system-x86_64 the iotests use")
    group.addoption(
        "--iotests-timeout",
        type=float,
        default=execution.DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="fail an iotest still running after this long",
    )


def _suite_environment(config: pytest.Config) -> environment.SuiteEnvironment:
    if _ENV_KEY not in config.stash:
        qemu = config.getoption("--qemu", default=None) or os.environ.get("QSNAP_QEMU")
        binaries = environment.find_binaries(qemu)
        sock_root = Path(tempfile.mkdtemp(prefix="qsnap-iotests-"))
        config.add_cleanup(lambda: shutil.rmtree(sock_root, ignore_errors=True))
        scratch = environment.IOTESTS_DIR / "scratch"
        config.stash[_ENV_KEY] = environment.build(binaries, scratch, sock_root)
    return config.stash[_ENV_KEY]


class IotestFailure(Exception):
    """An iotest failed: its description and diff are the whole report."""

    def __init__(self, outcome: execution.Outcome) -> None:
        super().__init__(outcome.description)
        self.outcome = outcome


class IotestItem(pytest.Item):
    """One iotest script, judged against its golden output."""

    def __init__(self, *, script: catalog.TestScript, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script
        self.add_marker(pytest.mark.qemu)
        self.extra_keyword_matches.update(script.groups)

    def runtest(self) -> None:
        try:
            env = _suite_environment(self.config)
        except environment.SetupError as exc:
            pytest.fail(str(exc), pytrace=False)
        timeout = self.config.getoption("--iotests-timeout")
        outcome = execution.run_test(self.script, env, timeout)
        if outcome.status is execution.Status.NOT_RUN:
            pytest.skip(f"{self.script.name} not run: {outcome.description}")
        if outcome.status is execution.Status.FAIL:
            raise IotestFailure(outcome)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> str:
        if isinstance(excinfo.value, IotestFailure):
            o = excinfo.value.outcome
            return "\n".join([f"{o.test.name}: {o.description}", *o.diff])
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"iotest {self.script.name}"


class IotestFile(pytest.File):
    """An executable in iotests/tests/ with a golden ``.out`` beside it."""

    def collect(self) -> Iterator[IotestItem]:
        script = catalog.load(self.path)
        yield IotestItem.from_parent(self, name=script.name, script=script)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> IotestFile | None:
    if file_path.parent != catalog.TESTS_DIR or file_path.name.endswith(".out"):
        return None
    if not file_path.with_name(file_path.name + catalog.REFERENCE_SUFFIX).is_file():
        return None
    file: IotestFile = IotestFile.from_parent(parent, path=file_path)
    return file
