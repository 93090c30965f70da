"""What other services may use of notify (``tests/unit/test_layers.py``): acknowledging and
resolving an alert by its dedup key through the escalation service, so the chain stops at once
and the timeline records who did it; reading an alert's escalation timeline. The care-team API's
dashboard never writes escalation rows itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.notify.adapters.postgres.unit_of_work import PostgresUnitOfWork
from services.notify.bootstrap import build_escalation
from services.notify.service_layer.escalation import AckOutcome
from services.notify.settings import NotifySettings

__all__ = ["AlertActions", "AlertTimelines"]


class AlertActions:
    """Acknowledge and resolve over ``pool``, the database notify writes."""

    def __init__(self, pool: Any) -> None:
        # Acknowledging and resolving send nothing, so the channels the settings enable are
        # never used here.
        self._service, self._closers = build_escalation(NotifySettings(), pool)

    async def acknowledge(self, dedup_key: str, by: str, at: datetime) -> bool:
        escalation_id = await self._service.escalation_id_for(dedup_key)
        if escalation_id is None:
            return False
        result = await self._service.acknowledge(escalation_id, by=by, via="dashboard")
        return result.outcome is AckOutcome.ACKNOWLEDGED

    async def resolve(self, dedup_key: str, by: str, at: datetime) -> bool:
        escalation_id = await self._service.escalation_id_for(dedup_key)
        if escalation_id is None:
            return False
        return await self._service.resolve(escalation_id, at=at)


class AlertTimelines:
    """An alert's escalation as notify records it, over ``pool``: status, who acknowledged,
    the timeline's events and every delivery attempt: what notify's own
    ``GET /alerts/{dedup_key}/timeline`` answers."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def timeline(self, dedup_key: str) -> dict[str, Any] | None:
        async with PostgresUnitOfWork(self._pool, transaction=False) as uow:
            result: dict[str, Any] | None = await uow.escalations.timeline(dedup_key)
            return result
