"""Writes each read and write of patient data to Vigil's tamper-evident audit log."""

from __future__ import annotations

from typing import Any

import asyncpg


class AuditTrail:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        from vigil.audit import append

        async with self._pool.acquire() as conn:
            await append(conn, actor=actor, action=action, subject=subject, details=details)
