"""The snapshot image: its on-disk layout, and block I/O through qemu-storage-daemon + NBD.

Only :mod:`qsnap.image.layout` knows the format; the other modules move bytes.
"""

from __future__ import annotations

from qsnap.lazy_exports import lazy_getattr

TYPE_CHECKING = False

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

# name -> submodule, loaded on first use (see qsnap.lazy_exports)
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


__getattr__ = lazy_getattr(__name__, _EXPORTS)
