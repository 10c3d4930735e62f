"""The snapshot image: its on-disk layout, and block I/O through qemu-storage-daemon + NBD.

Only :mod:`qsnap.image.layout` knows the format; the other modules move bytes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# name -> submodule; loaded on first use (see __getattr__)
_EXPORTS = {
    "BlockEntry": "layout",
    "BlockdevSpec": "spec",
    "Extent": "snapshot",
    "Header": "layout",
    "ImageError": "errors",
    "ImageState": "layout",
    "ImageTooSmall": "errors",
    "IncompleteImage": "errors",
    "NbdError": "errors",
    "NotAnImage": "errors",
    "Pass": "layout",
    "SnapshotImage": "snapshot",
    "parse_spec": "spec",
}


def __getattr__(name: str) -> object:
    """Load a re-exported name's module on first use, not with the package.

    QEMU starts a qsnap process for every save and revert, and its start-up is part of
    their time: ``qsnap revert`` should not import the stream reader or the image writer.
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
