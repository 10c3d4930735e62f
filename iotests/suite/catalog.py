"""Which tests exist and which of them a run selects.

The rules are those of QEMU's tests/qemu-iotests/findtests.py: a test is an executable
file with a golden ``NAME.out`` beside it, its groups come from the first ``# group:``
line, and selection by names, ``-g`` and ``-x`` (with the implicit ``disabled`` group)
means the same here as in QEMU's ``./check``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

GROUP_PREFIX = "# group: "
REFERENCE_SUFFIX = ".out"
DISABLED_GROUP = "disabled"
TESTS_DIR = Path(__file__).resolve().parent.parent / "tests"


class SelectionError(ValueError):
    """A test or group selection that names nothing, or contradicts itself."""


@dataclass(frozen=True)
class TestScript:
    """One test: its executable and the groups its header puts it in."""

    name: str
    path: Path
    groups: frozenset[str]

    @property
    def reference(self) -> Path:
        """The golden output the test's output is compared with."""
        return self.path.with_name(self.name + REFERENCE_SUFFIX)


def read_groups(path: Path) -> frozenset[str]:
    """Groups named by the first ``# group:`` line (none if there is no such line)."""
    with path.open(encoding="utf-8") as script:
        for line in script:
            if line.startswith(GROUP_PREFIX):
                return frozenset(line.split()[2:])
    return frozenset()


def load(path: Path) -> TestScript:
    """The test at ``path``; it must have its golden output beside it."""
    script = TestScript(path.name, path.resolve(), read_groups(path))
    if not script.reference.is_file():
        raise SelectionError(f"{path}: no golden output {script.reference.name} beside it")
    return script


def discover(tests_dir: Path = TESTS_DIR) -> dict[str, TestScript]:
    """Every test in ``tests_dir``, by name."""
    if not tests_dir.is_dir():
        raise SelectionError(f"{tests_dir}: no such directory")
    found: dict[str, TestScript] = {}
    for path in sorted(tests_dir.iterdir()):
        if path.name.endswith(REFERENCE_SUFFIX) or not path.is_file():
            continue
        if path.with_name(path.name + REFERENCE_SUFFIX).is_file():
            found[path.name] = load(path)
    return found


def _lookup(catalog: dict[str, TestScript], name: str) -> TestScript:
    # A path such as iotests/tests/NAME is accepted too: shells complete those.
    key = Path(name).name
    try:
        return catalog[key]
    except KeyError:
        raise SelectionError(f'Test "{name}" is not found') from None


def select(
    catalog: dict[str, TestScript],
    *,
    names: Sequence[str] = (),
    groups: Iterable[str] = (),
    exclude_groups: Iterable[str] = (),
) -> list[TestScript]:
    """The tests to run, sorted by name, selected as QEMU's findtests does.

    With groups: their tests minus the excluded groups, plus the named tests.
    With names only: exactly those (excluding groups is then an error).
    With neither: every test minus the excluded groups. The ``disabled`` group is
    excluded unless it is asked for.
    """
    groups = list(groups)
    exclude = list(exclude_groups)
    chosen: set[str] = set()
    if groups:
        chosen = {t.name for t in catalog.values() if t.groups.intersection(groups)}
    elif names:
        if exclude:
            raise SelectionError("Can't exclude from individually specified tests.")
    else:
        chosen = set(catalog)
    if DISABLED_GROUP not in groups and DISABLED_GROUP not in exclude:
        exclude.append(DISABLED_GROUP)
    chosen = {n for n in chosen if not catalog[n].groups.intersection(exclude)}
    chosen.update(_lookup(catalog, n).name for n in names)
    if not chosen:
        raise SelectionError("No tests selected")
    return [catalog[n] for n in sorted(chosen)]
