"""Writes each read and write of patient data to Vigil's tamper-evident audit log."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import asyncpg

from services.api.domain.access import CoverScope


class AuditTrail:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        from vigil.audit import append

        async with self._pool.acquire() as conn:
            await append(conn, actor=actor, action=action, subject=subject, details=details)


# The cover agreements in force for the current request's caller (set by the access check of the
# patient routes, services/api/entrypoints/http/deps.py); empty outside cover.
COVER_IN_FORCE: ContextVar[tuple[CoverScope, ...]] = ContextVar("cover_in_force", default=())


class CoverAudit:
    """Adds to each entry written while the caller acts under regional cover the agreements that
    allow it (``details.cover``: covered team, agreement, version)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        scopes = COVER_IN_FORCE.get()
        if scopes:
            details = {
                **details,
                "cover": [
                    {
                        "covered_team": c.covered_team_id,
                        "agreement": c.agreement_id,
                        "version": c.version,
                    }
                    for c in scopes
                ],
            }
        await self._inner.record(actor, action, subject, details)
