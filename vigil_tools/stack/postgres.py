"""The stack's PostgreSQL 15: a private cluster under ``data_dir/postgres``.

Owns ``initdb`` (superuser ``postgres`` with a generated SCRAM password, no trust anywhere), the
rendered ``vigil-local.conf`` and ``pg_hba.conf`` (templates in ``vigil_tools/stack/templates``),
the ``vigil`` role and database, TimescaleDB when it is installed, and applying the schema
migrations through ``vigil.db.migrate.apply_migrations``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Final

import asyncpg

from vigil_tools.stack.credentials import (
    PG_APP_DATABASE,
    PG_APP_ROLE,
    PG_SUPERUSER,
    StackSecrets,
    ensure_secrets,
)
from vigil_tools.stack.process import (
    Component,
    StackError,
    chown_tree,
    ensure_port_free,
    is_root,
    port_accepts,
    render_template,
    run_checked,
    running_pid,
    spawn,
    tail,
    wait_until,
    write_file,
)
from vigil_tools.stack.settings import StackSettings

log = logging.getLogger(__name__)

NAME: Final = "postgres"
OS_USER: Final = "postgres"
_TEMPLATES: Final = Path(__file__).parent / "templates"
_INCLUDE_LINE: Final = "include 'vigil-local.conf'"
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107


def cluster_dir(settings: StackSettings) -> Path:
    return settings.postgres_dir / "cluster"


def socket_dir(settings: StackSettings) -> Path:
    return settings.postgres_dir / "run"


def component(settings: StackSettings) -> Component:
    return Component(
        name=NAME,
        pid_file=settings.pids_dir / f"{NAME}.pid",
        log_file=settings.postgres_dir / "postgres.log",
        marker=str(cluster_dir(settings)),
        port=settings.pg_port,
        # SIGTERM is PostgreSQL's "smart" shutdown, which waits for every client to disconnect
        # (a forgotten service would block `down`); SIGINT is the "fast" one: roll back, exit.
        stop_signal=signal.SIGINT,
    )


def app_dsn(settings: StackSettings, password: str) -> str:
    return f"postgresql://{PG_APP_ROLE}:{password}@127.0.0.1:{settings.pg_port}/{PG_APP_DATABASE}"


def _bin(settings: StackSettings, name: str) -> str:
    return str(settings.pg_bin_dir / name)


def _server_env() -> dict[str, str]:
    # A minimal environment: PG* variables of the caller (PGDATA, PGPORT...) must not leak in.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}


def timescaledb_available(settings: StackSettings) -> bool:
    """Whether the TimescaleDB library is installed for this PostgreSQL."""
    pkglibdir = run_checked(
        [_bin(settings, "pg_config"), "--pkglibdir"], what="pg_config --pkglibdir", timeout_s=10.0
    ).strip()
    return (Path(pkglibdir) / "timescaledb.so").exists()


# A local stack has no business reporting usage to a third party. TimescaleDB runs each policy
# job (compression, retention, aggregate refresh) in a background worker of its own: with
# PostgreSQL's default of 8 worker processes a burst of jobs fails to start, and the scheduler
# may exit when a job it failed to start was deleted meanwhile. Its guidance: worker processes
# >= its background workers + parallel workers (8) + 3.
_TIMESCALEDB_SETTINGS = """timescaledb.telemetry_level = off
timescaledb.max_background_workers = 8
max_worker_processes = 19"""


def render_postgresql_conf(settings: StackSettings, *, timescaledb: bool) -> str:
    """The stack's server settings (pure: reads only the template)."""
    return render_template(
        _TEMPLATES / "postgresql.conf.tmpl",
        {
            "port": settings.pg_port,
            "socket_dir": socket_dir(settings),
            "shared_preload_libraries": "timescaledb" if timescaledb else "",
            "extra_settings": _TIMESCALEDB_SETTINGS if timescaledb else "",
        },
    )


