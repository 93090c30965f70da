"""The ``vigil api`` command: serve the API and dashboard, or create a login.

The application itself is wired in ``bootstrap.create_app``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import uuid
from typing import Any

import asyncpg

from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from vigil.runtime import configure_logging


async def _create_user(settings: ApiSettings, args: argparse.Namespace, password: str) -> None:
    pool = await asyncpg.create_pool(settings.pg.dsn, min_size=1, max_size=1)
    try:
        await ApiRepository(pool).create_user(
            args.user_id or f"u-{uuid.uuid4().hex[:10]}",
            args.username,
            args.display_name or args.username,
            hash_password(password),
            Role(args.role),
            args.teams,
        )
    finally:
        await pool.close()


def server_options(settings: ApiSettings) -> dict[str, Any]:
    """How the HTTP server treats forwarded headers: believed only from the configured proxies.
    Uvicorn's own default believes them from any loopback client, so a local process could
    claim any address and dodge the per-address login limit."""
    proxies = settings.trusted_proxies.strip()
    if not proxies:
        return {"proxy_headers": False, "forwarded_allow_ips": ""}
    return {"proxy_headers": True, "forwarded_allow_ips": proxies}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vigil api")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the API and dashboard (default)")
    user = commands.add_parser("create-user", help="create or update a login")
    user.add_argument("--username", required=True)
    user.add_argument("--role", required=True, choices=[r.value for r in Role])
    user.add_argument("--teams", nargs="+", required=True, metavar="CARE_TEAM_ID")
    user.add_argument("--display-name")
    user.add_argument("--user-id")
    user.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of prompting",
    )
    args = parser.parse_args(argv)
    settings = ApiSettings()
    configure_logging(settings.log_level)
    if args.command == "create-user":
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
        if len(password) < 12:
            print("vigil api: passwords need at least 12 characters", file=sys.stderr)
            return 2
        asyncio.run(_create_user(settings, args, password))
        return 0
    serve(settings)
    return 0


def serve(settings: ApiSettings, **wiring: Any) -> None:
    """Serve ``create_app(settings, **wiring)`` until stopped (``vigil run`` passes the local
    stack's broker accounts this way)."""
    import uvicorn

    uvicorn.run(
        create_app(settings, **wiring),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        **server_options(settings),
    )
