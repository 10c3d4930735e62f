"""Exceptions of the image layer; each ``str()`` is one line fit for the user."""

from __future__ import annotations


class ImageError(Exception):
    """Any failure to open, read, write or interpret a snapshot image."""


class NotAnImage(ImageError):
    """The virtual disk does not start with a qsnap header (or its header is corrupt)."""


class IncompleteImage(ImageError):
    """The image holds a header, but its save never finished."""


class ImageTooSmall(ImageError):
    """The layout does not fit into the virtual disk; the message names the needed size."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


class NbdError(ImageError):
    """An NBD protocol failure or an error reply from the server."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno
