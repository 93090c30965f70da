"""The heartbeat repository in PostgreSQL: ``pipeline_heartbeats``."""

from __future__ import annotations

from datetime import datetime
from typing import Any


class PostgresHeartbeats:
    """The last heartbeat of each pipeline source and since when it is silent."""

    def __init__(self, db: Any) -> None:
        # An asyncpg connection (inside a ``PostgresUnitOfWork``) or, for a single statement,
        # the pool; asyncpg ships no type information.
        self._db = db

    async def watch_source(self, source: str, at: datetime) -> None:
        """Start watching a heartbeat source; its silence counts from ``at`` if never seen."""
        await self._db.execute(
            "INSERT INTO pipeline_heartbeats (source, last_seen_at) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING",
            source,
            at,
        )

    async def heartbeat_seen(self, source: str, at: datetime) -> None:
        await self._db.execute(
            """
            INSERT INTO pipeline_heartbeats (source, last_seen_at) VALUES ($1, $2)
            ON CONFLICT (source) DO UPDATE
                SET last_seen_at = GREATEST(pipeline_heartbeats.last_seen_at, EXCLUDED.last_seen_at)
            """,
            source,
            at,
        )

    async def heartbeats(self) -> list[tuple[str, datetime, datetime | None]]:
        rows = await self._db.fetch(
            "SELECT source, last_seen_at, silent_since FROM pipeline_heartbeats ORDER BY source"
        )
        return [(str(r["source"]), r["last_seen_at"], r["silent_since"]) for r in rows]

    async def mark_silent(self, source: str, since: datetime | None) -> None:
        await self._db.execute(
            "UPDATE pipeline_heartbeats SET silent_since = $2 WHERE source = $1", source, since
        )
