"""Hypothesis strategies for valid migration streams and their records."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import strategies as st

from qsnap.stream import StreamOptions, encode
from qsnap.stream import records as r

idstrs = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24
)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@dataclass(frozen=True)
class GeneratedStream:
    """A valid stream: its records, the options to read it, and its bytes.

    ``device`` is the opaque device part (raw mode) or b"" when the stream has
    none; ``complete_at`` is the smallest length of a prefix that may parse
    without error (every shorter prefix is truncated).
    """

    records: tuple[r.Record, ...]
    options: StreamOptions
    data: bytes
    device: bytes
    complete_at: int
    eof_offset: int | None


def _page_data(page_size: int) -> st.SearchStrategy[bytes]:
    return st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(page_size))


commands: st.SearchStrategy[r.CommandRecord] = st.one_of(
    st.just(r.OpenReturnPath()),
    st.builds(r.Ping, u32),
    st.just(r.PostcopyAdvise(None, None)),
    st.builds(r.PostcopyAdvise, u64, u64),
    st.just(r.PostcopyListen()),
    st.just(r.PostcopyRun()),
    st.builds(
        r.PostcopyRamDiscard,
        idstrs,
        st.lists(st.tuples(u64, u64), min_size=1, max_size=12).map(tuple),
    ),
    st.builds(r.Packaged, st.binary(max_size=64)),
    st.just(r.EnableColo()),
    st.just(r.PostcopyResume()),
    st.builds(r.RecvBitmap, idstrs),
    st.just(r.SwitchoverStart()),
)


@st.composite
def configurations(draw: st.DrawFn) -> r.Configuration:
    subs: list[r.ConfigSubsection] = []
    if draw(st.booleans()):
        subs.append(r.TargetPageBits(draw(st.sampled_from([10, 12, 13, 14]))))
    if draw(st.booleans()):
        names = draw(
            st.lists(st.sampled_from(["x-ignore-shared", "validate-uuid", "colo"]), unique=True)
        )
        subs.append(r.Capabilities(tuple(names)))
    if draw(st.booleans()):
        subs.append(r.Uuid(draw(st.binary(min_size=16, max_size=16))))
    subs = draw(st.permutations(subs))
    machine = draw(st.sampled_from(["pc-i440fx-10.0", "pc-q35-10.0", "", "x" * 256]))
    return r.Configuration(machine, tuple(subs))


@st.composite
def valid_streams(draw: st.DrawFn, max_pages: int = 40) -> GeneratedStream:
    """Header, configuration, commands, RAM START, PART/END sections, then either
    EOF [+ vmdesc] or a device part passed through raw."""
    config = draw(configurations())
    page_size = 4096
    ignore_shared = False
    for sub in config.subsections:
        if isinstance(sub, r.TargetPageBits):
            page_size = 1 << sub.bits
        if isinstance(sub, r.Capabilities):
            ignore_shared = "x-ignore-shared" in sub.names
    carry_page_size = draw(st.booleans())
    options = StreamOptions(block_page_sizes=carry_page_size)
    names = draw(st.lists(idstrs, min_size=1, max_size=4, unique=True))
    blocks = tuple(
        r.RamBlockInfo(
            name,
            page_size * draw(st.integers(1, 8)),
            draw(u64) if carry_page_size else None,
            draw(u64) if ignore_shared else None,
        )
        for name in names
    )
    ram_id = draw(u32)
    recs: list[r.Record] = [r.StreamHeader(), config]
    recs += draw(st.lists(commands, max_size=3))
    recs += [r.SectionStart(ram_id, "ram", 0, 4), r.RamMemSize(blocks), r.RamEos()]
    recs.append(r.SectionFooter(ram_id))
    last: str | None = None
    data_pages = draw(st.lists(_page_data(page_size), min_size=1, max_size=3))
    for _ in range(draw(st.integers(0, 4))):
        end_section = draw(st.booleans())
        recs.append(r.SectionEnd(ram_id) if end_section else r.SectionPart(ram_id))
        for _ in range(draw(st.integers(0, max_pages // 4))):
            kind = draw(st.sampled_from(["page", "zero", "flush"]))
            if kind == "flush":
                recs.append(r.RamMultifdFlush())
                continue
            block = draw(st.sampled_from(blocks))
            offset = page_size * draw(st.integers(0, block.used_length // page_size - 1))
            continued = block.idstr == last and draw(st.booleans())
            last = block.idstr
            if kind == "page":
                recs.append(
                    r.RamPage(block.idstr, offset, draw(st.sampled_from(data_pages)), continued)
                )
            else:
                recs.append(r.RamZero(block.idstr, offset, continued))
        recs += [r.RamEos(), r.SectionFooter(ram_id)]
        recs += draw(st.lists(commands, max_size=2))
    prologue = b"".join(encode(rec) for rec in recs)
    device = b""
    eof_offset = None
    if draw(st.booleans()):
        complete_at = len(prologue) + 1
        recs.append(r.Eof())
        if draw(st.booleans()):
            recs.append(r.VmDescription(draw(st.binary(max_size=64))))
    else:
        section = r.SectionFull(draw(u32), draw(idstrs.filter(lambda s: s != "ram")), 0, 1)
        json = draw(st.binary(min_size=1, max_size=64).map(lambda b: b.replace(b"\0", b" ")))
        body = encode(section) + draw(st.binary(max_size=200))
        eof_offset = len(prologue) + len(body)
        device = body + b"\0" + (encode(r.VmDescription(json)) if draw(st.booleans()) else b"")
        recs.append(r.DeviceStateStart(len(prologue), section))
        complete_at = len(prologue)
    data = b"".join(encode(rec) for rec in recs) + device
    return GeneratedStream(tuple(recs), options, data, device, complete_at, eof_offset)


@st.composite
def chunkings(draw: st.DrawFn, length: int) -> list[int]:
    """Cut points splitting ``length`` bytes into chunks of arbitrary sizes."""
    cuts = draw(st.lists(st.integers(0, length), max_size=12))
    return sorted(set(cuts))
