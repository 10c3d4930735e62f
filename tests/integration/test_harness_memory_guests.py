"""Memory references of real guests: stable, exact to the page, cross-checked by pmemsave.

The guests run the halt-bios firmware, so their RAM is exactly what QEMU put there and an
injected byte (`-device loader`) is the only difference between two of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from qsnap.harness.firmware import BIOS_SIZE, halt_bios_image, write_halt_bios
from qsnap.harness.memory import (
    MemoryReferenceError,
    PageRef,
    compare,
    crosscheck_main_ram,
    reference_from_file,
    take_reference,
)
from qsnap.harness.qemu import find_qemu, probe_background_snapshot
from qsnap.harness.vm import VM, RunState, VMFactory

pytestmark = pytest.mark.qemu

MEMORY_MIB = 64
POKE_ADDR = 0x200123


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[VMFactory]:
    probe = probe_background_snapshot(find_qemu())
    if not probe:
        pytest.skip(probe.reason)
    factory = VMFactory(tmp_path, memory_mib=MEMORY_MIB)
    yield factory
    factory.close()


def halted_vm(vms: VMFactory, tmp_path: Path, *args: str, machine: str = "pc") -> VM:
    """A VM that ran its halt firmware and is now paused."""
    vm = vms(machine=machine, paused=True, args=["-bios", str(write_halt_bios(tmp_path)), *args])
    vm.cont()
    vm.stop()
    assert vm.runstate() is RunState.PAUSED
    return vm


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_reference_is_stable_and_holds_every_block(
    vms: VMFactory, tmp_path: Path, machine: str
) -> None:
    vm = halted_vm(vms, tmp_path, machine=machine)
    first = take_reference(vm, stream_path=tmp_path / "first.stream")
    second = take_reference(vm)
    assert vm.runstate() is RunState.PAUSED

    diff = compare(first, second)
    assert diff.matches, diff.summary()
    assert diff.summary() == f"memory matches reference: {diff.blocks} blocks, {diff.pages} pages"
    names = {block.idstr for block in first.blocks}
    assert {"pc.ram", "pc.bios", "pc.rom"} <= names
    assert any(name.endswith("/vga.vram") for name in names), names
    assert first.block("pc.ram").length == MEMORY_MIB << 20

    bios = halt_bios_image()
    assert first.block("pc.bios").length == BIOS_SIZE
    for index in range(BIOS_SIZE // 4096):
        page = bios[index * 4096 : (index + 1) * 4096]
        assert first.block("pc.bios").digest(index) == hashlib.blake2b(page, digest_size=8).digest()
    assert compare(first, reference_from_file(tmp_path / "first.stream")).matches


def test_one_injected_byte_is_named_by_block_and_page(vms: VMFactory, tmp_path: Path) -> None:
    poke = tmp_path / "poke.bin"
    poke.write_bytes(b"\x5a")
    plain = take_reference(halted_vm(vms, tmp_path))
    poked_vm = halted_vm(vms, tmp_path, "-device", f"loader,file={poke},addr={POKE_ADDR:#x}")
    poked = take_reference(poked_vm)

    diff = compare(plain, poked)
    assert diff.mismatches == (PageRef("pc.ram", POKE_ADDR & ~0xFFF),)
    assert (diff.missing_blocks, diff.extra_blocks, diff.geometry) == ((), (), ())
    assert diff.summary() == "1 page differs: pc.ram+0x200000"

    # pmemsave sees the poked page, so the cross-check rejects the other VM's reference.
    message = r"pmemsave disagrees with the stream on 1 page: pc.ram\+0x200000$"
    with pytest.raises(MemoryReferenceError, match=message):
        crosscheck_main_ram(poked_vm, plain, tmp_path)


def test_reference_needs_a_paused_guest(vms: VMFactory, tmp_path: Path) -> None:
    prelaunch = vms(paused=True)
    with pytest.raises(MemoryReferenceError, match="no background snapshot in prelaunch"):
        take_reference(prelaunch)
    assert prelaunch.runstate() is RunState.PRELAUNCH, "QEMU must survive the refusal"

    running = vms()
    with pytest.raises(MemoryReferenceError, match="needs a paused guest, not running"):
        take_reference(running)
