"""The command line: the seed's ``qemu-snapshot`` syntax maps onto qsnap subcommands."""

from __future__ import annotations

import pytest

from qsnap import cli


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    seen: list[list[str]] = []

    def fake_main(argv: list[str] | None = None, *, ahead: object = None) -> int:
        seen.append(list(argv or []))
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    return seen


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["img.qcow2"], ["save", "img.qcow2"]),
        (
            ["--save-vmstate", "img,cache.direct=on"],
            ["save", "img,cache.direct=on", "--save-vmstate"],
        ),
        (["--page-size=16384", "i"], ["save", "i", "--page-size=16384"]),
        (["-r", "i"], ["revert", "i"]),
        (["--revert", "--postcopy", "i"], ["revert", "i", "--postcopy"]),
        (["--revert", "--postcopy=30", "i"], ["revert", "i", "--postcopy=30"]),
    ],
)
def test_qemu_snapshot_syntax(calls: list[list[str]], argv: list[str], expected: list[str]) -> None:
    assert cli.qemu_snapshot_main(argv) == 0
    assert calls == [expected]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--postcopy", "i"], "--postcopy needs --revert"),
        (["-r", "--save-vmstate", "i"], "--save-vmstate is a save option"),
    ],
)
def test_qemu_snapshot_rejects_mixed_modes(
    calls: list[list[str]], argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.qemu_snapshot_main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert calls == []


def test_parser_offers_builtin_subcommands_and_present_plugins() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["save", "--save-vmstate", "--page-size", "16K", "x.qcow2"])
    assert (args.image, args.save_vmstate, args.page_size) == ("x.qcow2", True, 16384)
    args = parser.parse_args(["create", "x", "--ram-size", "2G"])
    assert (args.ram_size, args.vmstate_size) == (2 << 30, 64 << 20)
    with pytest.raises(SystemExit):
        parser.parse_args(["save", "--page-size", "3000", "x"])
