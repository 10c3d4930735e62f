"""qsnap's stand-in for QEMU's tests/qemu-iotests/iotests.py.

It offers the part of QEMU's API that qsnap's tests use, with the same names, arguments
and output, so that a test file runs unchanged in two places: here (``iotests/check``,
pytest, avocado), and copied into a QEMU tree's tests/qemu-iotests/tests/, where
``import iotests`` finds QEMU's own module and QEMU's ``./check`` runs it. A test must
therefore use nothing else from here. Everything QEMU-specific a test needs (VMs,
streams, filters) comes from ``qsnap.harness``, never from this module.

Like QEMU's module, this one reads the environment the runner exports (TEST_DIR,
SOCK_DIR, QEMU_PROG, QEMU_IMG_PROG, QSD_PROG, IMGFMT, ...). Unlike QEMU's, when a test
is started directly, without a runner, it does not refuse: it runs the test once under
the runner machinery, compares the output with the golden file and exits 0 (pass),
1 (fail) or 77 (not run). That is what lets ``avocado run`` treat each test as a plain
executable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import unittest
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn, TypeVar

logger = logging.getLogger("qemu.iotests")
logger.addHandler(logging.NullHandler())
# Messages for the golden output go through this logger, as in QEMU's module.
test_logger = logging.getLogger("qemu.iotests.diff_io")

EXIT_NOT_RUN = 77  # automake's "skipped", which avocado is told to read as SKIP


def _standalone(script: Path) -> NoReturn:
    """Run ``script`` as check would, report, and exit with its verdict."""
    import shutil
    import tempfile

    from suite import catalog, environment, execution

    try:
        test = catalog.load(script)
        root = Path(tempfile.mkdtemp(prefix=f"qsnap-iotest-{test.name}-"))
        env = environment.build(environment.find_binaries(), root / "test", root / "sock")
    except (catalog.SelectionError, environment.SetupError) as exc:
        print(f"{script.name}: {exc}", file=sys.stderr)
        sys.exit(2)
    outcome = execution.run_test(test, env)
    sys.stdout.write(outcome.output)
    verdict = f"{test.name}: {outcome.status.value}"
    if outcome.description:
        verdict += f" ({outcome.description})"
    print(verdict, file=sys.stderr)
    if outcome.status is execution.Status.FAIL:
        print("\n".join(outcome.diff), file=sys.stderr)
        print(f"{test.name}: files kept in {root}", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(root, ignore_errors=True)
    sys.exit(EXIT_NOT_RUN if outcome.status is execution.Status.NOT_RUN else 0)


if "TEST_DIR" not in os.environ and __name__ != "__main__":
    _standalone(Path(sys.argv[0]).resolve())


def _args(program: str, default: str, options: str) -> list[str]:
    extra = os.environ.get(options, "").strip()
    return [os.environ.get(program, default), *(extra.split(" ") if extra else [])]


qemu_img_args = _args("QEMU_IMG_PROG", "qemu-img", "QEMU_IMG_OPTIONS")
qemu_io_args = _args("QEMU_IO_PROG", "qemu-io", "QEMU_IO_OPTIONS")
qemu_io_args_no_fmt = _args("QEMU_IO_PROG", "qemu-io", "QEMU_IO_OPTIONS_NO_FMT")
qemu_nbd_prog = os.environ.get("QEMU_NBD_PROG", "qemu-nbd")
qemu_prog = os.environ.get("QEMU_PROG", "qemu")
qemu_opts = os.environ.get("QEMU_OPTIONS", "").strip().split(" ")
qsd_prog = os.environ.get("QSD_PROG", "qemu-storage-daemon")
imgfmt = os.environ.get("IMGFMT", "raw")
imgproto = os.environ.get("IMGPROTO", "file")
test_dir = os.environ["TEST_DIR"]
sock_dir = os.environ.get("SOCK_DIR", test_dir)
cachemode = os.environ.get("CACHEMODE", "writeback")
aiomode = os.environ.get("AIOMODE", "threads")
qemu_default_machine = os.environ.get("QEMU_DEFAULT_MACHINE", "")
sample_img_dir = os.environ.get("SAMPLE_IMG_DIR", "")


class ToolError(subprocess.CalledProcessError):
    """A QEMU tool failed; like QEMU's VerboseProcessError, its text shows the output."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, stream in (("stdout", self.stdout), ("stderr", self.stderr)):
            if stream:
                text += f"\n  {label}:\n" + "\n".join(f"    {ln}" for ln in stream.splitlines())
        return text


