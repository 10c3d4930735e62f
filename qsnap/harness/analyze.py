"""QEMU's own scripts/analyze-migration.py as an independent judge of device state.

qsnap stores the device state as opaque bytes; whether a revert restores it faithfully is
best judged by QEMU's own analyzer, which decodes every device field from the vmstate
description at the end of a stream. It needs that description (the vmdesc after EOF) at
the end of a seekable file, so it cannot read postcopy streams or streams without vmdesc,
nor XBZRLE pages or strings longer than 127 bytes. Its `-m` option crashes under Python 3
in QEMU 10.0 and is never used here.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsnap.harness.project_scripts import SOURCE_TREE, ScriptError, run_for_path
from qsnap.stream import StreamError, split_device_state_tail

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 600.0
"""Seconds ci/fetch-qemu-source may take (a 39 MB download and unpacking, done once)."""

VMDESC_WINDOW = 10 << 20
"""analyze-migration.py looks for the vmdesc in the last 10 MiB of a stream."""

_SCRIPT = Path("scripts") / "analyze-migration.py"
_FETCH = SOURCE_TREE / "ci" / "fetch-qemu-source"

JsonPath = tuple[str | int, ...]


class AnalyzeError(Exception):
    """The analyzer could not be found or could not parse a stream."""


def find_qemu_source(explicit: str | os.PathLike[str] | None = None) -> Path:
    """A QEMU source tree: `explicit`, else `QSNAP_QEMU_SRC`, else `ci/fetch-qemu-source`.

    The last one downloads and caches Debian's upstream tarball when missing.
    """
    wanted = explicit if explicit is not None else os.environ.get("QSNAP_QEMU_SRC")
    if wanted:
        tree = Path(wanted)
        origin = "argument" if explicit is not None else "QSNAP_QEMU_SRC"
    else:
        if not _FETCH.is_file():
            raise AnalyzeError(
                f"no QEMU source tree: set QSNAP_QEMU_SRC ({_FETCH} is not available)"
            )
        try:
            tree = run_for_path([_FETCH], FETCH_TIMEOUT)
        except ScriptError as exc:
            raise AnalyzeError(str(exc)) from None
        origin = _FETCH.name
    if not (tree / _SCRIPT).is_file():
        raise AnalyzeError(f"{tree} (from {origin}): no {_SCRIPT} in it")
    return tree


def analyze_script(qemu_src: str | os.PathLike[str] | None = None) -> Path:
    """The path of analyze-migration.py in the tree `find_qemu_source` picks."""
    return find_qemu_source(qemu_src) / _SCRIPT


def _run_analyzer(
    stream: str | os.PathLike[str], mode: str, script: Path | None, timeout: float
) -> Any:
    path = Path(stream)
    if not path.is_file():
        raise AnalyzeError(f"{path}: not a file (analyze-migration needs a seekable file)")
    _check_vmdesc(path)
    script = script if script is not None else analyze_script()
    argv = [sys.executable, os.fspath(script), "-f", os.fspath(path), "-d", mode]
    log.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AnalyzeError(f"{path}: analyze-migration gave no result in {timeout:g} s") from None
    if proc.returncode != 0:
        raise AnalyzeError(f"{path}: analyze-migration failed: {_analyzer_error(proc.stderr)}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AnalyzeError(f"{path}: analyze-migration output is not JSON ({exc})") from None


def _check_vmdesc(path: Path) -> None:
    """Refuse a stream without a vmdesc at its end with a clear message.

    The analyzer would fail with a bare OSError or JSON error; it looks for the vmdesc
    in the last 10 MiB, and so does this check.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - VMDESC_WINDOW))
        tail = f.read()
    try:
        end = split_device_state_tail(tail, size)
    except StreamError as exc:
        raise AnalyzeError(f"{path}: {exc}: analyze-migration needs the vmdesc") from None
    if end.vmdesc_length is None:
        raise AnalyzeError(f"{path}: no VMDESCRIPTION at the end (analyze-migration needs it)")


