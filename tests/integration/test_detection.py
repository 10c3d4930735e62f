"""Detection power of the guest checks, measured on real background-snapshot streams.

For each guest, a running VM is background-snapshotted to a file; corrupted variants of
the stream are written with qsnap.stream (a page zeroed, two pages swapped, a page from
an earlier or a later snapshot, a page torn between two snapshots, a byte flipped); each
is loaded into a fresh QEMU with `migrate-incoming exec:cat FILE`, and the guest's check
must name exactly the pages that were damaged, for the right reason, while the untouched
stream passes.

linux: the agent's own `verify`, with its writer running. The destination starts paused
(-S), the verify request is queued on the agent's serial port before `cont`, and the
damaged pages are chosen far ahead of (or just behind) the writer, so the writer cannot
repair them before the agent looks.
pattern: the host-side sweep rule over guest RAM read with `pmemsave`, as loaded and
again after the guest swept on a little (its sweeps keep any damage: they add the same
to every page).
"""

from __future__ import annotations

import enum
import shlex
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from qsnap.harness.guests import (
    AgentClient,
    AgentPageHeader,
    LinuxGuest,
    PageFault,
    PatternGuest,
    VerifyReport,
)
from qsnap.harness.qemu import find_qemu, probe_background_snapshot
from qsnap.harness.sweep import PAGE_SIZE, SweepReport, check_sweep, first_bytes
from qsnap.harness.vm import VM, MigrationStatus, VMFactory
from qsnap.stream import StreamReader, encode
from qsnap.stream.records import RamPage, RamZero

pytestmark = pytest.mark.qemu

LINUX_MIB = 256
REGION_MIB = 64
REGION_PAGES = REGION_MIB * 256
WRITER_RATE = 2000
"""Pages per second: a sweep of the region takes about 8 s."""
WRITER_MARGIN = 1000
"""Pages between a damaged page and the writer's path after the revert."""
PATTERN_MIB = 128
SNAPSHOT_TIMEOUT = 120.0
LOAD_TIMEOUT = 120.0

PageKey = tuple[str, int]
"""(RAM block, offset in the block)."""


class Damage(enum.StrEnum):
    NONE = "untouched"
    ZERO = "zeroed"
    SWAP = "swapped"
    EARLIER = "earlier"
    LATER = "later"
    TORN = "torn"
    FLIP = "byte-flipped"


# -- streams -----------------------------------------------------------------------------


def ram_pages(path: Path) -> Iterator[RamPage | RamZero]:
    """Every RAM page record of the stream in `path`, in stream order."""
    reader = StreamReader()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            reader.feed(chunk)
            for record in reader.records():
                if isinstance(record, RamPage | RamZero):
                    yield record
    reader.close()


def page_data(path: Path, keys: set[PageKey]) -> dict[PageKey, bytes]:
    """The content of the pages `keys` in the stream in `path`."""
    found = {
        (rec.block, rec.offset): rec.data if isinstance(rec, RamPage) else bytes(PAGE_SIZE)
        for rec in ram_pages(path)
        if (rec.block, rec.offset) in keys
    }
    assert set(found) == keys, f"pages missing from {path}: {keys - set(found)}"
    return found


def rewrite(src: Path, dst: Path, replace: Mapping[PageKey, bytes | None]) -> None:
    """Copy stream `src` to `dst`, replacing pages (None: by a ZERO record)."""
    reader = StreamReader()
    done: set[PageKey] = set()
    with src.open("rb") as stream, dst.open("wb") as out:
        while chunk := stream.read(1 << 20):
            reader.feed(chunk)
            for record in reader.records():
                if isinstance(record, RamPage | RamZero):
                    key = (record.block, record.offset)
                    if key in replace:
                        new = replace[key]
                        record = (
                            RamZero(record.block, record.offset, record.continued)
                            if new is None
                            else RamPage(record.block, record.offset, new, record.continued)
                        )
                        done.add(key)
                out.write(encode(record))
    reader.close()
    assert done == set(replace), f"pages not found in {src}: {set(replace) - done}"


def snapshot(vm: VM, path: Path) -> Path:
    result = vm.background_snapshot_to_file(path, SNAPSHOT_TIMEOUT)
    assert result.ok, f"background snapshot failed: {result}"
    return path


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMFactory]:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(probe.reason)
    factory = VMFactory(tmp_path_factory.mktemp("vms"))
    yield factory
    factory.close()


def incoming(vm: VM, stream: Path) -> None:
    vm.migrate_incoming(f"exec:cat {shlex.quote(str(stream))}")
    result = vm.wait_migration(LOAD_TIMEOUT)
    assert result.status is MigrationStatus.COMPLETED, f"{stream.name}: load failed: {result}"


