"""The image blockdev spec: the seed's ``IMG[,opt=val...]`` syntax, or ``json:{...}``.

The keyval form follows QEMU's ``-blockdev`` rules (util/keyval.c): ``key=value`` pairs
separated by commas, a literal comma doubled, and an implied first key, here
``file.filename``, so that a bare path works.  The format driver defaults to qcow2 and the
protocol driver to ``file``.  The spec is turned into qemu-storage-daemon ``--blockdev``
arguments: a protocol node plus a format node on top of it, so that both can be opened
read-only for ``info``/``verify``; the JSON form is passed through as given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qsnap.image.errors import ImageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FORMAT_NODE = "qsnap-fmt"
PROTOCOL_NODE = "qsnap-proto"
IMPLIED_KEY = "file.filename"
DEFAULT_DRIVER = "qcow2"
DEFAULT_PROTOCOL = "file"

# What a node passes on to its protocol child when QEMU opens both (-drive, or a
# nested "file" object); separate --blockdev nodes inherit nothing, so the seed's
# ``IMG,cache.direct=on,file.aio=native`` needs them copied.
INHERITED = ("cache.direct", "cache.no-flush")
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_JSON_PREFIX = "json:"


class SpecError(ImageError):
    """The spec string cannot be parsed."""


@dataclass(frozen=True)
class BlockdevSpec:
    """A parsed spec: flat dotted options (keyval form) or a JSON object.

    ``options`` keeps the user's order; ``json_options`` is set for the JSON form only.
    """

    text: str
    options: tuple[tuple[str, str], ...] = ()
    json_options: str | None = None

    @property
    def filename(self) -> str | None:
        """The host file behind the image, when the spec names one (for messages)."""
        if self.json_options is not None:
            import json  # only json: specs need it (start-up)

            obj = json.loads(self.json_options)
            file = obj.get("file")
            if isinstance(file, dict) and isinstance(file.get("filename"), str):
                return str(file["filename"])
            return obj.get("filename") if isinstance(obj.get("filename"), str) else None
        return dict(self.options).get(IMPLIED_KEY)

    def qsd_blockdev_args(self, *, read_only: bool) -> list[str]:
        """The ``--blockdev`` arguments; the top node is always named ``FORMAT_NODE``."""
        if self.json_options is not None:
            import json

            obj: dict[str, Any] = json.loads(self.json_options)
            obj.setdefault("driver", DEFAULT_DRIVER)
            obj["node-name"] = FORMAT_NODE
            if read_only:
                obj["read-only"] = True
            return ["--blockdev", json.dumps(obj, separators=(",", ":"))]
        opts = dict(self.options)
        opts.setdefault("driver", DEFAULT_DRIVER)
        proto = {k[len("file.") :]: v for k, v in opts.items() if k.startswith("file.")}
        fmt = {k: v for k, v in opts.items() if not k.startswith("file.")}
        fmt["node-name"] = FORMAT_NODE
        if read_only:
            fmt["read-only"] = "on"
        args: list[str] = []
        if proto:
            if "file" in fmt:
                raise SpecError(f"spec {self.text!r}: 'file' given both as a node and as options")
            proto.setdefault("driver", DEFAULT_PROTOCOL)
            for key in INHERITED:
                if key in fmt:
                    proto.setdefault(key, fmt[key])
            proto["node-name"] = PROTOCOL_NODE
            if read_only:
                proto["read-only"] = "on"
            fmt["file"] = PROTOCOL_NODE
            args += ["--blockdev", format_keyval(proto)]
        args += ["--blockdev", format_keyval(fmt)]
        return args


def format_keyval(options: dict[str, str]) -> str:
    """Join options as QEMU keyval, doubling commas inside values."""
    return ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())


def _split_keyval(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for a literal comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_spec(text: str) -> BlockdevSpec:
    """Parse ``IMG[,opt=val...]`` or ``json:{...}``; raise :class:`SpecError` naming the fault."""
    if not text:
        raise SpecError("empty image spec")
    if text.startswith(_JSON_PREFIX):
        import json

        try:
            obj = json.loads(text[len(_JSON_PREFIX) :])
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec {text!r}: invalid JSON at char {exc.pos}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise SpecError(f"spec {text!r}: JSON spec must be an object")
        return BlockdevSpec(text=text, json_options=json.dumps(obj))
    options: list[tuple[str, str]] = []
    seen: set[str] = set()
    for index, part in enumerate(_split_keyval(text)):
        if "=" in part:
            key, value = part.split("=", 1)
        elif index == 0:
            key, value = IMPLIED_KEY, part
        else:
            raise SpecError(f"spec {text!r}: option {part!r} has no '=value'")
        if not _KEY_RE.match(key) or key.startswith(".") or key.endswith(".") or ".." in key:
            raise SpecError(f"spec {text!r}: invalid option name {key!r}")
        if key in seen:
            raise SpecError(f"spec {text!r}: option {key!r} given twice")
        if key == "node-name":
            raise SpecError(f"spec {text!r}: node-name is reserved for qsnap")
        seen.add(key)
        options.append((key, value))
    has_file = any(k == IMPLIED_KEY or k.startswith("file.") or k == "file" for k in seen)
    if not has_file and dict(options).get("driver", DEFAULT_DRIVER) == DEFAULT_DRIVER:
        raise SpecError(f"spec {text!r}: no image file given")
    if dict(options).get(IMPLIED_KEY) == "":
        raise SpecError(f"spec {text!r}: empty file name")
    return BlockdevSpec(text=text, options=tuple(options))
