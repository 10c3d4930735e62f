"""The qemu-patches/ series against QEMU's own rules: checkpatch.pl and clean application.

QEMU's scripts/checkpatch.pl, from the pristine tree of ci/fetch-qemu-source, runs on every
patch file; `git apply` (no fuzz, unlike patch(1)) applies the patches in order to a copy of
the files they touch. Building each step is ci/check-qemu-series's job (minutes, cached);
this is the fast part of the same promise. A copy of a patch with a style error introduced
must make checkpatch report it, so a checkpatch that silently checks nothing cannot pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from qsnap.harness.analyze import FETCH_TIMEOUT
from qsnap.harness.project_scripts import SOURCE_TREE, run_for_path

pytestmark = pytest.mark.qemu

PATCHES = sorted((SOURCE_TREE / "qemu-patches").glob("*.patch"))
EXPECTED_WARNING = "added, moved or deleted file(s), does MAINTAINERS need updating?"
"""What checkpatch says of every new file; the series adds one, its iotest."""
IOTEST = "tests/qemu-iotests/tests/migrate-ram-stream-content-test"
CHECKPATCH_TIMEOUT = 120
SUMMARY = re.compile(r"^total: (\d+) errors, (\d+) warnings, (\d+) lines checked$", re.MULTILINE)
FILE_HEADER = re.compile(r"^(?:---|\+\+\+) [ab]/(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class CheckpatchReport:
    """What checkpatch.pl said of one patch file."""

    status: int
    errors: int
    warnings: int
    lines_checked: int
    messages: tuple[str, ...]
    """Its "ERROR: ..." and "WARNING: ..." lines, in order."""
    output: str

    def of_level(self, level: str) -> list[str]:
        prefix = f"{level}: "
        return [m.removeprefix(prefix) for m in self.messages if m.startswith(prefix)]


@pytest.fixture(scope="module")
def pristine() -> Path:
    """QEMU 10.0.2's unpacked tarball as ci/fetch-qemu-source gives it (never patched)."""
    return run_for_path([SOURCE_TREE / "ci" / "fetch-qemu-source"], FETCH_TIMEOUT)


def checkpatch(tree: Path, patch: Path) -> CheckpatchReport:
    """Run `scripts/checkpatch.pl` of `tree` on `patch` from the tree's top (as QEMU does)."""
    done = subprocess.run(
        ["perl", "scripts/checkpatch.pl", "--color=never", os.fspath(patch)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=CHECKPATCH_TIMEOUT,
        check=False,
    )
    summaries = SUMMARY.findall(done.stdout)
    said = done.stdout + done.stderr
    assert len(summaries) == 1, f"{patch.name}: expected one summary line in:\n{said}"
    errors, warnings, lines = (int(n) for n in summaries[0])
    messages = tuple(
        line for line in done.stdout.splitlines() if line.startswith(("ERROR: ", "WARNING: "))
    )
    return CheckpatchReport(done.returncode, errors, warnings, lines, messages, done.stdout)


def test_the_series_is_numbered_from_one() -> None:
    """`git format-patch` names: the glob found the whole series, in order."""
    assert PATCHES
    assert [p.name[:5] for p in PATCHES] == [f"{n:04}-" for n in range(1, len(PATCHES) + 1)]


@pytest.mark.parametrize("patch", PATCHES, ids=[p.name[:4] for p in PATCHES])
def test_checkpatch_finds_no_error(pristine: Path, patch: Path) -> None:
    report = checkpatch(pristine, patch)
    assert report.of_level("ERROR") == [], report.output
    assert report.errors == 0, report.output
    assert report.status == 0, report.output
    assert report.lines_checked > 0
    new_files = re.findall(r"^new file mode", patch.read_text(), re.MULTILINE)
    assert report.of_level("WARNING") == [EXPECTED_WARNING] * bool(new_files), report.output
    assert report.warnings == len(report.of_level("WARNING"))


def touched_files(patches: list[Path]) -> set[str]:
    """Every path a patch reads or writes (`--- a/...` and `+++ b/...`)."""
    return {path for p in patches for path in FILE_HEADER.findall(p.read_text())}


def test_each_patch_applies_in_order(pristine: Path, tmp_path: Path) -> None:
    """`git apply --check` of each patch on the result of the ones before it, then applied."""
    tree = tmp_path / "qemu"
    for name in touched_files(PATCHES):
        if (pristine / name).exists():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pristine / name, tree / name)
    subprocess.run(["git", "init", "-q", os.fspath(tree)], check=True, timeout=60)
    for patch in PATCHES:
        for check in (["--check"], []):
            done = subprocess.run(
                ["git", "apply", *check, os.fspath(patch)],
                cwd=tree,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, f"{patch.name} does not apply: {done.stderr}"
    assert os.access(tree / IOTEST, os.X_OK)
    assert (tree / f"{IOTEST}.out").is_file()
    assert "stream-content-list" in (tree / "qapi" / "migration.json").read_text()


def with_added_line_changed(patch: Path, suffix: str) -> str:
    """The patch text with `suffix` appended to its first added C statement.

    The hunk's line counts stay right, so checkpatch still reads it as a patch.
    """
    lines = patch.read_text().splitlines(keepends=True)
    in_c_file = False
    for i, line in enumerate(lines):
        if line.startswith("+++ "):
            in_c_file = line.rstrip().endswith(".c")
        elif in_c_file and line.startswith("+ ") and line.rstrip().endswith(";"):
            lines[i] = line.rstrip("\n") + suffix + "\n"
            return "".join(lines)
    raise AssertionError(f"{patch.name}: no added C statement")


@pytest.mark.parametrize(
    ("suffix", "error"),
    [(" // why", "do not use C99 // comments"), ("  ", "trailing whitespace")],
    ids=["c99-comment", "trailing-whitespace"],
)
def test_checkpatch_reports_an_introduced_style_error(
    pristine: Path, tmp_path: Path, suffix: str, error: str
) -> None:
    """Negative control: the check above can fail."""
    original = next(p for p in PATCHES if "send-only-the-parts" in p.name)
    broken = tmp_path / original.name
    broken.write_text(with_added_line_changed(original, suffix))
    assert checkpatch(pristine, original).errors == 0
    report = checkpatch(pristine, broken)
    assert report.of_level("ERROR") == [error], report.output
    assert report.errors == 1
    assert report.status != 0
