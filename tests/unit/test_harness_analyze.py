"""Device-state JSON comparison (the analyze-migration runner itself is an integration test)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from qsnap.harness.analyze import DiffKind, StateDifference, diff_state, format_path

leaves = st.one_of(st.integers(-(2**63), 2**64), st.text(max_size=8), st.booleans(), st.none())
keys = st.text(alphabet="abcdefghij (0123)/.:_", min_size=1, max_size=10)
documents = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=30,
)


def leaf_paths(doc: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in leaf_paths(v, (*path, k))]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in leaf_paths(v, (*path, i))]
    return [path]


def set_at(doc: Any, path: tuple[str | int, ...], value: object) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


@given(documents)
def test_a_document_equals_its_copy(doc: object) -> None:
    assert diff_state(doc, copy.deepcopy(doc)) == []


@given(st.dictionaries(keys, documents, min_size=1), st.data())
def test_one_changed_leaf_is_named(doc: dict[str, Any], data: st.DataObject) -> None:
    paths = [p for p in leaf_paths(doc) if p]
    if not paths:
        return
    path = data.draw(st.sampled_from(paths))
    changed = copy.deepcopy(doc)
    old: Any = changed
    for step in path:
        old = old[step]
    new = ["changed", old]
    set_at(changed, path, new)
    assert diff_state(doc, changed) == [StateDifference(path, DiffKind.CHANGED, old, new)]


def test_missing_and_extra_keys_and_list_items() -> None:
    left = {"rtc (13)": {"cmos": [1, 2, 3], "gone": 1}, "only-left (2)": {}}
    right = {"rtc (13)": {"cmos": [1, 2], "new": True}, "only-right (3)": 0}
    assert [str(d) for d in diff_state(left, right)] == [
        '["rtc (13)"]["cmos"][2]: only in the first',
        '["rtc (13)"]["gone"]: only in the first',
        '["rtc (13)"]["new"]: only in the second',
        '["only-left (2)"]: only in the first',
        '["only-right (3)"]: only in the second',
    ]


def test_type_changes_count_even_when_python_calls_them_equal() -> None:
    assert [d.kind for d in diff_state({"a": 1}, {"a": True})] == [DiffKind.CHANGED]
    assert [d.kind for d in diff_state({"a": 1}, {"a": 1.0})] == [DiffKind.CHANGED]


def test_ignore_patterns_skip_subtrees() -> None:
    left = {"timer (0)": {"cpu_ticks_offset": 1}, "rtc (13)": {"base": 5, "last_update": 1}}
    right = {"timer (0)": {"cpu_ticks_offset": 2}, "rtc (13)": {"base": 6, "last_update": 2}}
    diffs = diff_state(left, right, ignore=[r'^\["timer \(0\)"\]', "last_update"])
    assert [d.where for d in diffs] == ['["rtc (13)"]["base"]']
    assert str(diffs[0]) == '["rtc (13)"]["base"]: 5 != 6'


def test_format_path_quotes_keys_with_slashes() -> None:
    assert format_path(("0000:00:02.0/vga (21)", "vga", 3)) == '["0000:00:02.0/vga (21)"]["vga"][3]'
    assert format_path(()) == ""
