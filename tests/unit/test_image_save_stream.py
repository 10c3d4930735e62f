"""qsnap.save's stream handling against a recording writer (no QEMU, no image).

Streams are generated with qsnap.stream's encoder and fed in arbitrary chunks; what the
writer receives must be exactly the stream's parts: prologue and RAM START bytes
verbatim, every page, the device state to the last byte, and the EOF boundary.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qsnap.image.writer import ImageWriter, RamSetup, StreamPrologue
from qsnap.save import SaveError, StreamSaver
from qsnap.stream import RamEncoder, StreamError, encode, encode_footer
from qsnap.stream import records as r

PAGE = 4096


@dataclass
class Recorder:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    device: bytearray = field(default_factory=bytearray)

    def start_ram(self, head: StreamPrologue, setup: RamSetup) -> None:
        self.calls.append(("ram", head, setup))

    def page(self, block: str, offset: int, data: bytes) -> None:
        self.calls.append(("page", block, offset, bytes(data)))

    def zero(self, block: str, offset: int, page_size: int) -> None:
        self.calls.append(("zero", block, offset))

    def pages(self, block: str, offset: int, pages: tuple[memoryview, ...]) -> None:
        for i, data in enumerate(pages):
            self.page(block, offset + i * len(data), bytes(data))

    def zeros(self, block: str, offset: int, count: int, page_size: int) -> None:
        for i in range(count):
            self.zero(block, offset + i * page_size, page_size)

    def start_device_state(self, head: StreamPrologue) -> None:
        self.calls.append(("device", head))

    def device_state(self, data: bytes) -> None:
        self.device += data


@dataclass
class Stream:
    data: bytes
    prologue: bytes
    ram_start: bytes
    pages: list[tuple[Any, ...]]
    device: bytes
    sections: int


@st.composite
def streams(draw: st.DrawFn, device: bool = True) -> Stream:
    names = draw(st.lists(st.sampled_from(["pc.ram", "vga", "rom"]), min_size=1, unique=True))
    sizes = {n: draw(st.integers(1, 8)) * PAGE for n in names}
    prologue = encode(r.StreamHeader()) + encode(r.Configuration("pc-i440fx-10.0"))
    blocks = tuple(r.RamBlockInfo(n, sizes[n]) for n in names)
    ram_start = (
        encode(r.SectionStart(2, "ram", 0, 4))
        + encode(r.RamMemSize(blocks))
        + encode(r.RamEos())
        + encode_footer(2)
    )
    ram = RamEncoder(PAGE)
    body = b""
    pages: list[tuple[Any, ...]] = []
    order = draw(st.permutations([(n, off) for n in names for off in range(0, sizes[n], PAGE)]))
    for i, (name, off) in enumerate(order):
        if i % 3 == 0:
            body += encode(r.RamEos()) + encode_footer(2) + encode(r.SectionPart(2))
        if draw(st.booleans()):
            data = draw(st.binary(min_size=PAGE, max_size=PAGE))
            body += ram.page(name, off, data)
            pages.append(("page", name, off, data))
        else:
            body += ram.zero(name, off)
            pages.append(("zero", name, off))
    parts = encode(r.SectionPart(2)) + body + encode(r.RamEos()) + encode_footer(2)
    if not device:
        return Stream(prologue + ram_start + parts + b"\x00", prologue, ram_start, pages, b"", 0)
    sections = (
        encode(r.SectionFull(3, "timer", 0, 2)) + draw(st.binary(max_size=300)) + encode_footer(3)
    )
    vmdesc = json.dumps({"page_size": PAGE, "devices": [{"name": "timer"}]}).encode()
    tail = sections + b"\x00\x06" + struct.pack(">I", len(vmdesc)) + vmdesc
    data = prologue + ram_start + parts + tail
    return Stream(data, prologue, ram_start, pages, tail, len(sections))


def feed(saver: StreamSaver, data: bytes, cuts: list[int]) -> None:
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > pos:
            saver.feed(data[pos:cut])
            pos = cut
    saver.close()


def saver(vmstate_only: bool = False) -> tuple[StreamSaver, Recorder]:
    rec = Recorder()
    return StreamSaver(cast(ImageWriter, rec), vmstate_only=vmstate_only, page_size=PAGE), rec


@settings(max_examples=60, deadline=None)
@given(streams(), st.lists(st.integers(0, 20000), max_size=12))
def test_full_stream_parts_reach_the_writer_verbatim(stream: Stream, cuts: list[int]) -> None:
    s, rec = saver()
    feed(s, stream.data, cuts)
    kind, head, setup = rec.calls[0]
    assert kind == "ram"
    assert head.prologue == stream.prologue and head.machine_type == "pc-i440fx-10.0"
    assert setup.raw == stream.ram_start
    assert (setup.section_id, setup.instance_id, setup.version_id) == (2, 0, 4)
    assert rec.calls[1:-1] == stream.pages
    assert rec.calls[-1] == ("device", head)
    assert bytes(rec.device) == stream.device
    assert s.device_sections_length == stream.sections


@settings(max_examples=30, deadline=None)
@given(streams(device=False), st.lists(st.integers(0, 20000), max_size=6))
def test_ram_only_stream_ends_at_eof(stream: Stream, cuts: list[int]) -> None:
    s, rec = saver()
    feed(s, stream.data, cuts)
    assert rec.calls[1:] == stream.pages
    assert rec.device == b"" and s.device_sections_length is None


@settings(max_examples=30, deadline=None)
@given(streams(), st.integers(1, 10**9))
def test_any_truncation_is_an_error(stream: Stream, seed: int) -> None:
    cut = seed % len(stream.data)
    # Device sections are opaque: a cut right after a 0x00 there reads as a stream that
    # ends with EOF and no vmdesc (QEMU's suppress-vmdesc), which is not detectable.
    assume(cut <= len(stream.data) - len(stream.device) or stream.data[cut - 1] != 0)
    s, _ = saver()
    with pytest.raises(StreamError, match=r"truncated|without EOF"):
        feed(s, stream.data[:cut], [])


@given(streams())
def test_vmstate_only_stream_and_its_refusals(stream: Stream) -> None:
    vmstate = stream.prologue + stream.device
    s, rec = saver(vmstate_only=True)
    feed(s, vmstate, [len(stream.prologue) + 1])
    assert rec.calls == [("device", rec.calls[0][1])]
    assert rec.calls[0][1].prologue == stream.prologue
    assert bytes(rec.device) == stream.device
    assert s.device_sections_length == stream.sections
    s, _ = saver()
    with pytest.raises(SaveError, match=r"no RAM section .* --save-vmstate"):
        feed(s, vmstate, [])
    s, _ = saver(vmstate_only=True)
    with pytest.raises(SaveError, match="--save-vmstate expects a vmstate-only stream"):
        feed(s, stream.data, [])
