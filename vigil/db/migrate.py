"""Versioned schema migrations for PostgreSQL, with TimescaleDB features when it is installed.

Migrations are ``NNNN_name.sql`` files applied in order, each in its own transaction, and
recorded in ``schema_migrations`` with a checksum; an applied file that changed is an error, not
something to re-run. SQL that only makes sense with TimescaleDB checks for the extension itself
(``DO`` blocks), so the same files give plain tables on plain PostgreSQL.

A file that is applied may never change, so where an early file cannot run on TimescaleDB as it
stands the migrator knows what to do first: ``_TIMESCALEDB_BEFORE`` holds SQL run in the same
transaction just before that file, on TimescaleDB only. 0001 made the readings tables compressed
hypertables, and TimescaleDB refuses 0003's ``ADD COLUMN stored_at ... DEFAULT now()`` on a
hypertable with compression on; so before 0003 compression is switched off (chunks already
compressed are decompressed first, nothing is lost), and 0012 switches it on again with the
settings it keeps since.

After the files, on TimescaleDB, the compression, retention and aggregate-refresh policies are
set from ``StorageSettings`` (``vigil.db.storage``), so they follow the deployment's settings each
time the migrator runs.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import asyncpg

from vigil.db.storage import READINGS_TABLES, StorageSettings, apply_storage_policies

_LOCK_KEY = 0x5649_4749  # "VIGI": one migrator at a time across processes

# Before 0003 on TimescaleDB: the readings hypertables without compression, their compressed
# chunks decompressed (a database that stopped at 0003 may have some), the policy removed.
_SUSPEND_COMPRESSION = """
DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY $1 LOOP
        IF EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                   WHERE hypertable_schema = current_schema() AND hypertable_name = tbl
                     AND compression_enabled) THEN
            PERFORM remove_compression_policy(tbl::regclass, if_exists => TRUE);
            PERFORM decompress_chunk(c, if_compressed => TRUE) FROM show_chunks(tbl::regclass) AS c;
            EXECUTE format('ALTER TABLE %I SET (timescaledb.compress = false)', tbl);
        END IF;
    END LOOP;
END
$$
""".replace("$1", "ARRAY[" + ", ".join(f"'{t}'" for t in READINGS_TABLES) + "]")

_TIMESCALEDB_BEFORE: dict[str, str] = {"0003_ingest.sql": _SUSPEND_COMPRESSION}


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


def migration_names() -> list[str]:
    """Every migration file's name, in the order they apply."""
    return [name for name, _ in _migration_files()]


async def apply_migrations(
    dsn: str, *, upto: str | None = None, storage: StorageSettings | None = None
) -> list[str]:
    """Apply every migration not yet applied; returns the names applied now.

    ``upto``: stop after this file (a test builds an earlier schema state with it); the storage
    policies are then left alone. ``storage``: the policies' settings (default: from the
    environment, ``VIGIL_STORAGE_*``).
    """
    if upto is not None and upto not in migration_names():
        raise MigrationError(f"no migration named {upto}")
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
            timescaledb = await timescaledb_enabled(conn)
            for name, sql in _migration_files():
                digest = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != digest:
                        raise MigrationError(f"migration {name} changed after it was applied")
                elif not (upto is not None and name > upto):
                    async with conn.transaction():
                        if timescaledb and name in _TIMESCALEDB_BEFORE:
                            await conn.execute(_TIMESCALEDB_BEFORE[name])
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (name, sha256) VALUES ($1, $2)",
                            name,
                            digest,
                        )
                    applied.append(name)
            if timescaledb and upto is None:
                await apply_storage_policies(conn, storage or StorageSettings())
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
