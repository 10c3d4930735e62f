"""Layer 1: QEMU's migration stream and return path, sans-I/O (see docs/architecture.md)."""

from __future__ import annotations

from qsnap.lazy_exports import lazy_getattr

TYPE_CHECKING = False

if TYPE_CHECKING:
    from .constants import (
        QEVM_MAGIC,
        QEVM_VERSION,
        MigCommand,
        RamFlag,
        ReturnPathType,
        SectionType,
    )
    from .device_tail import DeviceStateEnd, DeviceStateEndTracker, split_device_state_tail
    from .errors import StreamError
    from .options import StreamOptions
    from .reader import StreamReader
    from .return_path import (
        ReturnPathMessage,
        ReturnPathReader,
        encode_message,
    )
    from .wire import RamEncoder, encode_footer
    from .writer import encode

__all__ = [
    "QEVM_MAGIC",
    "QEVM_VERSION",
    "DeviceStateEnd",
    "DeviceStateEndTracker",
    "MigCommand",
    "RamEncoder",
    "RamFlag",
    "ReturnPathMessage",
    "ReturnPathReader",
    "ReturnPathType",
    "SectionType",
    "StreamError",
    "StreamOptions",
    "StreamReader",
    "encode",
    "encode_footer",
    "encode_message",
    "split_device_state_tail",
]

# name -> submodule, loaded on first use (see qsnap.lazy_exports)
_EXPORTS = {
    "DeviceStateEnd": "device_tail",
    "DeviceStateEndTracker": "device_tail",
    "MigCommand": "constants",
    "QEVM_MAGIC": "constants",
    "QEVM_VERSION": "constants",
    "RamEncoder": "wire",
    "RamFlag": "constants",
    "ReturnPathMessage": "return_path",
    "ReturnPathReader": "return_path",
    "ReturnPathType": "constants",
    "SectionType": "constants",
    "StreamError": "errors",
    "StreamOptions": "options",
    "StreamReader": "reader",
    "encode": "writer",
    "encode_footer": "wire",
    "encode_message": "return_path",
    "split_device_state_tail": "device_tail",
}


__getattr__ = lazy_getattr(__name__, _EXPORTS)
