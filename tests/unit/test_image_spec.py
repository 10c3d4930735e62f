"""The blockdev spec: seed syntax, comma doubling, JSON form, qemu-storage-daemon args."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.image.spec import FORMAT_NODE, PROTOCOL_NODE, SpecError, format_keyval, parse_spec

names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="="),
    min_size=1,
    max_size=40,
).filter(lambda s: not s.startswith((",", "json:")))  # json: is the JSON form (as in QEMU)


def test_plain_path_is_qcow2_on_file() -> None:
    spec = parse_spec("/tmp/a.qcow2")
    assert spec.filename == "/tmp/a.qcow2"
    assert spec.qsd_blockdev_args(read_only=False) == [
        "--blockdev",
        f"filename=/tmp/a.qcow2,driver=file,node-name={PROTOCOL_NODE}",
        "--blockdev",
        f"driver=qcow2,node-name={FORMAT_NODE},file={PROTOCOL_NODE}",
    ]


def test_seed_options_split_between_nodes() -> None:
    """cache.* reaches the protocol node too, as -drive would pass it on (QEMU refuses
    aio=native on a node without cache.direct=on)."""
    spec = parse_spec("img.qcow2,cache.direct=on,file.aio=native")
    proto, fmt = spec.qsd_blockdev_args(read_only=True)[1::2]
    assert proto == (
        "filename=img.qcow2,aio=native,driver=file,cache.direct=on,"
        f"node-name={PROTOCOL_NODE},read-only=on"
    )
    assert fmt == (
        f"cache.direct=on,driver=qcow2,node-name={FORMAT_NODE},read-only=on,file={PROTOCOL_NODE}"
    )


def test_protocol_cache_options_given_explicitly_win() -> None:
    spec = parse_spec("img.qcow2,cache.direct=on,cache.no-flush=on,file.cache.direct=off")
    proto, fmt = spec.qsd_blockdev_args(read_only=False)[1::2]
    assert "cache.direct=off" in proto.split(",")
    assert "cache.no-flush=on" in proto.split(",")
    assert "cache.direct=on" in fmt.split(",")


def test_raw_driver_and_explicit_protocol() -> None:
    spec = parse_spec("driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=/s")
    proto, fmt = spec.qsd_blockdev_args(read_only=False)[1::2]
    assert proto.startswith("driver=nbd,server.type=unix,server.path=/s,")
    assert fmt.startswith("driver=raw,")


@given(names)
def test_commas_in_file_names_round_trip(name: str) -> None:
    text = name.replace(",", ",,")
    spec = parse_spec(text)
    assert spec.filename == name
    proto = spec.qsd_blockdev_args(read_only=False)[1]
    assert proto.startswith(f"filename={text},")


keys = st.from_regex(r"[a-z][a-z0-9-]{0,6}(\.[a-z][a-z0-9-]{0,6}){0,2}", fullmatch=True)


@given(st.dictionaries(keys.filter(lambda k: k not in ("node-name", "file.filename")), names))
def test_format_keyval_parses_back(options: dict[str, str]) -> None:
    text = "f," + format_keyval(options) if options else "f"
    parsed = dict(parse_spec(text).options)
    assert parsed == {"file.filename": "f", **options}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty image spec"),
        ("a,b", "option 'b' has no '=value'"),
        ("a,x=1,x=2", "option 'x' given twice"),
        ("a,node-name=n", "node-name is reserved"),
        ("a,bad key=1", "invalid option name 'bad key'"),
        ("cache.direct=on", "no image file given"),
        (",driver=raw", "empty file name"),
        ("json:{", "invalid JSON"),
        ("json:[1]", "JSON spec must be an object"),
    ],
)
def test_bad_specs_name_the_fault(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(")) as info:
        parse_spec(text)
    assert "\n" not in str(info.value)


def test_json_spec_passes_through_with_our_node_name() -> None:
    spec = parse_spec('json:{"driver":"qcow2","file":{"driver":"file","filename":"x,y"}}')
    assert spec.filename == "x,y"
    (arg,) = spec.qsd_blockdev_args(read_only=True)[1:]
    assert json.loads(arg) == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "x,y"},
        "node-name": FORMAT_NODE,
        "read-only": True,
    }
