"""``qsnap create``: a qcow2 image sized for a guest, made by qemu-img."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

from qsnap.image import layout
from qsnap.image.errors import ImageError

log = logging.getLogger(__name__)

QCOW2_OPTIONS = "cluster_size=1M,preallocation=off,refcount_bits=8"
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1048576``: binary units as in qemu-img; ValueError otherwise."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r} (expected a number with K, M, G or T)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def qemu_img_binary() -> str:
    path = os.environ.get("QSNAP_QEMU_IMG") or shutil.which("qemu-img")
    if not path:
        raise ImageError("qemu-img not found (set QSNAP_QEMU_IMG or install qemu-utils)")
    return path


def create_image(path: str, ram_size: int, vmstate_size: int) -> int:
    """Create (or overwrite) ``path``; return its virtual size."""
    size = layout.create_size(ram_size, vmstate_size)
    argv = [
        qemu_img_binary(),
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"{QCOW2_OPTIONS},size={size}",
        path,
    ]
    log.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise ImageError(f"qemu-img create {path!r} timed out") from None
    if proc.returncode:
        text = "; ".join(ln.strip() for ln in proc.stderr.splitlines() if ln.strip())
        raise ImageError(f"qemu-img create {path!r} failed: {text.removeprefix('qemu-img: ')}")
    return size
