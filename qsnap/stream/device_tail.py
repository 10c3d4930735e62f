"""Where the device state ends: finding ``EOF [VMDESCRIPTION be32 N json]`` from the end.

Device sections carry no length, so the boundary between the device sections and
the closing EOF + vmdesc can only be found from the end of the stream. The vmdesc
JSON never contains a NUL byte (QEMU measures it with strlen), so the EOF byte is
one of the last five NUL bytes of the stream (itself and at most four in the be32
length). Tracking those five candidates needs constant memory, whatever the size
of the device state; postcopy needs the boundary to cut EOF and vmdesc off.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import SectionType
from .errors import StreamError

_CANDIDATES = 5
_HEAD = 6  # EOF, VMDESCRIPTION, be32 length


@dataclass(frozen=True, slots=True)
class DeviceStateEnd:
    """``eof_offset``: absolute offset of the EOF byte; ``vmdesc_length``: the JSON
    length, or None when the stream ends with the EOF byte itself."""

    eof_offset: int
    vmdesc_length: int | None


class DeviceStateEndTracker:
    """Feed the device-state bytes in order; ``end()`` tells where EOF is.

    ``start`` is the absolute offset of the first byte fed.
    """

    __slots__ = ("_candidates", "_last_byte", "offset")

    def __init__(self, start: int = 0) -> None:
        self.offset = start
        self._candidates: list[tuple[int, bytes]] = []
        self._last_byte = -1

    def feed(self, data: bytes) -> None:
        if not data:
            return
        grown: list[tuple[int, bytes]] = []
        for pos, head in self._candidates:
            if len(head) < _HEAD:
                head += data[: _HEAD - len(head)]
            grown.append((pos, head))
        found: list[tuple[int, bytes]] = []
        end = len(data)
        while len(found) < _CANDIDATES:
            i = data.rfind(b"\0", 0, end)
            if i < 0:
                break
            found.append((self.offset + i, data[i : i + _HEAD]))
            end = i
        found.reverse()
        self._candidates = (grown + found)[-_CANDIDATES:]
        self._last_byte = data[-1]
        self.offset += len(data)

    def end(self) -> DeviceStateEnd | None:
        """The boundary, or None if the bytes fed do not end with EOF [+ vmdesc].

        A vmdesc header is accepted only if no NUL byte follows its length field.
        The one ambiguous ending, ``00 06 00000000``, reads as an empty vmdesc.
        """
        total = self.offset
        candidates = self._candidates
        for i, (pos, head) in enumerate(candidates):
            if (
                len(head) == _HEAD
                and head[1] == SectionType.VMDESCRIPTION
                and struct.unpack_from(">I", head, 2)[0] == total - pos - _HEAD
                and all(later <= pos + _HEAD - 1 for later, _ in candidates[i + 1 :])
            ):
                return DeviceStateEnd(pos, total - pos - _HEAD)
        if self._last_byte == SectionType.EOF:
            return DeviceStateEnd(total - 1, None)
        return None


def split_device_state_tail(tail: bytes, total_length: int) -> DeviceStateEnd:
    """Find EOF + vmdesc in ``tail``, the last bytes of a stream of ``total_length``.

    ``tail`` must reach back to the EOF byte (vmdesc length + 6 bytes suffice).
    Raises StreamError naming the end of the stream if there is no such ending.
    """
    if len(tail) > total_length:
        raise ValueError("tail is longer than the stream")
    tracker = DeviceStateEndTracker(total_length - len(tail))
    tracker.feed(tail)
    found = tracker.end()
    if found is None:
        raise StreamError(
            f"the device state does not end with EOF [+ VMDESCRIPTION] "
            f"(searched the last {len(tail)} bytes)",
            total_length,
        )
    return found
