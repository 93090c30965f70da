"""The ``vigil`` command: one subcommand per service, the simulator, the local stack, the run.

Each subcommand builds its settings at start-up from the environment (and the local stack's
``stack.env`` when ``--local`` applies), then hands over to the service's own entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _service(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        if name == "ingest":
            from services.ingest.app import main
        elif name == "rules":
            from services.rules.app import main
        elif name == "notify":
            from services.notify.app import main
        elif name == "api":
            from services.api.app import main
        elif name == "simulate":
            from vigil_tools.simulator.publisher import main
        else:  # pragma: no cover - the parser only offers the names above
            raise SystemExit(f"unknown service {name}")
        return main(argv)

    return run


def _stack(argv: list[str]) -> int:
    from vigil_tools.stack import main

    return main(argv)


def _migrate(argv: list[str]) -> int:
    import asyncio

    from vigil.db.migrate import apply_migrations
    from vigil.settings import PostgresSettings

    parser = argparse.ArgumentParser(
        prog="vigil migrate",
        description="Apply the database migrations to VIGIL_PG_DSN (as the schema's owner).",
    )
    parser.add_argument(
        "--grant-to",
        metavar="ROLE",
        help="then grant this existing role the services' privileges on the schema "
        "(rows only; the append-only tables insert-only): see vigil/db/privileges.py",
    )
    args = parser.parse_args(argv)
    dsn = PostgresSettings().dsn
    applied = asyncio.run(apply_migrations(dsn))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    if args.grant_to:
        from vigil.db.privileges import grant_service_role

        granted = asyncio.run(grant_service_role(dsn, args.grant_to))
        print(
            f"granted to {args.grant_to}: {len(granted['tables'])} tables, "
            f"{len(granted['append_only'])} append-only tables (insert only), "
            f"{len(granted['views'])} views"
        )
    return 0


def _replay(argv: list[str]) -> int:
    from vigil_tools.replay.cli import main

    return main(argv)


def _audit(argv: list[str]) -> int:
    from vigil.audit.cli import main

    return main(argv)


def _heartbeat(argv: list[str]) -> int:
    from vigil_tools.heartbeat import main

    return main(argv)


def _admin(argv: list[str]) -> int:
    from vigil_tools.admin import main

    return main(argv)


def _run(argv: list[str]) -> int:
    from vigil_tools.localrun import main

    return main(argv)


def _register_heartbeat(argv: list[str]) -> int:
    from vigil_tools.localrun import register_heartbeat_main

    return register_heartbeat_main(argv)


def _pages(argv: list[str]) -> int:
    from vigil_tools.localrun import pages_main

    return pages_main(argv)


COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "run": ("the whole pipeline on the local stack with a simulated device fleet", _run),
    "stack": ("the local stack: up | down [--purge] | status | env", _stack),
    "ingest": ("run the ingest service", _service("ingest")),
    "rules": ("run the rules service", _service("rules")),
    "notify": ("run the notify service", _service("notify")),
    "api": ("care-team API and dashboard: serve | create-user", _service("api")),
    "simulate": ("run the simulated home-device fleet", _service("simulate")),
    "admin": ("enrol, onboard devices, end infusions, discharge (`vigil admin --help`)", _admin),
    "migrate": ("apply database migrations to VIGIL_PG_DSN", _migrate),
    "replay": ("re-run recorded telemetry through pinned rules; compare; report", _replay),
    "audit": ("the tamper-evident audit log: list | verify", _audit),
    "pages": ("list the pages recorded by notify on the local stack", _pages),
    "heartbeat": ("publish the pipeline heartbeat that notify watches", _heartbeat),
    "register-heartbeat": ("register the heartbeat device and technical team", _register_heartbeat),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="vigil",
        description="Vigil: remote monitoring of home blinatumomab infusions.",
        epilog="\n".join(f"  {name:<18} {help_}" for name, (help_, _) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    parsed = parser.parse_args(args[:1])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return COMMANDS[parsed.command][1](args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
