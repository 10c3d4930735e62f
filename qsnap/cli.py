"""Command line: ``qsnap save|create|info|verify`` (+ ``revert``, ``analyze`` when present)
and ``qemu-snapshot``, the seed's syntax mapped onto the same subcommands.

Every failure is one line on stderr, ``PROG: error: ...``, and exit status 1.  SIGTERM,
SIGINT, SIGHUP and SIGPIPE raise SystemExit so that context managers stop the storage
daemon and no image is ever marked complete by an interrupted save.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType, ModuleType

from qsnap.launch import command_of

TYPE_CHECKING = False  # not typing's: importing it costs every save ~4 ms of start-up
if TYPE_CHECKING:
    from qsnap.image.daemon import StorageDaemon
    from qsnap.read_ahead import ReadAhead

# qsnap's modules are imported by the subcommands that use them: QEMU starts
# ``qsnap revert`` for every revert, and its start-up is part of the revert's time.

log = logging.getLogger(__name__)

#: subcommands implemented elsewhere: a module with ``add_arguments(parser)`` and
#: ``run(args) -> int``; absent modules are simply not offered.
PLUGINS = {
    "revert": ("qsnap.revert.command", "load a snapshot into QEMU (exec:qsnap revert IMAGE)"),
    "analyze": ("qsnap.analyze", "account for every page and section of a migration stream file"),
}

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)


class Interrupted(SystemExit):
    """A signal arrived; unwinding cleans up the daemon."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    for sig in EXIT_SIGNALS:
        signal.signal(sig, _raise_interrupted)


def _size(text: str) -> int:
    from qsnap.image.create import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _page_size(text: str) -> int:
    value = _size(text)
    if value < 1024 or value > 1 << 20 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"page size {text}: not a power of two in 1K..1M")
    return value


def _fail(prog: str, message: object) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 1


# -- save -------------------------------------------------------------------------------


def _add_save(p: argparse.ArgumentParser) -> None:
    from qsnap.save_input import DEFAULT_TIMEOUT

    p.add_argument("image", metavar="IMAGE", help="blockdev spec: IMG[,opt=val...] or json:{...}")
    p.add_argument(
        "--save-vmstate",
        action="store_true",
        help="the stream is vmstate-only (first or second pass of a two-pass save)",
    )
    p.add_argument("--page-size", type=_page_size, default=4096, help="target page size")
    p.add_argument(
        "--nbd-only",
        action="store_true",
        help="write pages over NBD instead of through memory shared with the storage "
        "daemon (its vhost-user-blk export)",
    )
    p.add_argument("--progress", action="store_true", help="periodic progress on stderr")
    p.add_argument("--json", action="store_true", help="summary as JSON on stderr")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for stream data (default {DEFAULT_TIMEOUT:g})",
    )


def _run_save(args: argparse.Namespace) -> int:
    from qsnap.image.errors import ImageError
    from qsnap.stream.errors import StreamError

    prog = "qsnap save"
    if sys.stdin is None:
        return _fail(prog, "stdin is closed: pipe a migration stream into it (exec:)")
    if os.isatty(0):
        return _fail(prog, "stdin is a terminal: pipe a migration stream into it (exec:)")
    ahead: ReadAhead | None = args.read_ahead
    daemon = None
    try:
        daemon = _save_daemon(args)
        daemon.launch()  # only once held: a signal delivered by launch() must find it
        from qsnap.save import SaveError, report, save  # while the daemon starts

        try:
            result = save(
                daemon.spec,
                vmstate_only=args.save_vmstate,
                page_size=args.page_size,
                progress=sys.stderr if args.progress else None,
                timeout=args.timeout,
                ahead=ahead,
                shared_writes=not args.nbd_only,
                daemon=daemon,
            )
        except SaveError as exc:
            return _fail(prog, exc)
    except (StreamError, ImageError, OSError) as exc:
        return _fail(prog, exc)
    finally:
        if ahead is not None:
            ahead.stop()
        if daemon is not None:
            daemon.stop()  # already stopped unless the image was never opened
    report(result, as_json=args.json, out=sys.stderr)
    return 0


def _save_daemon(args: argparse.Namespace) -> StorageDaemon:
    """The storage daemon for the image, to be launched before the save's imports.

    Its start (15-25 ms until its exports are up) then overlaps them instead of following
    them, and QEMU, stalled once the read-ahead child holds its bound, waits less (QEMU's
    median 1.23 / 1.31 s, 1.32 / 1.51 s and 1.23 / 1.25 s in three batches).
    """
    from qsnap.image.daemon import StorageDaemon
    from qsnap.image.spec import parse_spec
    from qsnap.image.virtqueue import ORDERED_HOST

    return StorageDaemon(
        parse_spec(args.image), writable=True, vhost_user=not args.nbd_only and ORDERED_HOST
    )


# -- create / info / verify -------------------------------------------------------------


def _add_create(p: argparse.ArgumentParser) -> None:
    from qsnap.image.layout import DEFAULT_VMSTATE_SIZE

    p.add_argument("image", metavar="IMG", help="qcow2 file to create (overwritten)")
    p.add_argument("--ram-size", type=_size, required=True, help="guest RAM size, e.g. 2G")
    p.add_argument(
        "--vmstate-size",
        type=_size,
        default=DEFAULT_VMSTATE_SIZE,
        help="room for the device state (default 64M)",
    )


