"""qsnap: external memory snapshots for QEMU, stored in addressable qcow2 images."""

__version__ = "0.1.0"
