#!/usr/bin/env python3
"""The end-to-end demo: boot the bundled `linux` guest with its memory writer running,
save it live with `qsnap save`, revert it by precopy and by postcopy into new QEMUs, and
let the guest's own agent verify every page of its memory after each revert.

Run by `ci/demo` (which does the set-up first). Prints a short table at the end; exits
non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qsnap.harness.guests import AgentClient, LinuxGuest
from qsnap.harness.scenario import qsnap_program, save_uri, wait_exit_status
from qsnap.harness.vm import VM

MIB = 1 << 20


@dataclass(frozen=True)
class Row:
    step: str
    seconds: float
    detail: str
    ok: bool


def summary_of(log_file: Path) -> str:
    """The key figures of the JSON summary qsnap wrote last on its stderr."""
    lines = log_file.read_text().strip().splitlines() if log_file.exists() else []
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError):
        return "no summary"
    parts = [f"{data.get('data_pages', '?')} data + {data.get('zero_pages', '?')} zero pages"]
    if "mib_per_s" in data:
        parts.append(f"{data['mib_per_s']} MiB/s")
    if "request_pages" in data:
        parts.append(
            f"{data['request_pages']} pages on request, p50 {data.get('latency_p50_ms')} ms"
        )
    return ", ".join(parts)


def run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise SystemExit(f"demo: {' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


def boot_target(guest: LinuxGuest, workdir: Path, name: str, memory: int) -> tuple[VM, Path]:
    vm = VM(name=name, memory_mib=memory, incoming_defer=True, log_dir=workdir)
    agent_socket = guest.configure(vm)
    vm.launch()
    return vm, agent_socket


def revert(guest: LinuxGuest, workdir: Path, image: Path, memory: int, postcopy: bool) -> Row:
    qsnap = qsnap_program()
    mode = "postcopy" if postcopy else "precopy"
    vm, agent_socket = boot_target(guest, workdir, f"revert-{mode}", memory)
    try:
        if postcopy:
            vm.set_migration_capabilities({"postcopy-ram": True})
        log_file = workdir / f"revert-{mode}.log"
        flags = "--postcopy --json" if postcopy else "--json"
        command = f"{shlex.quote(qsnap)} revert {flags} {shlex.quote(str(image))}"
        start = time.monotonic()
        vm.migrate_incoming(f"exec:{command} 2>>{shlex.quote(str(log_file))}")
        vm.wait_event("RESUME", timeout=120)
        running = time.monotonic() - start
        with AgentClient.connect(agent_socket) as agent:
            agent.touch("random")
            result = vm.wait_migration(timeout=300)
            total = time.monotonic() - start
            report = agent.verify(timeout=120)
        ok = result.ok and report.ok
        detail = (
            f"running after {running:.2f} s; agent verify: {report.pages} pages, "
            f"{report.bad} bad; migration {result.status.value}; {summary_of(log_file)}"
        )
        return Row(f"revert ({mode})", total, detail, ok)
    finally:
        vm.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    parser.add_argument("--region", type=int, default=256, help="agent region in MiB")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    qsnap = qsnap_program()
    workdir = Path(tempfile.mkdtemp(prefix="qsnap-demo-"))
    image = workdir / "snapshot.qcow2"
    rows: list[Row] = []
    guest = LinuxGuest.build()

    source = VM(name="source", memory_mib=args.memory, log_dir=workdir)
    start = time.monotonic()
    agent = guest.boot(source)
    pages = agent.fill(args.region, seed=2026)
    agent.writer_start(pages_per_second=20000)
    rows.append(
        Row(
            "boot + fill",
            time.monotonic() - start,
            f"{pages} agent pages filled, writer started",
            True,
        )
    )

    run([qsnap, "create", str(image), "--ram-size", f"{args.memory}M"])
    start = time.monotonic()
    save_log = workdir / "save.log"
    status = workdir / "save.status"
    source.background_snapshot(
        save_uri(image, "--json", exit_status=status, stderr=save_log), timeout=300
    )
    save_exit = wait_exit_status(status, timeout=300)
    saved = time.monotonic() - start
    agent.writer_stop()
    agent.close()
    source.shutdown()
    size = image.stat().st_size
    rows.append(
        Row("save (live, writer running)", saved,
            f"exit {save_exit}; {summary_of(save_log)}; image {size / MIB:.1f} MiB on disk",
            save_exit == 0)
    )  # fmt: skip

    info = json.loads(run([qsnap, "info", "--json", str(image)]))
    start = time.monotonic()
    verify = subprocess.run([qsnap, "verify", str(image)], capture_output=True, text=True)
    verified = time.monotonic() - start
    rows.append(
        Row("qsnap verify", verified, f"state {info.get('state')}; digests "
            + ("match" if verify.returncode == 0 else "MISMATCH"), verify.returncode == 0)
    )  # fmt: skip
    start = time.monotonic()
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    checked = time.monotonic() - start
    rows.append(
        Row(
            "qemu-img check",
            checked,
            check.stdout.strip().splitlines()[0] if check.stdout.strip() else check.stderr.strip(),
            check.returncode == 0,
        )
    )

    for postcopy in (False, True):
        rows.append(revert(guest, workdir, image, args.memory, postcopy))

    width = max(len(r.step) for r in rows)
    print(f"\n{'step':<{width}}  {'time':>8}  result")
    for r in rows:
        mark = "ok " if r.ok else "FAIL"
        print(f"{r.step:<{width}}  {r.seconds:7.2f}s  {mark} {r.detail}")
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed; work dir {workdir}")
    if not args.keep and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
