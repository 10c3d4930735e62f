"""The iotests runner machinery (iotests/suite): selection, verdicts, reports.

No QEMU here: the tests it runs are tiny Python scripts written into a temp dir.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "iotests"))

from suite import catalog, reports
from suite.environment import SuiteEnvironment
from suite.execution import Outcome, Status, run_test

GROUPS = ("quick", "auto", "save", "revert", "slow", "disabled")
names = st.text(alphabet="abcdefghij-", min_size=1, max_size=8)
catalogs = st.dictionaries(names, st.frozensets(st.sampled_from(GROUPS)), min_size=1, max_size=12)


def make_catalog(spec: dict[str, frozenset[str]]) -> dict[str, catalog.TestScript]:
    return {n: catalog.TestScript(n, Path("/nonexistent") / n, g) for n, g in spec.items()}


@given(catalogs, st.sets(st.sampled_from(GROUPS)), st.sets(st.sampled_from(GROUPS)))
def test_group_selection_follows_findtests(
    spec: dict[str, frozenset[str]], groups: set[str], exclude: set[str]
) -> None:
    effective_exclude = set(exclude)
    if "disabled" not in groups:
        effective_exclude.add("disabled")
    if groups:
        wanted = {n for n, g in spec.items() if g & groups and not g & effective_exclude}
    else:
        wanted = {n for n, g in spec.items() if not g & effective_exclude}
    cat = make_catalog(spec)
    if not wanted:
        with pytest.raises(catalog.SelectionError, match="No tests selected"):
            catalog.select(cat, groups=groups, exclude_groups=exclude)
        return
    chosen = catalog.select(cat, groups=groups, exclude_groups=exclude)
    assert [t.name for t in chosen] == sorted(wanted)


@given(catalogs, st.data())
def test_named_tests_are_always_selected(
    spec: dict[str, frozenset[str]], data: st.DataObject
) -> None:
    picked = data.draw(st.lists(st.sampled_from(sorted(spec)), min_size=1, unique=True))
    chosen = catalog.select(make_catalog(spec), names=[f"iotests/tests/{n}" for n in picked])
    assert [t.name for t in chosen] == sorted(picked)


def test_selection_errors_name_the_problem() -> None:
    cat = make_catalog({"a": frozenset({"quick"})})
    with pytest.raises(catalog.SelectionError, match='Test "nope" is not found'):
        catalog.select(cat, names=["nope"])
    with pytest.raises(catalog.SelectionError, match="Can't exclude"):
        catalog.select(cat, names=["a"], exclude_groups=["quick"])


def test_discover_reads_group_line_and_needs_golden_output(tmp_path: Path) -> None:
    (tmp_path / "with-out").write_text("#!/bin/sh\n# comment\n# group: quick save\n")
    (tmp_path / "with-out.out").write_text("")
    (tmp_path / "no-out").write_text("#!/bin/sh\n# group: quick\n")
    (tmp_path / "with-out.out.bad").write_text("")
    found = catalog.discover(tmp_path)
    assert list(found) == ["with-out"]
    assert found["with-out"].groups == {"quick", "save"}


statuses = st.sampled_from(list(Status))


@st.composite
def outcome_lists(draw: st.DrawFn) -> list[Outcome]:
    result = []
    for i, status in enumerate(draw(st.lists(statuses, max_size=10))):
        test = catalog.TestScript(f"t{i}", Path(f"/x/t{i}"), frozenset())
        diff = ("--- a", "+++ b", "-x\x01", "+y") if status is Status.FAIL else ()
        why = {Status.FAIL: "output mismatch", Status.NOT_RUN: "no userfaultfd"}.get(status, "")
        result.append(Outcome(test, status, why, 1.5, diff, "out\x07put\n"))
    return result


@given(outcome_lists())
def test_tap_counts_each_status_once(outcomes: list[Outcome]) -> None:
    lines = reports.tap(outcomes).splitlines()
    assert lines[:2] == ["TAP version 13", f"1..{len(outcomes)}"]
    results = [ln for ln in lines if ln.startswith(("ok ", "not ok "))]
    assert len(results) == len(outcomes)
    for number, (line, o) in enumerate(zip(results, outcomes, strict=True), 1):
        if o.status is Status.PASS:
            assert line == f"ok {number} - {o.test.name}"
        elif o.status is Status.NOT_RUN:
            assert line == f"ok {number} - {o.test.name} # SKIP no userfaultfd"
        else:
            assert line == f"not ok {number} - {o.test.name}"


@given(outcome_lists())
def test_junit_round_trips_counts_and_never_passes_a_skip(outcomes: list[Outcome]) -> None:
    text = ET.tostring(reports.junit(outcomes).getroot(), encoding="unicode")
    suite = ET.fromstring(text).find("testsuite")
    assert suite is not None
    assert suite.get("tests") == str(len(outcomes))
    assert suite.get("failures") == str(sum(o.status is Status.FAIL for o in outcomes))
    assert suite.get("skipped") == str(sum(o.status is Status.NOT_RUN for o in outcomes))
    for case, o in zip(suite.findall("testcase"), outcomes, strict=True):
        assert case.get("name") == o.test.name
        assert (case.find("skipped") is not None) == (o.status is Status.NOT_RUN)
        assert (case.find("failure") is not None) == (o.status is Status.FAIL)


@given(outcome_lists())
def test_summary_ends_with_plain_counts(outcomes: list[Outcome]) -> None:
    n = {s: sum(o.status is s for o in outcomes) for s in Status}
    lines = reports.summary(outcomes)
    assert lines[-1] == (
        f"{n[Status.PASS]} passed, {n[Status.FAIL]} failed, {n[Status.NOT_RUN]} not run"
    )
    if n[Status.FAIL]:
        assert f"Failed {n[Status.FAIL]} of {n[Status.PASS] + n[Status.FAIL]} iotests" in lines
    else:
        assert f"Passed all {n[Status.PASS]} iotests" in lines


# --- running tests -------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> SuiteEnvironment:
    variables = {"IMGFMT": "raw", "IMGPROTO": "file", "PYTHONPATH": ""}
    return SuiteEnvironment(variables, tmp_path / "scratch", tmp_path / "sock")


def script(directory: Path, name: str, body: str, golden: str) -> catalog.TestScript:
    path = directory / name
    path.write_text(
        "#!/usr/bin/env python3\n# group: quick\nimport os, sys, subprocess\n"
        + textwrap.dedent(body)
    )
    path.chmod(0o755)
    (directory / f"{name}.out").write_text(golden)
    return catalog.load(path)


def test_matching_output_passes_and_removes_bad_file(tmp_path: Path, env: SuiteEnvironment) -> None:
    test = script(
        tmp_path, "ok", "print('hello')  \nprint('err', file=sys.stderr)\n", "hello\nerr\n"
    )
    outcome = run_test(test, env)
    assert (outcome.status, outcome.diff) == (Status.PASS, ())
    assert not list(env.test_root.rglob("ok.out.bad"))


def test_mismatch_fails_with_diff_and_keeps_bad_file(tmp_path: Path, env: SuiteEnvironment) -> None:
    test = script(tmp_path, "mismatch", "print('actual')\n", "expected\n")
    outcome = run_test(test, env)
    assert outcome.status is Status.FAIL
    assert outcome.description.startswith("output mismatch (see ")
    assert "-expected" in outcome.diff and "+actual" in outcome.diff
    (bad,) = env.test_root.rglob("mismatch.out.bad")
    assert bad.read_text() == "actual\n"


def test_exit_status_fails_even_with_matching_output(tmp_path: Path, env: SuiteEnvironment) -> None:
    test = script(tmp_path, "exits", "print('same')\nsys.exit(3)\n", "same\n")
    outcome = run_test(test, env)
    assert (outcome.status, outcome.description) == (Status.FAIL, "failed, exit status 3")


def test_notrun_file_means_not_run(tmp_path: Path, env: SuiteEnvironment) -> None:
    body = """
    d = os.environ['TEST_DIR']
    open(os.path.join(d, 'skips.notrun'), 'w').write('needs userfaultfd\\n')
    """
    outcome = run_test(script(tmp_path, "skips", body, "whatever\n"), env)
    assert (outcome.status, outcome.description) == (Status.NOT_RUN, "needs userfaultfd")


def test_each_test_gets_its_own_dirs(tmp_path: Path, env: SuiteEnvironment) -> None:
    body = "print(os.environ['TEST_DIR']); print(os.environ['SOCK_DIR'])\n"
    test = script(tmp_path, "dirs", body, "")
    outcome = run_test(test, env)
    assert outcome.output.splitlines() == [
        str(env.test_root / "raw-file-dirs"),
        str(env.sock_root / "raw-file-dirs"),
    ]


def test_timeout_kills_the_test_and_its_children(tmp_path: Path, env: SuiteEnvironment) -> None:
    pidfile = tmp_path / "child.pid"
    body = f"""
    child = subprocess.Popen(['sleep', '300'])
    open({str(pidfile)!r}, 'w').write(str(child.pid))
    child.wait()
    """
    start = time.monotonic()
    outcome = run_test(script(tmp_path, "hangs", body, ""), env, timeout=2)
    assert time.monotonic() - start < 30
    assert (outcome.status, outcome.description) == (Status.FAIL, "timed out after 2 s")
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"child {child} of the timed-out test still alive")


def test_not_executable_fails(tmp_path: Path, env: SuiteEnvironment) -> None:
    test = script(tmp_path, "plain", "print('x')\n", "x\n")
    test.path.chmod(0o644)
    outcome = run_test(test, env)
    assert outcome.status is Status.FAIL
    assert outcome.description.startswith("not executable")
