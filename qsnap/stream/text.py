"""Names on the wire (idstrs, machine types, capabilities) as ``str``.

QEMU treats them as raw bytes; decoding with ``surrogateescape`` keeps any byte
sequence and encodes back to the identical bytes, so parse + write stays exact.
"""

from __future__ import annotations


def decode_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def encode_str8(name: str) -> bytes:
    """u8 length + bytes, as ``qemu_put_counted_string`` writes it."""
    raw = encode_name(name)
    if len(raw) > 255:
        raise ValueError(f"name {name!r} is longer than 255 bytes")
    return bytes((len(raw),)) + raw