def _run_create(args: argparse.Namespace) -> int:
    from qsnap.image.create import create_image
    from qsnap.image.errors import ImageError

    try:
        size = create_image(args.image, args.ram_size, args.vmstate_size)
    except ImageError as exc:
        return _fail("qsnap create", exc)
    print(f"{args.image}: qcow2, virtual size {size}")
    return 0


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="blockdev spec")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _run_info(args: argparse.Namespace) -> int:
    from qsnap.image.errors import ImageError
    from qsnap.image.report import header_dict, header_text
    from qsnap.image.snapshot import SnapshotImage
    from qsnap.image.spec import parse_spec

    try:
        with SnapshotImage.open(parse_spec(args.image)) as image:
            header = image.read_header()
            size = image.size
    except ImageError as exc:
        return _fail("qsnap info", exc)
    if args.json:
        import json

        print(json.dumps(header_dict(header, size), indent=2))
    else:
        print(header_text(header, size))
    return 0


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE", help="blockdev spec")


def _run_verify(args: argparse.Namespace) -> int:
    from qsnap.image.errors import ImageError
    from qsnap.image.snapshot import SnapshotImage
    from qsnap.image.spec import parse_spec

    prog = "qsnap verify"
    try:
        with SnapshotImage.open(parse_spec(args.image)) as image:
            result = image.verify()
    except ImageError as exc:
        return _fail(prog, exc)
    if not result.device_state_ok:
        return _fail(prog, "device state does not match its digest")
    if result.mismatch_count:
        pages = ", ".join(str(m) for m in result.mismatches)
        return _fail(prog, f"{result.mismatch_count} of {result.pages} pages differ: {pages}")
    print(f"{result.pages} pages and the device state match their digests")
    return 0


# -- parser -----------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]
BUILTIN: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {
    "save": (_add_save, _run_save, "store a migration stream from stdin into an image"),
    "create": (_add_create, _run_create, "create a qcow2 image big enough for a guest"),
    "info": (_add_info, _run_info, "show an image's header"),
    "verify": (_add_verify, _run_verify, "check every page against its digest"),
}


def _plugin(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` known, the other subcommands get no arguments and their
    modules are not imported (start-up time)."""
    parser = argparse.ArgumentParser(prog="qsnap", description="External memory snapshots for QEMU")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, handler, helptext) in BUILTIN.items():
        if command is not None and command != name:
            sub.add_parser(name, help=helptext)
            continue
        p = sub.add_parser(name, help=helptext, description=helptext)
        add(p)
        p.set_defaults(handler=handler)
    for name, (module_name, helptext) in PLUGINS.items():
        if command is not None and command != name:
            if _plugin_exists(module_name):
                sub.add_parser(name, help=helptext)
            continue
        module = _plugin(module_name)
        if module is None:
            continue
        p = sub.add_parser(name, help=helptext, description=helptext)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def _plugin_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None, *, ahead: ReadAhead | None = None) -> int:
    """``ahead``: what has been reading stdin for ``save`` (see :mod:`qsnap.launch`)."""
    argv = sys.argv[1:] if argv is None else argv
    command = command_of(argv)
    parser = build_parser(command if command in BUILTIN or command in PLUGINS else None)
    args = parser.parse_args(argv)
    args.read_ahead = ahead
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format=f"qsnap {args.command}: %(message)s")
    install_signal_handlers()
    try:
        status: int = args.handler(args)
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        print(f"qsnap {args.command}: error: interrupted by {name}", file=sys.stderr, flush=True)
        return 1
    return status


def qemu_snapshot_main(argv: list[str] | None = None, *, ahead: ReadAhead | None = None) -> int:
    """``qemu-snapshot [-r|--revert] [--postcopy[=PCT]] [--save-vmstate] [--page-size=N] SPEC``."""
    parser = argparse.ArgumentParser(prog="qemu-snapshot")
    parser.add_argument("-r", "--revert", action="store_true", help="revert (stream to stdout)")
    parser.add_argument("--postcopy", action="store_true", help="--postcopy[=PCT]: postcopy revert")
    parser.add_argument("--save-vmstate", action="store_true")
    parser.add_argument("--page-size", default=None, metavar="N")
    parser.add_argument("spec", metavar="SPEC")
    # PCT is only ever attached with '=', so that "--postcopy IMG" keeps IMG the spec.
    pct: str | None = None
    rest = []
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--postcopy="):
            pct = arg.split("=", 1)[1]
            arg = "--postcopy"
        rest.append(arg)
    args = parser.parse_args(rest)
    if args.revert:
        if args.save_vmstate:
            parser.error("--save-vmstate is a save option")
        out = ["revert", args.spec]
        if args.postcopy:
            out.append("--postcopy" if pct is None else f"--postcopy={pct}")
    else:
        if args.postcopy:
            parser.error("--postcopy needs --revert")
        out = ["save", args.spec]
        if args.save_vmstate:
            out.append("--save-vmstate")
        if args.page_size is not None:
            out.append(f"--page-size={args.page_size}")
    return main(out, ahead=ahead)
