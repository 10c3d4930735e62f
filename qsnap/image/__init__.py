"""The snapshot image: its on-disk layout, and block I/O through qemu-storage-daemon + NBD.

Only :mod:`qsnap.image.layout` knows the format; the other modules move bytes.
"""

from __future__ import annotations

from qsnap.image.errors import (
    ImageError,
    ImageTooSmall,
    IncompleteImage,
    NbdError,
    NotAnImage,
)
from qsnap.image.layout import BlockEntry, Header, ImageState, Pass
from qsnap.image.snapshot import Extent, SnapshotImage
from qsnap.image.spec import BlockdevSpec, parse_spec

__all__ = [
    "BlockEntry",
    "BlockdevSpec",
    "Extent",
    "Header",
    "ImageError",
    "ImageState",
    "ImageTooSmall",
    "IncompleteImage",
    "NbdError",
    "NotAnImage",
    "Pass",
    "SnapshotImage",
    "parse_spec",
]
