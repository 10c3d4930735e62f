"""The single exception the codec raises for malformed input."""

from __future__ import annotations


class StreamError(Exception):
    """Malformed or unsupported stream data.

    ``offset`` is the absolute byte position in the stream where the problem was
    found, so that a one-line report can point the user at it.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message, offset)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        return f"byte {self.offset}: {self.message}"
