"""Command line of the local stack: ``up``, ``down [--purge]``, ``status [--json]``, ``env``,
``fetch`` (the Kafka jars only), ``add-device ID``, ``rotate-device ID`` and ``revoke-device ID``.

``main(argv)`` is what ``python -m vigil_tools.stack`` runs. ``add_stack_commands(subparsers)``
mounts the same commands under another parser (``vigil stack ...``); the parsed namespace then
carries ``stack_handler``, a callable taking the namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from vigil_tools.stack.kafka import ensure_jars
from vigil_tools.stack.mosquitto import (
    add_device_credential,
    revoke_device_credential,
    rotate_device_credential,
)
from vigil_tools.stack.process import StackError
from vigil_tools.stack.settings import StackSettings
from vigil_tools.stack.stack import down, stack_env, status, up

Handler = Callable[[argparse.Namespace], int]

_DESCRIPTION = (
    "The local stack: Mosquitto, Kafka, PostgreSQL and an SMTP sink, configured by "
    "VIGIL_STACK_* variables (data dir, ports)."
)

log = logging.getLogger("vigil.stack")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _up(args: argparse.Namespace) -> int:
    del args
    started = time.monotonic()
    up(StackSettings())
    log.info("up took %.1f s", time.monotonic() - started)
    return 0


def _down(args: argparse.Namespace) -> int:
    down(StackSettings(), purge=bool(args.purge))
    return 0


def _status(args: argparse.Namespace) -> int:
    report = status(StackSettings())
    if args.json:
        _out(json.dumps(report, indent=2))
    else:
        for name, info in report.items():
            state = f"running (pid {info['pid']})" if info["running"] else "stopped"
            _out(f"{name:<10} {state:<22} 127.0.0.1:{info['port']:<6} {info['log']}")
    # Non-zero when anything is down, so scripts can use `status` as a check.
    return 0 if all(info["running"] for info in report.values()) else 3


def _env(args: argparse.Namespace) -> int:
    prefix = "export " if args.export else ""
    for key, value in stack_env(StackSettings()).items():
        _out(f"{prefix}{key}={shlex.quote(value)}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    del args
    ensure_jars(StackSettings())
    return 0


def _add_device(args: argparse.Namespace) -> int:
    _out(add_device_credential(StackSettings(), args.device_id))
    return 0


def _rotate_device(args: argparse.Namespace) -> int:
    _out(rotate_device_credential(StackSettings(), args.device_id))
    return 0


def _revoke_device(args: argparse.Namespace) -> int:
    revoke_device_credential(StackSettings(), args.device_id)
    return 0


def _populate(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="stack_command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(stack_handler=handler)
        return sub

    add("up", _up, "start what is not running and wait until everything is ready")
    add("fetch", _fetch, "download the Kafka jars into their cache unless already there")
    add("down", _down, "stop every component").add_argument(
        "--purge", action="store_true", help="also delete the data directory"
    )
    add("status", _status, "show each component's state, pid, port and log").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    add("env", _env, "print the VIGIL_* variables services need").add_argument(
        "--export", action="store_true", help="prefix each line with `export `"
    )
    add(
        "add-device",
        _add_device,
        "create a device's MQTT account only; prints its password. Its messages are "
        "dead-lettered as unknown_device until it is registered and bound: `vigil admin "
        "add-device` does all of it in one step",
    ).add_argument("device_id")
    add(
        "rotate-device", _rotate_device, "replace a device's MQTT password; prints the new one"
    ).add_argument("device_id")
    add("revoke-device", _revoke_device, "delete a device's MQTT account").add_argument("device_id")


def add_stack_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Mount ``stack <command>`` on an ``argparse`` subparsers object; returns the new parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "stack", help="run the local stack", description=_DESCRIPTION
    )
    _populate(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a namespace parsed by a parser built with :func:`add_stack_commands`."""
    handler: Handler = args.stack_handler
    try:
        return handler(args)
    except (StackError, ValueError) as exc:
        log.error("%s", exc)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vigil_tools.stack", description=_DESCRIPTION)
    _populate(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    return run(args)
