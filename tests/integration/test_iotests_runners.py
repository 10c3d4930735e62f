"""The iotests runners end to end: iotests/check, a test run on its own, avocado, pytest.

The suite here is made of three small tests written against our iotests.py compat module
(one passes, one's output differs from its golden file, one calls notrun), so every
verdict is exercised in a few seconds; the runners still probe the real QEMU binaries
(QEMU_DEFAULT_MACHINE), as they do for the real suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
CHECK = TOP / "iotests" / "check"
TIMEOUT = 300

pytestmark = pytest.mark.qemu

TESTS = {
    "good": (
        "quick",
        """
        iotests.log("image " + os.path.join(iotests.test_dir, f"{os.getpid()}-x.img"),
                    filters=[iotests.filter_testfiles])
        iotests.log({"b": 1, "a": [2]})
        """,
        'image TEST_DIR/PID-x.img\n{"a": [2], "b": 1}\n',
    ),
    "bad": ("quick save", 'iotests.log("actual")\n', "expected\n"),
    "skipped": ("slow", 'iotests.notrun("needs a patched QEMU")\n', "never compared\n"),
}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source dir whose tests/ holds the three tests."""
    tests = tmp_path / "src" / "tests"
    tests.mkdir(parents=True)
    for name, (groups, body, golden) in TESTS.items():
        script = tests / name
        script.write_text(
            f"#!/usr/bin/env python3\n# group: {groups}\nimport os\n\nimport iotests\n\n\n"
            f"def test() -> None:\n{textwrap.indent(textwrap.dedent(body), '    ')}\n\n"
            "iotests.script_main(test)\n"
        )
        script.chmod(0o755)
        (tests / f"{name}.out").write_text(golden)
    return tmp_path / "src"


def check(source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(CHECK), "--source-dir", str(source), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_check_verdicts_summary_tap_and_junit(source: Path, tmp_path: Path) -> None:
    tap, junit = tmp_path / "r.tap", tmp_path / "r.xml"
    done = check(source, "-j", "2", "--tap", str(tap), "--junit", str(junit),
                 "--test-dir", str(tmp_path / "scratch"))  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-4:] == [
        "Not run: skipped",
        "Failures: bad",
        "Failed 1 of 2 iotests",
        "1 passed, 1 failed, 1 not run",
    ]
    assert "-expected" in lines and "+actual" in lines
    bad = tmp_path / "scratch" / "raw-file-bad" / "bad.out.bad"
    assert bad.read_text() == "actual\n"
    assert not (tmp_path / "scratch" / "raw-file-good" / "good.out.bad").exists()

    assert tap.read_text().splitlines() == [
        "TAP version 13",
        "1..3",
        "not ok 1 - bad",
        f"# output mismatch (see {bad})",
        "# --- " + str(source / "tests" / "bad.out"),
        f"# +++ {bad}",
        "# @@ -1 +1 @@",
        "# -expected",
        "# +actual",
        "ok 2 - good",
        "ok 3 - skipped # SKIP needs a patched QEMU",
    ]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    verdicts = {
        c.get("name"): [child.tag for child in c if child.tag != "system-out"]
        for c in suite.findall("testcase")
    }
    assert verdicts == {"bad": ["failure"], "good": [], "skipped": ["skipped"]}


def test_check_selects_by_group_and_name(source: Path) -> None:
    def listed(*args: str) -> list[str]:
        done = check(source, "-n", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert listed() == ["bad", "good", "skipped"]
    assert listed("-g", "quick") == ["bad", "good"]
    assert listed("-g", "quick", "-x", "save") == ["good"]
    assert listed("-x", "quick") == ["skipped"]
    assert listed("-g", "save", "good") == ["bad", "good"]
    wrong = check(source, "nope")
    assert (wrong.returncode, wrong.stderr) == (2, 'check: Test "nope" is not found\n')


def test_check_with_missing_qemu_is_one_clear_line(source: Path, tmp_path: Path) -> None:
    done = check(source, "--qemu", str(tmp_path / "no-qemu"), "good")
    assert done.returncode == 2
    assert done.stderr == f"check: --qemu={tmp_path / 'no-qemu'}: not an executable file\n"


@pytest.mark.parametrize(("name", "status"), [("good", 0), ("bad", 1), ("skipped", 77)])
def test_a_test_run_on_its_own_judges_itself(
    source: Path, tmp_path: Path, name: str, status: int
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_DIR", "SOCK_DIR")}
    env["PYTHONPATH"] = str(TOP / "iotests")
    env["TMPDIR"] = str(tmp_path)
    script = source / "tests" / name
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == status, done.stdout + done.stderr
    verdict = {0: "pass", 1: "fail", 77: "not run"}[status]
    assert done.stderr.splitlines()[0].startswith(f"{name}: {verdict}")
    kept = list(tmp_path.glob(f"qsnap-iotest-{name}-*"))  # a failed test's files are kept
    assert len(kept) == (1 if name == "bad" else 0)
    if kept:
        assert done.stderr.splitlines()[-1] == f"{name}: files kept in {kept[0]}"


def test_avocado_runs_them_as_exec_tests(source: Path, tmp_path: Path) -> None:
    avocado = Path(sys.executable).parent / "avocado"
    env = dict(os.environ, PYTHONPATH=str(TOP / "iotests"), TMPDIR=str(tmp_path))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    results = tmp_path / "avocado"
    done = subprocess.run(
        [str(avocado), "--config", str(TOP / "iotests" / "avocado.conf"), "run",
         "--job-results-dir", str(results), str(source / "tests")],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout  # one test fails
    (job,) = results.glob("job-*")
    summary = json.loads((job / "results.json").read_text())
    statuses = {Path(t["name"]).name: t["status"] for t in summary["tests"]}
    assert statuses == {"good": "PASS", "bad": "FAIL", "skipped": "SKIP"}
    xunit = ET.parse(job / "results.xml").getroot()
    assert (xunit.get("tests"), xunit.get("failures"), xunit.get("skipped")) == ("3", "1", "1")


def test_pytest_collects_one_item_per_script_with_groups_as_keywords() -> None:
    def collected(*args: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             str(TOP / "iotests"), *args],
            cwd=TOP, capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return sorted(ln.split("::")[-1] for ln in done.stdout.splitlines() if "::" in ln)

    scripts = {
        p.name: p.read_text().split("# group: ", 1)[1].split("\n", 1)[0].split()
        for p in (TOP / "iotests" / "tests").iterdir()
        if p.with_name(p.name + ".out").is_file()
    }
    assert collected() == sorted(scripts)
    assert collected("-k", "save") == sorted(n for n, g in scripts.items() if "save" in g)


def test_check_stopped_by_sigterm_kills_the_running_test_and_its_children(
    tmp_path: Path,
) -> None:
    tests = tmp_path / "src" / "tests"
    tests.mkdir(parents=True)
    pidfile = tmp_path / "child.pid"
    script = tests / "hangs"
    script.write_text(
        "#!/usr/bin/env python3\n# group: quick\nimport subprocess\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\nchild.wait()\n"
    )
    script.chmod(0o755)
    (tests / "hangs.out").write_text("")
    argv = [sys.executable, str(CHECK), "--source-dir", str(tmp_path / "src"),
            "--test-dir", str(tmp_path / "scratch")]  # fmt: skip
    check_proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the test never started"
        time.sleep(0.1)
    child = int(pidfile.read_text())
    check_proc.send_signal(signal.SIGTERM)
    assert check_proc.wait(timeout=60) == 128 + signal.SIGTERM
    check_proc.communicate()
    deadline = time.monotonic() + 15
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, f"child {child} of the stopped test still runs"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"
