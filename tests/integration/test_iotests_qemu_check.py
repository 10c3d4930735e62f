"""Our iotests run unchanged under QEMU's own ``./check``, from QEMU's source tarball.

QEMU's tests/qemu-iotests is copied to a temp tree (beside a link to QEMU's python/, which
its iotests.py imports), two of our tests are dropped into its tests/, and QEMU's check
runs them against the installed binaries: there ``import iotests`` is QEMU's module, not
ours, so passing proves our tests use only the API both provide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
OUR_TESTS = ("snapshot-stream-pattern", "save-image-check")
CHECK_TIMEOUT = 900

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def qemu_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of QEMU's tests/qemu-iotests with our tests in it; returns its path."""
    fetched = subprocess.run(
        [TOP / "ci" / "fetch-qemu-source"], capture_output=True, text=True, timeout=600
    )
    assert fetched.returncode == 0, fetched.stderr
    source = Path(fetched.stdout.strip())
    root = tmp_path_factory.mktemp("qemu-tree")
    (root / "tests").mkdir()
    iotests = root / "tests" / "qemu-iotests"
    shutil.copytree(source / "tests" / "qemu-iotests", iotests, symlinks=True)
    (root / "python").symlink_to(source / "python")
    for name in OUR_TESTS:
        for suffix in ("", ".out"):
            shutil.copy2(TOP / "iotests" / "tests" / (name + suffix), iotests / "tests")
    return iotests


def run_check(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """QEMU's check, pointed at the installed binaries, run by this interpreter (qsnap's)."""
    env = dict(os.environ)
    for var, program in (
        ("QEMU_PROG", "qemu-system-x86_64"),
        ("QEMU_IMG_PROG", "qemu-img"),
        ("QEMU_IO_PROG", "qemu-io"),
        ("QEMU_NBD_PROG", "qemu-nbd"),
        ("QSD_PROG", "qemu-storage-daemon"),
    ):
        path = shutil.which(program)
        assert path is not None, f"{program} not in PATH"
        env[var] = path
    for var in ("TEST_DIR", "SOCK_DIR", "QSNAP_QEMU", "QSNAP_QEMU_IMG", "QSNAP_QSD"):
        env.pop(var, None)
    build = tree.parent / "build"
    build.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "check", "--build-dir", str(build), *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
    )


def test_tests_import_qemus_own_iotests_module(qemu_tree: Path) -> None:
    probe = "import iotests, qemu.machine; print(iotests.__file__)"
    done = run_check(qemu_tree, "--", sys.executable, "-c", probe)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(qemu_tree / "iotests.py")


def test_our_tests_pass_under_qemus_check(qemu_tree: Path) -> None:
    done = run_check(qemu_tree, *OUR_TESTS)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    for name in OUR_TESTS:
        # check prints "NAME ..." then "\r" and the verdict line: the last one counts
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(name + " ")]
        assert lines and lines[-1].split()[1] == "pass", report
    assert f"Passed all {len(OUR_TESTS)} iotests" in done.stdout, report


def test_qemus_check_sees_a_wrong_golden_output(qemu_tree: Path) -> None:
    """The control: QEMU's check really compares our output (one changed golden line)."""
    name = "snapshot-stream-pattern"
    golden = qemu_tree / "tests" / f"{name}.out"
    original = golden.read_text()
    golden.write_text(original.replace("pages sent twice: 0", "pages sent twice: 1"))
    try:
        done = run_check(qemu_tree, name)
    finally:
        golden.write_text(original)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "-pages sent twice: 1" in done.stdout
    assert "+pages sent twice: 0" in done.stdout
    assert f"Failures: {name}" in done.stdout
