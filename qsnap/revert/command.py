"""The ``qsnap revert`` subcommand: arguments, wiring, and the user-facing outcome.

QEMU runs it as ``migrate_incoming "exec:qsnap revert IMAGE"``: the stream goes to
stdout, QEMU's return path arrives on stdin.  The return path is used only when stdin is
a pipe or socket (as under QEMU) and ``--no-return-path`` is not given, so that
``qsnap revert IMAGE > FILE < /dev/null`` captures a plain precopy stream (without
OPEN_RETURN_PATH) and exits as soon as it is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from collections.abc import Sequence

from qsnap.image.errors import ImageError
from qsnap.image.snapshot import SnapshotImage
from qsnap.image.spec import parse_spec
from qsnap.revert.errors import RevertError
from qsnap.revert.precopy import revert_precopy
from qsnap.revert.return_path import ReturnPath
from qsnap.revert.session import AbortCheck, RevertOptions, Terminated, revert_signals
from qsnap.revert.sink import StreamSink
from qsnap.revert.source import ImageSource
from qsnap.revert.stats import RevertStats

PROG = "qsnap revert"
PRECOPY_PIPE_SIZE = 1 << 20
"""Linux's default limit for unprivileged pipes (fs.pipe-max-size)."""


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--postcopy={text}: not a number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"--postcopy={text}: must be 0..100")
    return value


class _PostcopyAction(argparse.Action):
    """``--postcopy[=PCT]``: a following word that is not a number is the IMAGE.

    argparse would otherwise take ``--postcopy IMAGE`` as PCT=IMAGE.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        if isinstance(values, str) and not values.lstrip("-").isdigit():
            namespace.image_after_postcopy = values
            values = None
        try:
            pct = 0 if values is None else _percent(str(values))
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, pct)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``qsnap revert`` (also used by the ``qemu-snapshot --revert`` syntax)."""
    parser.add_argument(
        "image", metavar="IMAGE", nargs="?", help="blockdev spec of the snapshot image"
    )
    parser.add_argument(
        "--postcopy",
        metavar="PCT",
        nargs="?",
        default=None,
        action=_PostcopyAction,
        help="postcopy revert; first send PCT %% of the data pages by precopy (default 0)",
    )
    parser.add_argument(
        "--no-return-path",
        action="store_true",
        help="do not open QEMU's return path (precopy only; implied when stdin is not a pipe)",
    )
    parser.add_argument(
        "--max-bandwidth",
        type=float,
        default=0.0,
        metavar="MIB_PER_S",
        help="postcopy: limit the background push to this much guest RAM per second "
        "(requested pages are never held back)",
    )
    parser.add_argument(
        "--nbd-only",
        action="store_true",
        help="precopy: read pages over NBD instead of through memory shared with the "
        "storage daemon (its vhost-user-blk export)",
    )
    parser.add_argument("--progress", action="store_true", help="progress lines on stderr")
    parser.add_argument("--json", action="store_true", help="summary as JSON on stderr")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long QEMU may stall or take to report the outcome (default 60)",
    )


def _stdin_is_channel() -> bool:
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def revert(args: argparse.Namespace, sink: StreamSink) -> RevertStats:
    """Run the revert described by ``args``; RevertError or ImageError on failure."""
    image = args.image or getattr(args, "image_after_postcopy", None)
    if image is None or (args.image and getattr(args, "image_after_postcopy", None)):
        raise RevertError("exactly one IMAGE is needed")
    if os.isatty(sink.fd):
        raise RevertError("stdout is a terminal: run this from QEMU (exec:) or redirect it")
    postcopy = args.postcopy is not None
    use_rp = not args.no_return_path and _stdin_is_channel()
    if postcopy and not use_rp:
        raise RevertError("--postcopy needs QEMU's return path on stdin (a pipe)")
    options = RevertOptions(
        postcopy_pct=args.postcopy,
        shut_timeout=args.timeout,
        stall_timeout=args.timeout,
        progress=args.progress,
        max_bandwidth=int(args.max_bandwidth * 2**20),
    )
    sink.stall_timeout = options.stall_timeout
    stats = RevertStats()
    shared = not postcopy and not args.nbd_only
    opened = SnapshotImage.open(parse_spec(image), shared_reads=shared)
    stats.page_reads = "shared memory" if opened.shares_memory else "nbd"
    source = ImageSource(opened)
    try:
        rp = ReturnPath(0) if use_rp else None
        sink.abort_check = AbortCheck(rp)
        if postcopy:
            from qsnap.revert.postcopy import PostcopySender  # only postcopy needs it

            assert rp is not None
            sender = PostcopySender(source, sink, rp, options, stats)
            rp.start()
            return sender.run()
        sink.grow_pipe(PRECOPY_PIPE_SIZE)
        if opened.shares_memory:
            sink.splice_pages()
        if rp is not None:
            rp.start()
        try:
            return revert_precopy(source, sink, rp, options, stats)
        finally:
            stats.pipe_writes = "spliced" if sink.splicing else "copied"
    finally:
        source.close()


REFUSED = b"qsnap revert refused the image: see its error on stderr\n"
"""Written instead of a stream when nothing was sent yet and stdout is a pipe.

QEMU's exec: incoming side only wakes up when the channel is readable (G_IO_IN); a
command that exits without writing leaves it waiting in "setup" for ever.  These bytes
are not a stream header, so QEMU fails at once ("Not a migration stream").
"""


def _refuse(sink: StreamSink) -> None:
    if sink.bytes_written == 0 and sink.pollable:
        with contextlib.suppress(OSError, RevertError):
            sink.write([REFUSED])


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: one summary or error line on stderr, exit status."""
    sink = StreamSink(1)
    try:
        with revert_signals():
            stats = revert(args, sink)
    except (RevertError, ImageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        _refuse(sink)
        return 1
    except Terminated:
        print(f"{PROG}: error: terminated by SIGTERM", file=sys.stderr, flush=True)
        return 1
    finally:
        sink.close()
    if args.json:
        print(json.dumps({"status": "ok", **stats.as_dict()}), file=sys.stderr, flush=True)
    else:
        print(f"{PROG}: {stats.summary()}", file=sys.stderr, flush=True)
    return 0
