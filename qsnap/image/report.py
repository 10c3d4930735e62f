"""What ``qsnap info`` shows: a header as a JSON-able dict and as text."""

from __future__ import annotations

from typing import Any

from qsnap.image.layout import Header, pass_names


def header_dict(header: Header, virtual_size: int) -> dict[str, Any]:
    return {
        "state": header.state.name.lower(),
        "complete": header.complete,
        "passes": pass_names(header.passes),
        "missing": pass_names(header.missing),
        "virtual_size": virtual_size,
        "page_size": header.page_size,
        "machine_type": header.machine_type,
        "prologue_bytes": len(header.prologue),
        "ram_section": {
            "section_id": header.ram_section_id,
            "instance_id": header.ram_instance_id,
            "version_id": header.ram_version_id,
            "setup_bytes": len(header.ram_setup),
        },
        "blocks": [
            {
                "idstr": b.idstr,
                "used_length": b.used_length,
                "image_offset": b.image_offset,
                "page_size": b.page_size or None,
                "mr_addr": b.mr_addr,
                "data_pages": b.data_pages,
                "zero_pages": b.zero_pages,
            }
            for b in header.blocks
        ],
        "device_state": {
            "offset": header.device_state.offset,
            "length": header.device_state.length,
            "sections_length": header.device_sections_length,
        },
        "digests": {
            "offset": header.digests.offset,
            "length": header.digests.length,
            "algorithm": header.digest_algorithm.name.lower(),
        },
    }


def header_text(header: Header, virtual_size: int) -> str:
    state = header.state.name.lower()
    if header.missing:
        state += f" (missing: {', '.join(pass_names(header.missing))})"
    lines = [
        f"state: {state}",
        f"machine type: {header.machine_type}",
        f"page size: {header.page_size}",
        f"virtual size: {virtual_size}",
        f"RAM section: id {header.ram_section_id}, instance {header.ram_instance_id}, "
        f"version {header.ram_version_id}",
        "RAM blocks:",
    ]
    width = max((len(b.idstr) for b in header.blocks), default=0)
    for b in header.blocks:
        lines.append(
            f"  {b.idstr:<{width}}  length {b.used_length:#x} at {b.image_offset:#x}: "
            f"{b.data_pages} data pages, {b.zero_pages} zero pages"
        )
    ds = header.device_state
    lines.append(
        f"device state: {ds.length} bytes at {ds.offset:#x} "
        f"(sections {header.device_sections_length} bytes)"
    )
    dg = header.digests
    lines.append(
        f"page digests: {dg.length} bytes at {dg.offset:#x} "
        f"({header.digest_algorithm.name.lower()})"
    )
    return "\n".join(lines)