def device_state(
    stream: str | os.PathLike[str], script: Path | None = None, timeout: float = 300.0
) -> dict[str, Any]:
    """`analyze-migration.py -d state` of a stream file: sections keyed "idstr (id)"."""
    state = _run_analyzer(stream, "state", script, timeout)
    if not isinstance(state, dict):
        raise AnalyzeError(f"{stream}: analyze-migration state is not a JSON object")
    return state


def vmstate_description(
    stream: str | os.PathLike[str], script: Path | None = None, timeout: float = 300.0
) -> dict[str, Any]:
    """`analyze-migration.py -d desc`: the vmdesc JSON QEMU wrote after EOF."""
    desc = _run_analyzer(stream, "desc", script, timeout)
    if not isinstance(desc, dict):
        raise AnalyzeError(f"{stream}: analyze-migration description is not a JSON object")
    return desc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no message)"


def _analyzer_error(stderr: str) -> str:
    """The analyzer's own exception line.

    On any error the script re-raises with the whole vmdesc JSON as the message, so the
    useful line is the last one of the first traceback, not the end of stderr.
    """
    first, sep, _ = stderr.partition("During handling of the above exception")
    return _last_line(first if sep else stderr)


class DiffKind(enum.Enum):
    """How a value differs between the left and the right JSON document."""

    CHANGED = "changed"
    MISSING = "missing"  # only on the left
    EXTRA = "extra"  # only on the right


@dataclass(frozen=True, slots=True)
class StateDifference:
    """One differing value; `path` is the list of keys and indices leading to it."""

    path: JsonPath
    kind: DiffKind
    left: object = None
    right: object = None

    @property
    def where(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        if self.kind is DiffKind.MISSING:
            return f"{self.where}: only in the first"
        if self.kind is DiffKind.EXTRA:
            return f"{self.where}: only in the second"
        return f"{self.where}: {_short(self.left)} != {_short(self.right)}"


def format_path(path: JsonPath) -> str:
    """`["timer (1)"]["cpu_ticks_offset"][0]`: keys quoted, unambiguous with any idstr."""
    return "".join(f"[{json.dumps(p)}]" if isinstance(p, str) else f"[{p}]" for p in path)


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff_state(
    left: object, right: object, ignore: Collection[str | re.Pattern[str]] = ()
) -> list[StateDifference]:
    """Every leaf that differs between two JSON documents, in document order.

    `ignore` holds regular expressions searched in `format_path` of each path; a match
    skips that path and everything below it (e.g. timers that differ between any two runs).
    """
    patterns = [re.compile(p) if isinstance(p, str) else p for p in ignore]
    return list(_diff((), left, right, patterns))


def _diff(
    path: JsonPath, left: object, right: object, ignore: list[re.Pattern[str]]
) -> Iterator[StateDifference]:
    if _ignored(path, ignore):
        return
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        for key in left:
            if key in right:
                yield from _diff((*path, key), left[key], right[key], ignore)
            elif not _ignored((*path, key), ignore):
                yield StateDifference((*path, key), DiffKind.MISSING, left=left[key])
        for key in right:
            if key not in left and not _ignored((*path, key), ignore):
                yield StateDifference((*path, key), DiffKind.EXTRA, right=right[key])
    elif isinstance(left, list) and isinstance(right, list):
        for index in range(max(len(left), len(right))):
            if _ignored((*path, index), ignore):
                continue
            if index >= len(right):
                yield StateDifference((*path, index), DiffKind.MISSING, left=left[index])
            elif index >= len(left):
                yield StateDifference((*path, index), DiffKind.EXTRA, right=right[index])
            else:
                yield from _diff((*path, index), left[index], right[index], ignore)
    elif type(left) is not type(right) or left != right:
        yield StateDifference(path, DiffKind.CHANGED, left, right)


def _ignored(path: JsonPath, ignore: list[re.Pattern[str]]) -> bool:
    return bool(ignore) and any(p.search(format_path(path)) for p in ignore)