# -- linux -------------------------------------------------------------------------------


def agent_pages(path: Path) -> dict[int, tuple[PageKey, int]]:
    """Agent page index -> (where it is in the stream, its generation)."""
    found: dict[int, tuple[PageKey, int]] = {}
    for rec in ram_pages(path):
        if isinstance(rec, RamPage):
            header = AgentPageHeader.parse(rec.data)
            if header is not None:
                assert header.index not in found, f"agent page {header.index} twice in {path}"
                found[header.index] = ((rec.block, rec.offset), header.generation)
    assert set(found) == set(range(REGION_PAGES)), f"{path}: agent region incomplete"
    return found


def writer_position(pages: Mapping[int, tuple[PageKey, int]]) -> int:
    """The k of the snapshot: the first page still holding the older generation."""
    generations = {gen for _, gen in pages.values()}
    if len(generations) == 1:
        return 0
    assert len(generations) == 2, f"more than one sweep boundary: {sorted(generations)}"
    older = min(generations)
    return min(i for i, (_, gen) in pages.items() if gen == older)


def ahead(k: int, index: int) -> int:
    """How many pages the writer, at k, writes before it rewrites `index`."""
    return (index - k) % REGION_PAGES


@dataclass(frozen=True)
class LinuxSnapshots:
    """Snapshot `main` of the running agent, plus one before and one after it."""

    main: Path
    earlier: Path
    later: Path
    pages: Mapping[int, tuple[PageKey, int]]
    k: int


@pytest.fixture(scope="module")
def linux() -> LinuxGuest:
    return LinuxGuest.build()


@pytest.fixture(scope="module")
def linux_snapshots(
    vms: VMFactory, linux: LinuxGuest, tmp_path_factory: pytest.TempPathFactory
) -> LinuxSnapshots:
    work = tmp_path_factory.mktemp("linux-streams")
    vm = vms.create(name="linux-source", memory_mib=LINUX_MIB)
    with linux.boot(vm) as agent:
        agent.fill(REGION_MIB, seed=0x5EED)
        agent.writer_start(WRITER_RATE)
        time.sleep(0.5)
        earlier = snapshot(vm, work / "earlier.bin")
        time.sleep(1.0)
        main = snapshot(vm, work / "main.bin")
        pages = agent_pages(main)
        k = writer_position(pages)
        # Let the writer run half a sweep ahead at full speed, so that the pages farthest
        # from it in `main` have a newer generation in `later`.
        agent.writer_start(1_000_000)
        deadline = time.monotonic() + 60
        while True:
            status = agent.command("status")
            position = int(status["k"]) + int(status["g"]) * REGION_PAGES
            if position - (k + pages[k][1] * REGION_PAGES) > REGION_PAGES // 2 + WRITER_MARGIN:
                break
            assert time.monotonic() < deadline, f"writer stuck at {status}"
            time.sleep(0.2)
        agent.writer_start(WRITER_RATE)
        later = snapshot(vm, work / "later.bin")
    vm.shutdown()
    return LinuxSnapshots(main, earlier, later, pages, k)


