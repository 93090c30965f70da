"""Acknowledge and resolve through notify's escalation service, so the chain stops at once and
the timeline records who did it; the dashboard never writes escalation rows itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.notify.domain.escalation import Resolve


class NotifyAlertActions:
    def __init__(self, pool: Any) -> None:
        from services.notify.app import build_escalation
        from services.notify.settings import NotifySettings

        # Acknowledging sends nothing, so the channels the settings enable are never used here.
        self._service, self._closers = build_escalation(NotifySettings(), pool)
        # The same store the service writes through.
        self._store = self._service._store

    async def acknowledge(self, dedup_key: str, by: str, at: datetime) -> bool:
        escalation_id = await self._store.escalation_id_for(dedup_key)
        if escalation_id is None:
            return False
        result = await self._service.acknowledge(escalation_id, by=by, via="dashboard")
        return bool(result.outcome.value == "acknowledged")

    async def resolve(self, dedup_key: str, by: str, at: datetime) -> bool:
        escalation_id = await self._store.escalation_id_for(dedup_key)
        if escalation_id is None:
            return False
        transition = await self._store.apply(escalation_id, Resolve(at=at), at=at)
        return transition is not None
