"""`qsnap analyze`: page accounting of generated streams against what the generator chose."""

from __future__ import annotations

import io
import json
from collections import Counter

from hypothesis import given, settings
from stream_strategies import GeneratedStream, valid_streams

from qsnap.analyze import analyze_stream
from qsnap.stream import encode
from qsnap.stream import records as r


def _tally(gen: GeneratedStream) -> dict[str, tuple[int, int, int, int]]:
    """(data, zero, repeated, missing) per block, from the generator's own records."""
    mem = next(rec for rec in gen.records if isinstance(rec, r.RamMemSize))
    page_size = 4096
    for rec in gen.records:
        if isinstance(rec, r.Configuration):
            for sub in rec.subsections:
                if isinstance(sub, r.TargetPageBits):
                    page_size = 1 << sub.bits
    sent: dict[str, Counter[int]] = {b.idstr: Counter() for b in mem.blocks}
    kinds: dict[str, Counter[str]] = {b.idstr: Counter() for b in mem.blocks}
    for rec in gen.records:
        if isinstance(rec, r.RamPage | r.RamZero):
            sent[rec.block][rec.offset] += 1
            kinds[rec.block]["zero" if isinstance(rec, r.RamZero) else "data"] += 1
    result = {}
    for b in mem.blocks:
        pages = b.used_length // page_size
        repeated = sum(n - 1 for n in sent[b.idstr].values())
        result[b.idstr] = (
            kinds[b.idstr]["data"],
            kinds[b.idstr]["zero"],
            repeated,
            pages - len(sent[b.idstr]),
        )
    return result


@settings(max_examples=150)
@given(valid_streams())
def test_every_block_is_accounted_as_generated(gen: GeneratedStream) -> None:
    summary = analyze_stream(io.BytesIO(gen.data), "gen", gen.options)
    assert summary.error is None
    got = {
        b.idstr: (b.data_pages, b.zero_pages, b.repeated_pages, b.missing_pages)
        for b in summary.blocks
    }
    expected = _tally(gen)
    assert got == expected
    assert summary.complete == all(rep == 0 and miss == 0 for *_, rep, miss in expected.values())
    commands = Counter(type(rec).__name__ for rec in gen.records if isinstance(rec, r.Command))
    assert sum(summary.commands.values()) == sum(commands.values())


def test_truncated_stream_is_an_error_and_incomplete() -> None:
    blocks = (r.RamBlockInfo("pc.ram", 2 * 4096),)
    data = b"".join(
        encode(rec)
        for rec in (
            r.StreamHeader(),
            r.Configuration("pc-i440fx-10.0"),
            r.SectionStart(2, "ram", 0, 4),
            r.RamMemSize(blocks),
            r.RamEos(),
            r.SectionFooter(2),
            r.SectionPart(2),
            r.RamZero("pc.ram", 0, False),
        )
    )
    summary = analyze_stream(io.BytesIO(data), "cut")
    assert not summary.complete
    assert summary.error is not None and f"byte {len(data)}" in summary.error
    (block,) = summary.blocks
    assert (block.zero_pages, block.missing_pages, block.first_missing) == (1, 1, 4096)


def test_vmdesc_devices_are_listed() -> None:
    vmdesc = json.dumps(
        {"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "version": 2}]}
    ).encode()
    data = b"".join(
        encode(rec)
        for rec in (
            r.StreamHeader(),
            r.Configuration("pc-i440fx-10.0"),
            r.SectionStart(2, "ram", 0, 4),
            r.RamMemSize((r.RamBlockInfo("pc.ram", 4096),)),
            r.RamEos(),
            r.SectionFooter(2),
            r.SectionPart(2),
            r.RamZero("pc.ram", 0, False),
            r.RamEos(),
            r.SectionFooter(2),
            r.Eof(),
            r.VmDescription(vmdesc),
        )
    )
    summary = analyze_stream(io.BytesIO(data), "s")
    assert summary.complete
    assert summary.devices == ["timer/0 (version 2)"]
    assert summary.vmdesc_length == len(vmdesc)