def linux_damage(
    snaps: LinuxSnapshots, damage: Damage
) -> tuple[dict[PageKey, bytes | None], dict[int, PageFault]]:
    """The page replacements for `damage` and the faults verify must then report."""
    pages, k = snaps.pages, snaps.k
    far = (k + REGION_PAGES // 2) % REGION_PAGES
    key = pages[far][0]
    if damage is Damage.NONE:
        return {}, {}
    if damage is Damage.ZERO:
        return {key: None}, {far: PageFault.ZERO}
    if damage is Damage.SWAP:
        other = (far + 100) % REGION_PAGES
        other_key = pages[other][0]
        data = page_data(snaps.main, {key, other_key})
        return (
            {key: data[other_key], other_key: data[key]},
            {far: PageFault.WRONG_INDEX, other: PageFault.WRONG_INDEX},
        )
    if damage is Damage.FLIP:
        flipped = bytearray(page_data(snaps.main, {key})[key])
        flipped[1000] ^= 0x01
        return {key: bytes(flipped)}, {far: PageFault.BAD_CHECKSUM}
    source = snaps.earlier if damage is Damage.EARLIER else snaps.later
    index = far_page_that_differs(snaps, source)
    key = pages[index][0]
    other_data = page_data(source, {key})[key]
    if damage is Damage.TORN:
        # The first half as in `main`, the rest as in `later`: a page copied mid-write.
        half = PAGE_SIZE // 2
        torn = page_data(snaps.main, {key})[key][:half] + other_data[half:]
        return {key: torn}, {index: PageFault.BAD_CHECKSUM}
    fault = PageFault.GEN_TOO_OLD if damage is Damage.EARLIER else PageFault.GEN_TOO_NEW
    return {key: other_data}, {index: fault}


def far_page_that_differs(snaps: LinuxSnapshots, source: Path) -> int:
    """A page whose generation in `source` differs from `main`, far from the writer."""
    pages, k = snaps.pages, snaps.k
    other_pages = agent_pages(source)
    differ = [
        i
        for i in range(REGION_PAGES)
        if other_pages[i][1] != pages[i][1] and other_pages[i][0] == pages[i][0]
    ]
    # Away from the writer in both snapshots: the page it was writing when `source` was
    # taken may be half written there (a snapshot is an instant, mid-memcpy included).
    k_source = writer_position(other_pages)
    safe = [
        i
        for i in differ
        if all(
            WRITER_MARGIN <= ahead(at, i) <= REGION_PAGES - WRITER_MARGIN for at in (k, k_source)
        )
    ]
    assert safe, f"no page of {source.name} differs from {snaps.main.name} away from the writer"
    return min(safe, key=lambda i: abs(ahead(k, i) - REGION_PAGES // 2))


def revert_and_verify(vms: VMFactory, linux: LinuxGuest, name: str, stream: Path) -> VerifyReport:
    vm = vms.create(name=name, memory_mib=LINUX_MIB, incoming_defer=True, paused=True)
    socket_path = linux.configure(vm)
    vm.launch()
    with AgentClient.connect(socket_path) as agent:
        incoming(vm, stream)
        agent.send("verify")  # queued in the serial port until the guest runs
        vm.cont()
        report = agent.parse_verify(agent.answer("verify", timeout=60))
    vm.shutdown()
    return report


@pytest.mark.parametrize("damage", list(Damage), ids=str)
def test_linux_agent_detects(
    damage: Damage,
    vms: VMFactory,
    linux: LinuxGuest,
    linux_snapshots: LinuxSnapshots,
    tmp_path: Path,
) -> None:
    replace, expected = linux_damage(linux_snapshots, damage)
    stream = tmp_path / f"{damage.value}.bin"
    rewrite(linux_snapshots.main, stream, replace)

    report = revert_and_verify(vms, linux, f"linux-{damage.value}", stream)

    assert report.pages == REGION_PAGES
    # The writer state came back with the memory (it may have written a few pages since).
    assert ahead(linux_snapshots.k, report.k) < WRITER_MARGIN, (linux_snapshots.k, report)
    assert report.bad == len(expected), report
    assert report.faults() == expected, report
    assert dict(report.counts) == dict(Counter(expected.values())), report
    if damage is Damage.SWAP:
        assert {b.value for b in report.first} == set(expected), report


# -- pattern -----------------------------------------------------------------------------


def pattern_first_bytes(path: Path) -> bytes:
    """First byte of every swept page of pc.ram in the stream in `path`."""
    swept = PatternGuest.swept_range(PATTERN_MIB)
    values = bytearray(len(swept))
    seen = 0
    for rec in ram_pages(path):
        if rec.block == "pc.ram" and rec.offset in swept:
            values[(rec.offset - swept.start) // PAGE_SIZE] = (
                rec.data[0] if isinstance(rec, RamPage) else 0
            )
            seen += 1
    assert seen == len(swept), f"{path}: {len(swept) - seen} swept pages missing"
    return bytes(values)


def check_stream(path: Path) -> SweepReport:
    return check_sweep(pattern_first_bytes(path), block="pc.ram", start=PatternGuest.SWEEP_START)


@dataclass(frozen=True)
class PatternSnapshots:
    """Snapshot `main` with a sweep edge, and `later` where the chosen page differs."""

    main: Path
    later: Path
    high: int
    """Offset of a page in the middle of the run below the edge (value v + 1)."""
    low: int
    """Offset of a page in the middle of the run above the edge (value v)."""
    target: int
    """Offset of a page whose first byte is nonzero in `main` and differs in `later`."""


def middle_page(start: int, end: int) -> int:
    return start + (end - start) // PAGE_SIZE // 2 * PAGE_SIZE


@pytest.fixture(scope="module")
def pattern() -> PatternGuest:
    return PatternGuest.build()


@pytest.fixture(scope="module")
def pattern_snapshots(
    vms: VMFactory, pattern: PatternGuest, tmp_path_factory: pytest.TempPathFactory
) -> PatternSnapshots:
    work = tmp_path_factory.mktemp("pattern-streams")
    vm = vms.create(name="pattern-source", memory_mib=PATTERN_MIB)
    pattern.configure(vm)
    vm.launch()
    marker = PatternGuest.MARKER.decode()
    vm.wait_console(marker * 3, timeout=60)
    start = PatternGuest.SWEEP_START
    end = PatternGuest.swept_range(PATTERN_MIB).stop
    for attempt in range(5):
        main = snapshot(vm, work / f"main-{attempt}.bin")
        report = check_stream(main)
        assert report.ok, f"a real snapshot breaks the sweep rule: {report.violation}"
        # Runs of at least 3 pages on both sides of the edge, to damage their middles.
        if report.edge is not None and start + 3 * PAGE_SIZE <= report.edge <= end - 3 * PAGE_SIZE:
            break
    else:
        pytest.fail("5 snapshots in a row had no usable sweep edge")
    high, low = middle_page(start, report.edge), middle_page(report.edge, end)
    values = pattern_first_bytes(main)
    target = high if values[(high - start) // PAGE_SIZE] else low
    for attempt in range(5):
        console = vm.console_size()
        vm.wait_console(marker, timeout=30, start=console)
        later = snapshot(vm, work / f"later-{attempt}.bin")
        index = (target - start) // PAGE_SIZE
        if pattern_first_bytes(later)[index] != values[index]:
            break
    else:
        pytest.fail("5 later snapshots had the same first byte at the target page")
    vm.shutdown()
    return PatternSnapshots(main, later, high, low, target)


def pattern_damage(snaps: PatternSnapshots, damage: Damage) -> dict[PageKey, bytes | None]:
    block = "pc.ram"
    target = (block, snaps.target)
    if damage is Damage.NONE:
        return {}
    if damage is Damage.ZERO:
        return {target: None}
    if damage is Damage.SWAP:
        high, low = (block, snaps.high), (block, snaps.low)
        data = page_data(snaps.main, {high, low})
        return {high: data[low], low: data[high]}
    if damage is Damage.LATER:
        return {target: page_data(snaps.later, {target})[target]}
    assert damage is Damage.FLIP
    flipped = bytearray(page_data(snaps.main, {target})[target])
    flipped[0] ^= 0x80
    return {target: bytes(flipped)}


def read_swept(vm: VM, dump: Path) -> SweepReport:
    """The sweep check over the paused guest's RAM, read with pmemsave."""
    vm.command("pmemsave", val=0, size=PATTERN_MIB << 20, filename=str(dump))
    swept = PatternGuest.swept_range(PATTERN_MIB)
    values = first_bytes(dump.read_bytes(), swept.start, swept.stop)
    dump.unlink()
    return check_sweep(values, block="pc.ram", start=swept.start)


def load_run_and_check(
    vms: VMFactory, pattern: PatternGuest, name: str, stream: Path, dump: Path
) -> tuple[SweepReport, SweepReport]:
    """Load `stream`; check RAM as loaded, and again after the guest swept on a little."""
    vm = vms.create(name=name, memory_mib=PATTERN_MIB, incoming_defer=True, paused=True)
    pattern.configure(vm)
    vm.launch()
    incoming(vm, stream)
    loaded = read_swept(vm, dump)
    vm.cont()
    vm.wait_console(PatternGuest.MARKER.decode() * 2, timeout=30)
    vm.stop()
    after_running = read_swept(vm, dump)
    vm.shutdown()
    return loaded, after_running


PATTERN_DAMAGE = [d for d in Damage if d not in (Damage.EARLIER, Damage.TORN)]
"""Only the first byte of a page matters to the pattern guest: torn is a later first byte."""


@pytest.mark.parametrize("damage", PATTERN_DAMAGE, ids=str)
def test_pattern_sweep_check_detects(
    damage: Damage,
    vms: VMFactory,
    pattern: PatternGuest,
    pattern_snapshots: PatternSnapshots,
    tmp_path: Path,
) -> None:
    replace = pattern_damage(pattern_snapshots, damage)
    stream = tmp_path / f"{damage.value}.bin"
    rewrite(pattern_snapshots.main, stream, replace)

    reports = load_run_and_check(vms, pattern, f"pattern-{damage.value}", stream, tmp_path / "ram")

    # A damaged page that reads one less than its run is taken for the sweep edge; the
    # page after it is then the first one the rule rejects.
    named = {offset for _, page in replace for offset in (page, page + PAGE_SIZE)}
    for when, report in zip(("as loaded", "after running"), reports, strict=True):
        if damage is Damage.NONE:
            assert report.ok, f"{when}: {report.violation}"
            continue
        assert report.violation is not None, f"{damage} page not detected {when}"
        assert report.violation.block == "pc.ram"
        assert report.violation.offset in named, (when, str(report.violation), sorted(named))
