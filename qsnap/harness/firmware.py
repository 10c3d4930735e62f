"""A do-nothing x86 firmware, for tests that need guest memory nobody writes to.

With `-bios` pointing at it, the CPU executes `cli; hlt` at the reset vector and never
touches memory, so RAM holds exactly what QEMU put there (zeros, `-device loader` data,
ROM blocks). Two VMs with the same configuration then have identical memory, and one
injected byte is the only difference: the ground truth that memory comparison and
device-state tests need. (SeaBIOS instead writes tick counts, stacks and tables that
depend on timing.)
"""

from __future__ import annotations

import os
from pathlib import Path

BIOS_SIZE = 64 * 1024
"""The smallest BIOS size QEMU's pc machines accept."""

RESET_CODE = bytes([0xFA, 0xF4, 0xEB, 0xFD])
"""`cli; hlt; jmp $-1` (back to the hlt), at the reset vector 16 bytes below 4 GiB."""


def halt_bios_image() -> bytes:
    """The firmware bytes: zeros with `RESET_CODE` at the reset vector."""
    image = bytearray(BIOS_SIZE)
    image[BIOS_SIZE - 16 : BIOS_SIZE - 16 + len(RESET_CODE)] = RESET_CODE
    return bytes(image)


def write_halt_bios(directory: str | os.PathLike[str]) -> Path:
    """Write the firmware into `directory`; returns its path (for `-bios`)."""
    path = Path(directory) / "halt-bios.bin"
    path.write_bytes(halt_bios_image())
    return path
