"""QEMU discovery and version parsing, with fake programs (the probes need real QEMU)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qsnap.harness.qemu import (
    Accel,
    Program,
    QemuNotFound,
    QemuVersion,
    accel_from_env,
    find_program,
)

numbers = st.integers(0, 99)


@given(numbers, numbers, numbers, st.text("abc -+~:.1", max_size=20))
def test_version_parse(major: int, minor: int, micro: int, package: str) -> None:
    text = f"QEMU emulator version {major}.{minor}.{micro} ({package})\nCopyright (c) 2003"
    version = QemuVersion.parse(text)
    assert (version.major, version.minor, version.micro) == (major, minor, micro)
    assert version.package == package
    assert str(version) == f"{major}.{minor}.{micro}"


def test_version_forms_and_order() -> None:
    assert QemuVersion.parse("qemu-img version 9.2.0\n") == QemuVersion(9, 2, 0)
    assert QemuVersion.parse("qemu-storage-daemon version 7.2") == QemuVersion(7, 2, 0)
    assert QemuVersion(10, 0, 2, "Debian") == QemuVersion(10, 0, 2)
    assert QemuVersion(9, 2, 4) < QemuVersion(10, 0, 0) < QemuVersion(10, 0, 2)
    with pytest.raises(ValueError, match="no QEMU version in 'hello'"):
        QemuVersion.parse("hello")


def make_program(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_program_order(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    on_path = make_program(tmp_path / "bin", "qemu-img")
    by_env = make_program(tmp_path, "my-qemu-img")
    explicit = make_program(tmp_path, "other-img")
    env = {"PATH": os.fspath(tmp_path / "bin")}
    assert find_program(Program.IMG, env=env) == on_path
    env["QSNAP_QEMU_IMG"] = os.fspath(by_env)
    assert find_program(Program.IMG, env=env) == by_env
    assert find_program(Program.IMG, explicit, env=env) == explicit


def test_find_program_names_what_is_missing(tmp_path: Path) -> None:
    env = {"PATH": os.fspath(tmp_path), "QSNAP_QEMU": "/nonexistent/qemu"}
    with pytest.raises(QemuNotFound, match=r"'/nonexistent/qemu' \(from QSNAP_QEMU\) not found"):
        find_program(Program.SYSTEM, env=env)
    with pytest.raises(QemuNotFound, match=r"'qemu-storage-daemon' \(from PATH\) not found"):
        find_program(Program.STORAGE_DAEMON, env={"PATH": os.fspath(tmp_path)})


def test_accelerator_is_tcg_unless_asked() -> None:
    assert accel_from_env(env={}) is Accel.TCG
    assert accel_from_env(env={"QSNAP_ACCEL": "KVM"}) is Accel.KVM
    assert accel_from_env("tcg", env={"QSNAP_ACCEL": "kvm"}) is Accel.TCG
    with pytest.raises(ValueError, match="accelerator 'hvf' unknown"):
        accel_from_env("hvf", env={})
