"""The ``vigil`` command: every subcommand's entry point imports and the help lists them."""

from __future__ import annotations

import importlib

import pytest

from vigil_tools.cli import COMMANDS, main

ENTRY_POINTS = {
    "run": ("vigil_tools.localrun", "main"),
    "pages": ("vigil_tools.localrun", "pages_main"),
    "stack": ("vigil_tools.stack", "main"),
    "ingest": ("services.ingest.app", "main"),
    "rules": ("services.rules.app", "main"),
    "notify": ("services.notify.app", "main"),
    "simulate": ("vigil_tools.simulator.publisher", "main"),
    "api": ("services.api.app", "main"),
    "admin": ("vigil_tools.admin", "main"),
    "replay": ("vigil_tools.replay.cli", "main"),
    "audit": ("vigil.audit.cli", "main"),
    "migrate": ("vigil.db.migrate", "apply_migrations"),
    "heartbeat": ("vigil_tools.heartbeat", "main"),
    "register-heartbeat": ("vigil_tools.localrun", "register_heartbeat_main"),
}


def test_every_command_has_a_known_entry_point() -> None:
    """The table above covers every subcommand the CLI offers."""
    assert set(COMMANDS) == set(ENTRY_POINTS)


@pytest.mark.parametrize(("command", "target"), sorted(ENTRY_POINTS.items()))
def test_entry_point_imports(command: str, target: tuple[str, str]) -> None:
    """A subcommand whose module fails to import would only fail when someone runs it."""
    module = importlib.import_module(target[0])
    assert callable(getattr(module, target[1])), command


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`vigil --help` exits 0 and names each subcommand."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_unknown_command_is_refused() -> None:
    """A mistyped command is an error, not a silent no-op."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
