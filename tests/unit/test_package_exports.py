"""The packages' lazy re-exports: every name resolves, and start-up stays lean."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ("qsnap.stream", "qsnap.image")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_its_submodule_object(package: str) -> None:
    module = importlib.import_module(package)
    exports = module._EXPORTS
    assert sorted(exports) == sorted(module.__all__)
    for name, submodule in exports.items():
        defined = importlib.import_module(f"{package}.{submodule}")
        assert getattr(module, name) is getattr(defined, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_unknown_names_are_attribute_errors(package: str) -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        _ = importlib.import_module(package).nothing_here


def test_revert_does_not_load_the_save_side() -> None:
    """What `qsnap revert` imports: not the stream reader, the image writer or save."""
    code = (
        "import sys, qsnap.cli, qsnap.revert.command, qsnap.revert.postcopy\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('qsnap'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "qsnap.revert.precopy" in loaded
    for unwanted in ("qsnap.stream.reader", "qsnap.image.writer", "qsnap.save", "qsnap.analyze"):
        assert unwanted not in loaded
