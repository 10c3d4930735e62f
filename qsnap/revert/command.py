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
import os
import stat
import sys
from collections.abc import Sequence

from qsnap.image.errors import ImageError
from qsnap.revert.errors import RevertError
from qsnap.revert.signals import Terminated, revert_signals

# Most of qsnap is imported only once the storage daemon is starting: QEMU waits for
# the first bytes of a revert, and the daemon needs some 20 ms to set up its exports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from qsnap.image.daemon import StorageDaemon
    from qsnap.revert.sink import StreamSink
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


def revert_daemon(args: argparse.Namespace) -> StorageDaemon:
    """Check the arguments; the storage daemon to launch for them."""
    from qsnap.image.daemon import StorageDaemon
    from qsnap.image.spec import parse_spec
    from qsnap.image.virtqueue import ORDERED_HOST

    image = args.image or getattr(args, "image_after_postcopy", None)
    if image is None or (args.image and getattr(args, "image_after_postcopy", None)):
        raise RevertError("exactly one IMAGE is needed")
    if os.isatty(1):
        raise RevertError("stdout is a terminal: run this from QEMU (exec:) or redirect it")
    if args.postcopy is not None and (args.no_return_path or not _stdin_is_channel()):
        raise RevertError("--postcopy needs QEMU's return path on stdin (a pipe)")
    shared = args.postcopy is None and not args.nbd_only and ORDERED_HOST
    return StorageDaemon(parse_spec(image), writable=False, vhost_user=shared)


def revert(args: argparse.Namespace, sink: StreamSink, daemon: StorageDaemon) -> RevertStats:
    """Run the revert described by ``args`` with a launched ``daemon`` (which it stops);
    RevertError or ImageError on failure."""
    from qsnap.image.snapshot import SnapshotImage
    from qsnap.revert.precopy import revert_precopy
    from qsnap.revert.return_path import ReturnPath
    from qsnap.revert.session import AbortCheck, RevertOptions
    from qsnap.revert.source import ImageSource
    from qsnap.revert.stats import RevertStats

    postcopy = args.postcopy is not None
    use_rp = not args.no_return_path and _stdin_is_channel()
    options = RevertOptions(
        postcopy_pct=args.postcopy,
        shut_timeout=args.timeout,
        stall_timeout=args.timeout,
        progress=args.progress,
        max_bandwidth=int(args.max_bandwidth * 2**20),
    )
    sink.stall_timeout = options.stall_timeout
    stats = RevertStats()
    opened = SnapshotImage.open(
        daemon.spec, shared_reads=not postcopy and not args.nbd_only, daemon=daemon
    )
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


def _refuse(sink: StreamSink | None) -> None:
    if sink is None:
        with contextlib.suppress(OSError):
            if stat.S_ISFIFO(os.fstat(1).st_mode) or stat.S_ISSOCK(os.fstat(1).st_mode):
                os.write(1, REFUSED)
    elif sink.bytes_written == 0 and sink.pollable:
        with contextlib.suppress(OSError, RevertError):
            sink.write([REFUSED])


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand: one summary or error line on stderr, exit status."""
    sink: StreamSink | None = None
    daemon: StorageDaemon | None = None
    try:
        with revert_signals():
            daemon = revert_daemon(args)
            daemon.launch()  # only once held: a signal delivered by launch() must find it
            from qsnap.revert.sink import StreamSink

            sink = StreamSink(1)
            stats = revert(args, sink, daemon)
    except (RevertError, ImageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        _refuse(sink)
        return 1
    except Terminated:
        print(f"{PROG}: error: terminated by SIGTERM", file=sys.stderr, flush=True)
        return 1
    except Exception:
        _refuse(sink)  # a bug must not leave QEMU waiting for a stream for ever
        raise
    finally:
        if sink is not None:
            sink.close()
        if daemon is not None:
            daemon.stop()  # already stopped unless the image was never opened
    if args.json:
        import json

        print(json.dumps({"status": "ok", **stats.as_dict()}), file=sys.stderr, flush=True)
    else:
        print(f"{PROG}: {stats.summary()}", file=sys.stderr, flush=True)
    return 0
