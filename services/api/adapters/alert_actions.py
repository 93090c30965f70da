"""Acknowledge and resolve, handed to notify's escalation so the chain stops at once."""

from __future__ import annotations

from datetime import datetime

import asyncpg


class NotifyAlertActions:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def acknowledge(self, dedup_key: str, by: str, at: datetime) -> bool:
        raise NotImplementedError("wired to notify's acknowledgement in integration")

    async def resolve(self, dedup_key: str, by: str, at: datetime) -> bool:
        raise NotImplementedError("wired to notify's resolution in integration")
