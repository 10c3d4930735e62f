"""The one exception type of the revert pipelines."""

from __future__ import annotations


class RevertError(Exception):
    """A revert cannot go on; ``str()`` is the single line shown to the user.

    Raised for an image that cannot be reverted (refused before anything is written), a
    page request QEMU should not have made, and a destination that failed or went away.
    """
