"""Versioned schema migrations for PostgreSQL, with TimescaleDB features when it is installed.

Migrations are ``NNNN_name.sql`` files applied in order, each in its own transaction, and
recorded in ``schema_migrations`` with a checksum; an applied file that changed is an error, not
something to re-run. SQL that only makes sense with TimescaleDB checks for the extension itself
(``DO`` blocks), so the same files give plain tables on plain PostgreSQL.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg

_LOCK_KEY = 0x5649_4749  # "VIGI": one migrator at a time across processes


class MigrationError(RuntimeError):
    pass


def _migration_files() -> list[tuple[str, str]]:
    folder = resources.files("vigil.db") / "migrations"
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return files


async def apply_migrations(dsn: str) -> list[str]:
    """Apply every migration not yet applied; returns the names applied now."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    name text PRIMARY KEY,
                    sha256 text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            done = {
                row["name"]: row["sha256"]
                for row in await conn.fetch("SELECT name, sha256 FROM schema_migrations")
            }
            applied: list[str] = []
            for name, sql in _migration_files():
                digest = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != digest:
                        raise MigrationError(f"migration {name} changed after it was applied")
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)",
                        name,
                        digest,
                    )
                applied.append(name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def timescaledb_enabled(conn: asyncpg.Connection) -> bool:
    """Whether the timescaledb extension is installed in this database."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
        )
    )
