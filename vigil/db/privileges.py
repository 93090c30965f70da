"""The services' database role: what it may do on the schema the migrations made, and no more.

A deployment keeps two roles apart: the owner, which runs ``vigil migrate`` and owns every table,
and the services' role, which only reads and writes rows. ``vigil migrate --grant-to ROLE``
calls ``grant_service_role`` after the migrations, as the owner, so every table of every
migration so far is covered each time the schema changes.

The role gets SELECT, INSERT, UPDATE and DELETE on the tables of the current schema, SELECT on
its views (the TimescaleDB aggregate), USAGE and SELECT on its sequences, and nothing else: no
TRUNCATE, no DDL. On the append-only tables (those with a trigger that calls
``audit_refuse_change``, migration 0006: the audit log and the rules config versions) it gets
only SELECT and INSERT, so the revoked privileges stop it before the trigger would.
"""

from __future__ import annotations

import asyncpg

_TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
_APPEND_ONLY_PRIVILEGES = "SELECT, INSERT"

# Ordinary and partitioned tables of the current schema, each with whether a trigger of the
# audit log's refusal function guards it.
_TABLES = """
SELECT c.relname AS name,
       EXISTS (
           SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
           WHERE t.tgrelid = c.oid AND p.proname = 'audit_refuse_change'
       ) AS append_only
FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
ORDER BY c.relname
"""
_VIEWS = """
SELECT relname AS name FROM pg_class
WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('v', 'm')
ORDER BY relname
"""


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def grant_service_role(dsn: str, role: str) -> dict[str, list[str]]:
    """Grant ``role`` the services' privileges on every table, view and sequence of the current
    schema (connecting with ``dsn``, as the owner); idempotent. Returns the relations by kind:
    ``tables``, ``append_only``, ``views``."""
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            raise ValueError(f"role {role} does not exist: create it first (LOGIN, nothing else)")
        target = _ident(role)
        done: dict[str, list[str]] = {"tables": [], "append_only": [], "views": []}
        schema = _ident(str(await conn.fetchval("SELECT current_schema()")))
        async with conn.transaction():
            await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {target}")
            for row in await conn.fetch(_TABLES):
                table = _ident(row["name"])
                # Re-applied from nothing each time, so a privilege granted by hand is taken back.
                await conn.execute(f"REVOKE ALL ON {table} FROM {target}")
                if row["append_only"]:
                    await conn.execute(f"GRANT {_APPEND_ONLY_PRIVILEGES} ON {table} TO {target}")
                    done["append_only"].append(row["name"])
                else:
                    await conn.execute(f"GRANT {_TABLE_PRIVILEGES} ON {table} TO {target}")
                    done["tables"].append(row["name"])
            for row in await conn.fetch(_VIEWS):
                view = _ident(row["name"])
                await conn.execute(f"REVOKE ALL ON {view} FROM {target}")
                await conn.execute(f"GRANT SELECT ON {view} TO {target}")
                done["views"].append(row["name"])
            await conn.execute(
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {target}"
            )
        return done
    finally:
        await conn.close()
