"""Finding EOF + VMDESCRIPTION at the end of the device state, from its last bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.stream import DeviceStateEnd, DeviceStateEndTracker, StreamError, split_device_state_tail

json_texts = st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"}"))


def ending(json: bytes | None) -> bytes:
    if json is None:
        return b"\x00"
    return b"\x00\x06" + struct.pack(">I", len(json)) + json


@given(st.binary(max_size=300), st.one_of(st.none(), json_texts), st.integers(0, 10_000))
def test_split_finds_the_boundary(device: bytes, json: bytes | None, before: int) -> None:
    data = device + ending(json)
    total = before + len(data)
    expected = DeviceStateEnd(before + len(device), None if json is None else len(json))
    assert split_device_state_tail(data, total) == expected
    tail_len = len(ending(json))
    assert split_device_state_tail(data[-tail_len:], total) == expected


@given(
    st.binary(max_size=300),
    st.one_of(st.none(), json_texts),
    st.lists(st.integers(1, 50), min_size=1),
)
def test_tracker_at_any_chunking(device: bytes, json: bytes | None, sizes: list[int]) -> None:
    data = device + ending(json)
    tracker = DeviceStateEndTracker(100)
    pos = i = 0
    while pos < len(data):
        tracker.feed(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    assert tracker.end() == DeviceStateEnd(100 + len(device), None if json is None else len(json))


def test_vmdesc_length_with_zero_bytes() -> None:
    json = b"{" + b"x" * 0x10000 + b"}"  # be32 length 00 01 00 02: two NULs after EOF
    data = b"\x04dev\x00ice" + ending(json)
    assert split_device_state_tail(data, len(data)) == DeviceStateEnd(8, len(json))


@pytest.mark.parametrize(
    "tail",
    [b"", b"\x04abc", b"\x00\x06\x00\x00\x00\x05{}", b"\x00\x06\x00\x00\x00\x02{\x00"[:-1] + b"}x"],
)
def test_no_ending(tail: bytes) -> None:
    with pytest.raises(StreamError, match="does not end with EOF") as err:
        split_device_state_tail(tail, 1000)
    assert err.value.offset == 1000


def test_tail_reaching_back_too_little() -> None:
    data = ending(b'{"devices": []}')
    with pytest.raises(StreamError):
        split_device_state_tail(data[3:], 5000)
