"""Wire constants of QEMU's migration stream and return path (QEMU 10.0).

Values come from migration/savevm.h, migration/savevm.c, migration/ram.h and
migration/migration.c; they are part of QEMU's stable wire format.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

QEVM_MAGIC = 0x5145564D
"""``QEMU_VM_FILE_MAGIC``: "QEVM"."""
QEVM_VERSION = 3
"""``QEMU_VM_FILE_VERSION``: the only version QEMU still loads."""
QEVM_VERSION_COMPAT = 2
"""``QEMU_VM_FILE_VERSION_COMPAT``: obsolete, rejected by QEMU and by qsnap."""

RAM_IDSTR = "ram"
"""Idstr of the RAM section (always instance 0)."""
RAM_VERSION = 4
"""The only RAM section version ``ram_load`` accepts."""

SUBSECTION_TARGET_PAGE_BITS = "configuration/target-page-bits"
SUBSECTION_CAPABILITIES = "configuration/capabilities"
SUBSECTION_UUID = "configuration/uuid"

CAPABILITY_IGNORE_SHARED = "x-ignore-shared"
CAPABILITY_MAPPED_RAM = "mapped-ram"

RECV_BITMAP_ENDING = 0x0123456789ABCDEF
"""``RAMBLOCK_RECV_BITMAP_ENDING``: closes the bitmap sent after RP RECV_BITMAP."""


class SectionType(IntEnum):
    """``QEMU_VM_*``: the byte that opens every top-level stream element."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class MigCommand(IntEnum):
    """``enum qemu_vm_cmd``: the be16 command number of a COMMAND element."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


class ReturnPathType(IntEnum):
    """``enum mig_rp_message_type``: destination-to-source messages."""

    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


class RamFlag(IntFlag):
    """``RAM_SAVE_FLAG_*``: low bits of the be64 that opens every RAM record."""

    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100
    """Removed from QEMU in 9.1 with the compress capability; still rejected by name."""
    MULTIFD_FLUSH = 0x200
