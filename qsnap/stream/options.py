"""Parameters of a stream that cannot be read from the stream itself."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PAGE_SIZE = 4096
MIN_PAGE_SIZE = 1024
"""Smallest target page size of any QEMU target; the RAM flags need 10 bits."""
MAX_PAGE_SIZE = 1 << 20


def check_page_size(page_size: int) -> None:
    """Raise ValueError unless ``page_size`` can be a QEMU target page size."""
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(
            f"page size {page_size} is not a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]"
        )


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """How to read a stream.

    ``page_size``: target page size; a configuration/target-page-bits subsection
    in the stream overrides it.
    ``block_page_sizes``: whether MEM_SIZE block entries carry a be64 page size.
    QEMU writes it only when postcopy-ram is on at the source and the block's page
    size differs from the host page size, which the stream does not say: True for
    every block, or the set of block names that carry it.
    ``ignore_shared``: whether block entries carry the be64 memory-region address
    (x-ignore-shared); None derives it from the configuration/capabilities subsection.
    ``expect_ram``: False lets the device state begin before any RAM section, as in
    a vmstate-only stream; by default a device section before the RAM setup is an
    error since it cannot be skipped without its vmstate description.
    ``packaged``: the bytes are the payload of a PACKAGED command: no header, no
    configuration, no EOF needed.
    ``max_packaged``, ``max_vmdesc``: largest PACKAGED payload and VMDESCRIPTION
    accepted, since the reader holds each of them whole.
    """

    page_size: int = DEFAULT_PAGE_SIZE
    block_page_sizes: bool | frozenset[str] = False
    ignore_shared: bool | None = None
    expect_ram: bool = True
    packaged: bool = False
    max_packaged: int = 16 << 20
    max_vmdesc: int = 64 << 20

    def __post_init__(self) -> None:
        check_page_size(self.page_size)
