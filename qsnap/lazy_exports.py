"""Package re-exports that load their module on first use, not with the package.

QEMU starts a qsnap process for every save and revert, and its start-up is part of their
time: ``qsnap revert`` should not import the stream reader or the image writer just
because a package ``__init__`` names them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps a name to its submodule."""
    namespace: dict[str, Any] = vars(importlib.import_module(package))

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
