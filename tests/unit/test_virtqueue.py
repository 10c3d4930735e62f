"""SplitQueue against a device model that reads the rings as the virtio spec lays them out.

The model is written from the specification (descriptor table, available ring, used ring,
16-bit indices), not from SplitQueue: it parses the shared memory itself.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsnap.image.virtqueue import RingLayout, Segment, SplitQueue, Used, VirtqueueError

NEXT, WRITE = 1, 2


class Device:
    """Pops available chains and completes them in any order the test picks."""

    def __init__(self, mem: bytearray, layout: RingLayout) -> None:
        self.mem, self.layout = mem, layout
        self.last_avail = 0
        self.used_idx = 0

    def pop(self) -> list[tuple[int, list[Segment]]]:
        lay, mem = self.layout, self.mem
        (avail_idx,) = struct.unpack_from("<H", mem, lay.avail + 2)
        chains = []
        while self.last_avail != avail_idx:
            (head,) = struct.unpack_from(
                "<H", mem, lay.avail + 4 + 2 * (self.last_avail % lay.size)
            )
            segments, d = [], head
            for _ in range(lay.size):
                addr, length, flags, nxt = struct.unpack_from("<QIHH", mem, lay.desc + 16 * d)
                segments.append(Segment(addr, length, bool(flags & WRITE)))
                if not flags & NEXT:
                    break
                d = nxt
            else:
                raise AssertionError("descriptor loop")
            chains.append((head, segments))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chains

    def complete(self, head: int, written: int) -> None:
        lay = self.layout
        slot = self.used_idx % lay.size
        struct.pack_into("<II", self.mem, lay.used + 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, lay.used + 2, self.used_idx)


segments = st.lists(
    st.builds(Segment, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.booleans()),
    min_size=1,
    max_size=4,
)


@settings(max_examples=80, deadline=None)
@given(
    size=st.sampled_from([4, 8, 16]),
    rounds=st.lists(
        st.tuples(st.lists(segments, max_size=4), st.randoms(use_true_random=False)),
        max_size=30,
    ),
)
def test_chains_reach_the_device_and_come_back_in_its_order(
    size: int, rounds: list[tuple[list[list[Segment]], random.Random]]
) -> None:
    layout = RingLayout.at(64, size)
    mem = bytearray(layout.end + 64)
    queue = SplitQueue(mem, layout)
    device = Device(mem, layout)
    outstanding: dict[int, list[Segment]] = {}
    for chains, rnd in rounds:
        for chain in chains:
            if len(chain) > queue.free:
                with pytest.raises(ValueError, match="free"):
                    queue.add(chain)
                continue
            head = queue.add(chain)
            assert head not in outstanding
            outstanding[head] = chain
        for head, seen in device.pop():
            assert seen == outstanding[head]
        # The device finishes a random subset, in a random order.
        finished = rnd.sample(sorted(outstanding), rnd.randint(0, len(outstanding)))
        for n, head in enumerate(finished):
            device.complete(head, n)
        assert queue.collect() == [Used(h, n) for n, h in enumerate(finished)]
        for head in finished:
            del outstanding[head]
        assert queue.outstanding == len(outstanding)
        assert queue.free == size - sum(map(len, outstanding.values()))
    assert queue.collect() == []


def test_layout_matches_the_spec_alignment_and_sizes() -> None:
    lay = RingLayout.at(1, 256)
    assert lay.desc == 16  # 16-byte aligned descriptor table
    assert lay.avail == 16 + 16 * 256
    assert lay.used % 4 == 0 and lay.used >= lay.avail + 4 + 2 * 256 + 2
    assert lay.end == lay.used + 4 + 8 * 256 + 2
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError, match="power of two"):
            RingLayout.at(0, bad)


def _queue_with_one_chain() -> tuple[bytearray, RingLayout, SplitQueue, int]:
    layout = RingLayout.at(0, 8)
    mem = bytearray(layout.end)
    queue = SplitQueue(mem, layout)
    return mem, layout, queue, queue.add([Segment(0, 16), Segment(4096, 512, True)])


def test_used_entry_that_is_not_a_head_is_refused() -> None:
    mem, layout, queue, head = _queue_with_one_chain()
    Device(mem, layout).complete(head + 1, 0)  # the chain's second descriptor
    with pytest.raises(VirtqueueError, match="not a head"):
        queue.collect()


def test_used_index_beyond_what_was_made_available_is_refused() -> None:
    mem, layout, queue, _ = _queue_with_one_chain()
    struct.pack_into("<H", mem, layout.used + 2, 2)
    with pytest.raises(VirtqueueError, match="outstanding"):
        queue.collect()


def test_memory_must_be_writable_and_large_enough() -> None:
    layout = RingLayout.at(0, 8)
    with pytest.raises(ValueError):
        SplitQueue(bytes(layout.end), layout)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SplitQueue(bytearray(layout.end - 1), layout)