def render_pg_hba(settings: StackSettings) -> str:
    """Who may connect how (pure: reads only the template)."""
    del settings  # the rules do not depend on ports or paths
    return render_template(
        _TEMPLATES / "pg_hba.conf.tmpl",
        {"superuser": PG_SUPERUSER, "database": PG_APP_DATABASE, "app_role": PG_APP_ROLE},
    )


def _check_paths(settings: StackSettings) -> None:
    socket_path = socket_dir(settings) / f".s.PGSQL.{settings.pg_port}"
    if len(str(socket_path).encode()) > _MAX_SOCKET_PATH:
        raise StackError(
            f"the PostgreSQL socket path {socket_path} is longer than the {_MAX_SOCKET_PATH} "
            "bytes a Unix socket allows; use a shorter VIGIL_STACK_DATA_DIR"
        )
    if "'" in str(settings.data_dir):
        raise StackError(f"PostgreSQL cannot use a data dir containing ': {settings.data_dir}")


def _initdb(settings: StackSettings, secrets: StackSecrets) -> None:
    cluster = cluster_dir(settings)
    if (cluster / "PG_VERSION").exists():
        return
    # A cluster dir without PG_VERSION is the leftover of an interrupted initdb, which would
    # refuse to run on a non-empty directory.
    shutil.rmtree(cluster, ignore_errors=True)
    pwfile = settings.postgres_dir / ".initdb-pw"
    write_file(pwfile, secrets.pg_superuser_password + "\n", mode=0o600)
    chown_tree(settings.postgres_dir, OS_USER)
    log.info("initialising a PostgreSQL cluster in %s", cluster)
    try:
        run_checked(
            [
                _bin(settings, "initdb"),
                "--pgdata",
                str(cluster),
                "--username",
                PG_SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            what="initdb",
            timeout_s=120.0,
            env=_server_env(),
            cwd=settings.postgres_dir,
            user=OS_USER,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            pwfile.unlink()
    conf = cluster / "postgresql.conf"
    conf.write_text(
        conf.read_text() + f"\n# Added by the Vigil local stack (vigil_tools/stack/postgres.py).\n"
        f"{_INCLUDE_LINE}\n"
    )


def _write_config(settings: StackSettings) -> None:
    cluster = cluster_dir(settings)
    write_file(
        cluster / "vigil-local.conf",
        render_postgresql_conf(settings, timescaledb=timescaledb_available(settings)),
        mode=0o600,
    )
    write_file(cluster / "pg_hba.conf", render_pg_hba(settings), mode=0o600)
    socket_dir(settings).mkdir(mode=0o700, exist_ok=True)
    component(settings).log_file.touch()
    chown_tree(settings.postgres_dir, OS_USER)


async def _superuser_ready(settings: StackSettings, password: str) -> bool:
    try:
        conn = await asyncpg.connect(
            host=str(socket_dir(settings)),
            port=settings.pg_port,
            user=PG_SUPERUSER,
            password=password,
            database="postgres",
            timeout=2.0,
        )
    except (TimeoutError, OSError, asyncpg.PostgresError):
        # Includes "the database system is starting up" while the server recovers or boots.
        return False
    await conn.close()
    return True


def _quote_literal(value: str) -> str:
    # Utility statements (CREATE/ALTER ROLE) take no bind parameters; standard_conforming_strings
    # is on, so doubling quotes is the whole escaping.
    return "'" + value.replace("'", "''") + "'"


async def _provision(settings: StackSettings, secrets: StackSecrets, timescaledb: bool) -> None:
    """Create (or re-align) the application role and database; idempotent."""
    admin = await asyncpg.connect(
        host=str(socket_dir(settings)),
        port=settings.pg_port,
        user=PG_SUPERUSER,
        password=secrets.pg_superuser_password,
        database="postgres",
        timeout=10.0,
    )
    try:
        password = _quote_literal(secrets.pg_vigil_password)
        if await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PG_APP_ROLE):
            # Re-applied each time so a rewritten secrets.json and the role never disagree.
            await admin.execute(
                f"ALTER ROLE {PG_APP_ROLE} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                f"PASSWORD {password}"
            )
        else:
            await admin.execute(
                f"CREATE ROLE {PG_APP_ROLE} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                f"PASSWORD {password}"
            )
        if not await admin.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", PG_APP_DATABASE
        ):
            await admin.execute(f"CREATE DATABASE {PG_APP_DATABASE} OWNER {PG_APP_ROLE}")
    finally:
        await admin.close()
    if timescaledb:
        # Creating the extension needs the superuser; the migrations then only use it.
        conn = await asyncpg.connect(
            host=str(socket_dir(settings)),
            port=settings.pg_port,
            user=PG_SUPERUSER,
            password=secrets.pg_superuser_password,
            database=PG_APP_DATABASE,
            timeout=10.0,
        )
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            # The database's job scheduler, started if it is not running (a scheduler that
            # exited stays down until asked; this is idempotent).
            await conn.execute("SELECT _timescaledb_functions.start_background_workers()")
        finally:
            await conn.close()


