"""Filters that make tool and QEMU output deterministic for golden `.out` comparison.

In the style of QEMU's tests/qemu-iotests/iotests.py: each filter is a function from
str to str that replaces what legitimately varies between runs (paths, times, rates,
versions) with a fixed placeholder, and leaves everything else byte for byte. Filters
compose with `chain`, and `per_line` applies a line filter to every line.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

Filter = Callable[[str], str]


def chain(*filters: Filter) -> Filter:
    """One filter applying `filters` left to right."""

    def apply(text: str) -> str:
        for f in filters:
            text = f(text)
        return text

    return apply


def per_line(line_filter: Filter) -> Filter:
    """A filter applying `line_filter` to each line (line endings kept)."""

    def apply(text: str) -> str:
        return "".join(
            line_filter(line[:-1]) + "\n" if line.endswith("\n") else line_filter(line)
            for line in text.splitlines(keepends=True)
        )

    return apply


def replace_path(path: str | os.PathLike[str], placeholder: str) -> Filter:
    """A filter replacing `path` (and its resolved form) by `placeholder`.

    Longer spellings go first so that a path inside another one is not half replaced,
    and a match must end at a path boundary (`/tmp/a` does not match `/tmp/ab`).
    """
    spellings = {os.fspath(path).rstrip("/") or "/"}
    spellings.add(os.path.realpath(os.fspath(path)).rstrip("/") or "/")
    alternatives = "|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True))
    pattern = re.compile(f"(?:{alternatives})(?![^/\\s'\",:;)\\]}}])")

    def apply(text: str) -> str:
        return pattern.sub(lambda _: placeholder, text)

    return apply


def filter_test_dir(test_dir: str | os.PathLike[str]) -> Filter:
    """Replace the test's own directory by TEST_DIR."""
    return replace_path(test_dir, "TEST_DIR")


_TMP_PATH = re.compile(r"/(?:tmp|var/tmp)(?:/[^\s'\",:;)\]}]+)+")


def filter_tmp_paths(text: str) -> str:
    """Replace paths under /tmp, /var/tmp and $TMPDIR by TMP_PATH."""
    tmpdir = tempfile.gettempdir().rstrip("/")
    if tmpdir not in ("/tmp", "/var/tmp", ""):
        text = re.sub(re.escape(tmpdir) + r"(?:/[^\s'\",:;)\]}]+)*", "TMP_PATH", text)
    return _TMP_PATH.sub("TMP_PATH", text)


_ISO_TIMESTAMP = re.compile(
    r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
)
_CLOCK_TIME = re.compile(r"\b\d{2}:\d{2}:\d{2}(?:\.\d+)?\b")
_QMP_TIMESTAMP = re.compile(r"""(["']seconds["']:\s*)\d+(,\s*["']microseconds["']:\s*)\d+""")


def filter_timestamps(text: str) -> str:
    """Replace ISO 8601 date-times and clock times by TIMESTAMP, QMP event times by
    SECS/USECS (as iotests' filter_qmp_event does)."""
    text = _QMP_TIMESTAMP.sub(r"\1SECS\2USECS", text)
    text = _ISO_TIMESTAMP.sub("TIMESTAMP", text)
    return _CLOCK_TIME.sub("TIMESTAMP", text)


_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(rf"\b{_NUMBER}\s?(?:ns|us|µs|ms|s|sec|secs|seconds?|min|minutes?)(?![\w/])")


def filter_durations(text: str) -> str:
    """Replace durations such as `1.25 s`, `300ms`, `2 seconds` by DURATION."""
    return _DURATION.sub("DURATION", text)


_RATE = re.compile(rf"\b{_NUMBER}\s?(?:[KMGT]i?B|B|[KMGT]i?b|bit)/s\b")


def filter_rates(text: str) -> str:
    """Replace transfer rates such as `207.3 MiB/s` or `1 GB/s` by RATE."""
    return _RATE.sub("RATE", text)


_BYTES = re.compile(rf"\b{_NUMBER}\s?(?:bytes|[KMGT]iB|[KMGT]B)\b|\b\d+\s?B\b")


def filter_byte_counts(text: str) -> str:
    """Replace byte counts such as `4096 bytes`, `12.5 MiB` or `512 B` by SIZE.

    Use it only where the counts legitimately vary (compressed or allocated sizes):
    where a count is part of what is tested, it belongs in the golden output.
    """
    return _BYTES.sub("SIZE", text)


_VERSION_LINE = re.compile(
    r"\b(QEMU emulator version|qemu-img version|qemu-storage-daemon version)"
    r" \d+\.\d+(?:\.\d+)?(?:\s*\([^)]*\))?"
)
_QMP_VERSION = re.compile(
    r"""(["']qemu["']:\s*)\{[^{}]*\}(,\s*["']package["']:\s*)(["'])[^"']*\3"""
)


def filter_qemu_version(text: str) -> str:
    """Replace QEMU version strings (`--version` lines, the QMP greeting) by VERSION."""
    text = _VERSION_LINE.sub(r"\1 VERSION", text)
    return _QMP_VERSION.sub(r"\1VERSION\2\3PACKAGE\3", text)


_PID = re.compile(r"\b(pid[ =:]\s*)\d+", re.IGNORECASE)


def filter_pids(text: str) -> str:
    """Replace `pid 1234` / `pid=1234` by PID."""
    return _PID.sub(r"\1PID", text)


_STREAM_OFFSET = re.compile(r"\bbyte \d+\b")


def filter_stream_offsets(text: str) -> str:
    """Replace stream positions such as `byte 1234567` by `byte N`.

    For streams cut or failed at a moment that varies (QEMU killed, a full disk): the
    message must still say where, the golden output must not depend on it.
    """
    return _STREAM_OFFSET.sub("byte N", text)


_SECTION_ID = re.compile(r"\bsection \d+\b")


def filter_section_ids(text: str) -> str:
    """Replace migration section ids such as `section 2` by `section ID`.

    QEMU numbers sections in the order devices register, which changes between QEMU
    versions (the RAM section is 1 on QEMU 10.0, 2 on 7.2); the idstr next to it stays.
    """
    return _SECTION_ID.sub("section ID", text)


_EXTENT = re.compile(r"\b0x[0-9a-fA-F]+\+0x[0-9a-fA-F]+\b")


def filter_extents(text: str) -> str:
    """Replace block extents such as `0x1743000+0x200000` (offset+length) by OFFSET+LENGTH.

    For a block request that failed at a moment that varies (a disk filling up while
    contiguous pages are coalesced into writes of varying size).
    """
    return _EXTENT.sub("OFFSET+LENGTH", text)


def filter_common(test_dir: str | os.PathLike[str] | Path | None = None) -> Filter:
    """The usual set for a golden test: test dir, temp paths, times, rates, versions, pids."""
    filters: list[Filter] = []
    if test_dir is not None:
        filters.append(filter_test_dir(test_dir))
    filters += [
        filter_tmp_paths,
        filter_timestamps,
        filter_durations,
        filter_rates,
        filter_qemu_version,
        filter_pids,
    ]
    return chain(*filters)