def qemu_tool(
    *args: str, check: bool = True, combine_stdio: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool, return its exit status and output; raise on failure when ``check``."""
    subp = subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if combine_stdio else subprocess.PIPE,
        text=True,
        check=False,
    )
    if (check and subp.returncode) or subp.returncode < 0:
        raise ToolError(subp.returncode, list(args), output=subp.stdout, stderr=subp.stderr)
    return subp


def qemu_img(
    *args: str, check: bool = True, combine_stdio: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run QEMU_IMG_PROG (with QEMU_IMG_OPTIONS) and return its status and output."""
    return qemu_tool(*qemu_img_args, *args, check=check, combine_stdio=combine_stdio)


def qemu_img_create(*args: str) -> subprocess.CompletedProcess[str]:
    return qemu_img("create", *args)


def qemu_img_json(*args: str) -> Any:
    """Run qemu-img and decode its JSON output (also when it reports errors found)."""
    try:
        res = qemu_img(*args, combine_stdio=False)
    except subprocess.CalledProcessError as exc:
        if exc.returncode < 0:
            raise
        try:
            return json.loads(exc.stdout)
        except json.JSONDecodeError:
            raise exc from None
    return json.loads(res.stdout)


def qemu_img_check(*args: str) -> Any:
    return qemu_img_json("check", "--output", "json", *args)


def qemu_img_info(*args: str) -> Any:
    return qemu_img_json("info", "--output", "json", *args)


def qemu_img_map(*args: str) -> Any:
    return qemu_img_json("map", "--output", "json", *args)


def qemu_img_measure(*args: str) -> Any:
    return qemu_img_json("measure", "--output", "json", *args)


def qemu_img_log(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-img and log its output with test file names filtered."""
    result = qemu_img(*args, check=check)
    log(result.stdout, filters=[filter_testfiles])
    return result


def qemu_io(
    *args: str, check: bool = True, combine_stdio: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run QEMU_IO_PROG (with QEMU_IO_OPTIONS) and return its status and output."""
    return qemu_tool(*qemu_io_args, *args, check=check, combine_stdio=combine_stdio)


def qemu_io_log(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-io and log its output with timings and file names filtered."""
    result = qemu_io(*args, check=check)
    log(result.stdout, filters=[filter_testfiles, filter_qemu_io])
    return result


# Filters: str -> str (or QMP object -> QMP object), as in QEMU's module.

_test_dir_re = re.compile(re.escape(test_dir))
_qemu_io_re = re.compile(
    r"[0-9]* ops; [0-9\/:. sec]* \([0-9\/.inf]* [EPTGMKiBbytes]*\/sec and [0-9\/.inf]* ops\/sec\)"
)


def filter_test_dir(msg: str) -> str:
    return _test_dir_re.sub("TEST_DIR", msg)


def filter_win32(msg: str) -> str:
    return msg.replace("\r", "")


def filter_qemu_io(msg: str) -> str:
    return _qemu_io_re.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", filter_win32(msg))


def filter_testfiles(msg: str) -> str:
    """Paths made by :func:`file_path` become ``TEST_DIR/PID-...`` / ``SOCK_DIR/PID-...``."""
    pref1 = os.path.join(test_dir, f"{os.getpid()}-")
    pref2 = os.path.join(sock_dir, f"{os.getpid()}-")
    return msg.replace(pref1, "TEST_DIR/PID-").replace(pref2, "SOCK_DIR/PID-")


def filter_imgfmt(msg: str) -> str:
    return msg.replace(imgfmt, "IMGFMT")


def filter_qmp(qmsg: Any, filter_fn: Callable[[Any, Any], Any]) -> Any:
    """Apply ``filter_fn(key, value)`` to every leaf of a QMP object, in place."""
    if isinstance(qmsg, list):
        items: Iterable[tuple[Any, Any]] = list(enumerate(qmsg))
    elif isinstance(qmsg, dict):
        items = list(qmsg.items())
    else:
        return filter_fn(None, qmsg)
    for k, v in items:
        qmsg[k] = filter_qmp(v, filter_fn) if isinstance(v, dict | list) else filter_fn(k, v)
    return qmsg


def filter_qmp_event(event: dict[str, Any]) -> dict[str, Any]:
    """A QMP event with its timestamp replaced by constants."""
    event = dict(event)
    if "timestamp" in event:
        event["timestamp"] = {"seconds": "SECS", "microseconds": "USECS"}
    return event


def filter_qmp_testfiles(qmsg: Any) -> Any:
    return filter_qmp(qmsg, lambda _k, v: filter_testfiles(v) if isinstance(v, str) else v)


def filter_qmp_imgfmt(qmsg: Any) -> Any:
    return filter_qmp(qmsg, lambda _k, v: filter_imgfmt(v) if isinstance(v, str) else v)


Msg = TypeVar("Msg", dict[str, Any], list[Any], str)


def log(
    msg: Msg,
    filters: Iterable[Callable[[Msg], Msg]] = (),
    indent: int | None = None,
) -> None:
    """Log a line of golden output: a string, or a QMP-like object as sorted JSON."""
    for flt in filters:
        msg = flt(msg)
    if isinstance(msg, dict | list):
        do_sort = not isinstance(msg, OrderedDict)
        test_logger.info(json.dumps(msg, sort_keys=do_sort, indent=indent))
    else:
        test_logger.info(msg)


class Timeout:
    """Raise ``TimeoutError(errmsg)`` if the ``with`` body takes longer than ``seconds``."""

    def __init__(self, seconds: float, errmsg: str = "Timeout") -> None:
        self.seconds = seconds
        self.errmsg = errmsg

    def __enter__(self) -> Timeout:
        signal.signal(signal.SIGALRM, self.timeout)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def timeout(self, signum: int, frame: FrameType | None) -> NoReturn:
        raise TimeoutError(self.errmsg)


def file_pattern(name: str) -> str:
    return f"{os.getpid()}-{name}"


def try_remove(img: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(img)


class FilePath:
    """Context manager giving fresh file names in TEST_DIR, removed on exit."""

    def __init__(self, *names: str, base_dir: str = test_dir) -> None:
        self.paths = [os.path.join(base_dir, file_pattern(name)) for name in names]

    def __enter__(self) -> Any:
        return self.paths[0] if len(self.paths) == 1 else self.paths

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        for path in self.paths:
            try_remove(path)


_remove_at_exit: list[str] = []


def _remove_files() -> None:
    for path in reversed(_remove_at_exit):
        try_remove(path)


def file_path(*names: str, base_dir: str = test_dir) -> Any:
    """File names in TEST_DIR (one name: a string, else a list), removed at exit."""
    import atexit

    if not _remove_at_exit:
        atexit.register(_remove_files)
    paths = [os.path.join(base_dir, file_pattern(name)) for name in names]
    _remove_at_exit.extend(paths)
    return paths[0] if len(paths) == 1 else paths


def notrun(reason: str) -> NoReturn:
    """Skip the whole test: the runner reports it as "not run", never as passed."""
    seq = os.path.basename(sys.argv[0])
    with open(os.path.join(test_dir, f"{seq}.notrun"), "w", encoding="utf-8") as outfile:
        outfile.write(reason + "\n")
    logger.warning("%s not run: %s", seq, reason)
    sys.exit(0)


def case_notrun(reason: str) -> None:
    """Record that one case of the test did not run (the caller skips it)."""
    seq = os.path.basename(sys.argv[0])
    with open(os.path.join(test_dir, f"{seq}.casenotrun"), "a", encoding="utf-8") as outfile:
        outfile.write("    [case not run] " + reason + "\n")


def skip_if_user_is_root(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run the case only without root permissions."""

    def func_wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.getuid() == 0:
            case_notrun(f"{args[0]}: cannot be run as root")
            return None
        return func(*args, **kwargs)

    return func_wrapper


def _verify(
    supported_fmts: Sequence[str] = (),
    supported_platforms: Sequence[str] = (),
    supported_cache_modes: Sequence[str] = (),
    supported_aio_modes: Sequence[str] = (),
    unsupported_fmts: Sequence[str] = (),
    supported_protocols: Sequence[str] = (),
    unsupported_protocols: Sequence[str] = (),
    required_fmts: Sequence[str] = (),
    unsupported_imgopts: Sequence[str] = (),
) -> None:
    """QEMU's execute_setup_common checks: end as "not run" when the setup does not fit."""
    generic = "generic" in supported_fmts and os.environ.get("IMGFMT_GENERIC", "true") == "true"
    fmts = () if generic else supported_fmts
    if (fmts and imgfmt not in fmts) or imgfmt in unsupported_fmts:
        notrun(f"not suitable for this image format: {imgfmt}")
    if "generic" not in supported_protocols and (
        (supported_protocols and imgproto not in supported_protocols)
        or imgproto in unsupported_protocols
    ):
        notrun(f"not suitable for this protocol: {imgproto}")
    if supported_platforms and not any(sys.platform.startswith(p) for p in supported_platforms):
        notrun(f"not suitable for this OS: {sys.platform}")
    if supported_cache_modes and cachemode not in supported_cache_modes:
        notrun(f"not suitable for this cache mode: {cachemode}")
    if supported_aio_modes and aiomode not in supported_aio_modes:
        notrun(f"not suitable for this aio mode: {aiomode}")
    imgopts = os.environ.get("IMGOPTS", "")
    for opt in unsupported_imgopts:
        if re.search(opt, imgopts):
            notrun(f"not suitable for this imgopts: {imgopts}")
    del required_fmts  # every format qsnap tests need is built into QEMU's tools


def execute_setup_common(*args: Any, **kwargs: Any) -> bool:
    """Logging and the setup checks; returns whether ``-d`` (debug) was given."""
    debug = "-d" in sys.argv
    if debug:
        sys.argv.remove("-d")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)
    _verify(*args, **kwargs)
    return debug


def activate_logging() -> None:
    """Send :func:`log` output to stdout: it is the golden output."""
    handler = logging.StreamHandler(stream=sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    test_logger.addHandler(handler)
    test_logger.setLevel(logging.INFO)
    test_logger.propagate = False


def script_initialize(*args: Any, **kwargs: Any) -> None:
    """Set up a script-style test that has no single entry function."""
    activate_logging()
    execute_setup_common(*args, **kwargs)


def script_main(test_function: Callable[[], object], *args: Any, **kwargs: Any) -> None:
    """Run a script-style test: checks, then ``test_function()``."""
    activate_logging()
    execute_setup_common(*args, **kwargs)
    test_function()


class _ReproducibleStream:
    """unittest's stream with the run time and skip counts removed from its report."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __getattr__(self, attr: str) -> Any:
        if attr in ("stream", "__getstate__"):
            raise AttributeError(attr)
        return getattr(self.stream, attr)

    def write(self, arg: str) -> None:
        arg = re.sub(r"Ran (\d+) tests? in [\d.]+s", r"Ran \1 tests", arg)
        self.stream.write(re.sub(r" \(skipped=\d+\)", "", arg))


def main(*args: Any, **kwargs: Any) -> None:
    """Run the unittest test cases of the calling module, with reproducible output."""
    debug = execute_setup_common(*args, **kwargs)
    runner = unittest.TextTestRunner(
        stream=_ReproducibleStream(sys.stdout),
        descriptions=True,
        verbosity=2 if debug else 1,
    )
    unittest.main(
        argv=sys.argv,
        testRunner=runner,
        warnings=None if sys.warnoptions else "ignore",
    )
