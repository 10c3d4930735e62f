"""Layer 1: QEMU's migration stream and return path, sans-I/O (see docs/architecture.md)."""

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
from .writer import RamEncoder, encode, encode_footer

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
