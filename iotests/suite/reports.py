"""How results are told: the iotests console lines, TAP and JUnit XML.

The console format copies QEMU's check so that people used to it read ours at a glance;
TAP and JUnit are for CI systems. A test that did not run is reported as skipped in
both formats, never as passed.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .execution import Outcome, Status

SUITE_NAME = "qsnap-iotests"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _xml_text(text: str) -> str:
    """``text`` without the control characters XML 1.0 cannot carry (QEMU may print some)."""
    return _NOT_XML.sub("?", text)


def status_line(outcome: Outcome, width: int, start: str, end: str) -> str:
    """One result line, as QEMU's check prints it when a test finishes."""
    took = f"{outcome.elapsed:.1f}s" if outcome.elapsed is not None else "..."
    return (
        f"{outcome.test.name:{width}} {outcome.status.value:10} [{start}] "
        f"{f'[{end}]':13}{took:5} {outcome.description}"
    ).rstrip()


def counts(outcomes: Sequence[Outcome]) -> Counter[Status]:
    """How many tests ended in each status."""
    return Counter(o.status for o in outcomes)


def counts_line(outcomes: Sequence[Outcome]) -> str:
    """The plain one-line summary: ``N passed, N failed, N not run``."""
    c = counts(outcomes)
    return f"{c[Status.PASS]} passed, {c[Status.FAIL]} failed, {c[Status.NOT_RUN]} not run"


def summary(outcomes: Sequence[Outcome]) -> list[str]:
    """QEMU's closing lines (not run, cases not run, failures), then the counts line."""
    lines: list[str] = []
    notrun = [o.test.name for o in outcomes if o.status is Status.NOT_RUN]
    failed = [o.test.name for o in outcomes if o.status is Status.FAIL]
    casenotrun = [o.test.name for o in outcomes if o.case_notrun]
    ran = len(outcomes) - len(notrun)
    if notrun:
        lines.append("Not run: " + " ".join(notrun))
    if casenotrun:
        lines.append("Some cases not run in: " + " ".join(casenotrun))
    if failed:
        lines.append("Failures: " + " ".join(failed))
        lines.append(f"Failed {len(failed)} of {ran} iotests")
    else:
        lines.append(f"Passed all {ran} iotests")
    lines.append(counts_line(outcomes))
    return lines


def tap(outcomes: Sequence[Outcome]) -> str:
    """A TAP version 13 document; failures carry their diff as comment lines."""
    lines = ["TAP version 13", f"1..{len(outcomes)}"]
    for number, o in enumerate(outcomes, 1):
        if o.status is Status.PASS:
            lines.append(f"ok {number} - {o.test.name}")
        elif o.status is Status.NOT_RUN:
            lines.append(f"ok {number} - {o.test.name} # SKIP {o.description}")
        else:
            lines.append(f"not ok {number} - {o.test.name}")
            lines.append(f"# {o.description}")
            lines.extend(f"# {ln}" for ln in o.diff)
    return "\n".join(lines) + "\n"


def junit(outcomes: Sequence[Outcome], suite_name: str = SUITE_NAME) -> ET.ElementTree[ET.Element]:
    """A JUnit XML tree: one testcase per test, failures with diff, not-run as skipped."""
    c = counts(outcomes)
    total = sum(o.elapsed or 0.0 for o in outcomes)
    root = ET.Element("testsuites")
    suite = ET.SubElement(
        root,
        "testsuite",
        name=suite_name,
        tests=str(len(outcomes)),
        failures=str(c[Status.FAIL]),
        errors="0",
        skipped=str(c[Status.NOT_RUN]),
        time=f"{total:.1f}",
    )
    for o in outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=suite_name,
            name=o.test.name,
            time=f"{o.elapsed or 0.0:.1f}",
        )
        if o.status is Status.FAIL:
            failure = ET.SubElement(case, "failure", message=_xml_text(o.description))
            failure.text = _xml_text("\n".join(o.diff))
        elif o.status is Status.NOT_RUN:
            ET.SubElement(case, "skipped", message=_xml_text(o.description))
        if o.output:
            ET.SubElement(case, "system-out").text = _xml_text(o.output)
    ET.indent(root)
    return ET.ElementTree(root)


def write_tap(outcomes: Sequence[Outcome], path: Path) -> None:
    """Write :func:`tap` to ``path``."""
    path.write_text(tap(outcomes), encoding="utf-8")


def write_junit(outcomes: Sequence[Outcome], path: Path) -> None:
    """Write :func:`junit` to ``path``."""
    junit(outcomes).write(path, encoding="utf-8", xml_declaration=True)