def apply_migrations(settings: StackSettings, secrets: StackSecrets) -> list[str] | None:
    """Apply the schema migrations as the application role; None when none exist yet."""
    try:
        migrate = importlib.import_module("vigil.db.migrate")
    except ModuleNotFoundError as exc:
        if exc.name not in ("vigil.db", "vigil.db.migrate"):
            raise
        log.warning("vigil.db.migrate does not exist; no migrations applied")
        return None
    applied: list[str] = asyncio.run(
        migrate.apply_migrations(app_dsn(settings, secrets.pg_vigil_password))
    )
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied


def start_server(settings: StackSettings, secrets: StackSecrets) -> None:
    """Start the server unless it runs (``initdb`` first when the cluster does not exist yet);
    block until the superuser can log in. Creates no role, database or schema: ``start`` does
    that; a restore (docs/backup.md) brings its own."""
    comp = component(settings)
    _check_paths(settings)
    if running_pid(comp) is None:
        ensure_port_free(settings.pg_port, "PostgreSQL")
        settings.postgres_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(settings.postgres_dir, 0o700)
        _initdb(settings, secrets)
        _write_config(settings)
        pid, offset = spawn(
            comp,
            [_bin(settings, "postgres"), "-D", str(cluster_dir(settings))],
            env=_server_env(),
            cwd=settings.postgres_dir,
            user=OS_USER if is_root() else None,
        )
        wait_until(
            comp,
            lambda: (
                port_accepts(settings.pg_port)
                and asyncio.run(_superuser_ready(settings, secrets.pg_superuser_password))
            ),
            timeout_s=settings.pg_start_timeout_s,
            what=f"PostgreSQL accepting logins on 127.0.0.1:{settings.pg_port}",
            pid=pid,
            log_offset=offset,
        )


def provision(settings: StackSettings, secrets: StackSecrets) -> bool:
    """Create (or re-align) the application role and its empty database, and TimescaleDB in it
    when the extension is installed; idempotent. Returns whether TimescaleDB is there."""
    timescaledb = timescaledb_available(settings)
    asyncio.run(_provision(settings, secrets, timescaledb))
    return timescaledb


def start(settings: StackSettings) -> None:
    """Start PostgreSQL unless it runs; block until the role, database and migrations exist."""
    comp = component(settings)
    secrets = ensure_secrets(settings)
    start_server(settings, secrets)
    started = time.monotonic()
    try:
        provision(settings, secrets)
        apply_migrations(settings, secrets)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StackError(
            f"PostgreSQL setup failed after {time.monotonic() - started:.1f} s: {exc}; "
            f"last lines of {comp.log_file}:\n{tail(comp.log_file)}"
        ) from exc
