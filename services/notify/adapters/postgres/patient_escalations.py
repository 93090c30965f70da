"""The escalations of one patient not yet resolved (``service_layer.closing``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID


class PostgresPatientEscalations:
    def __init__(self, pool: Any) -> None:
        # asyncpg ships no type information; the pool is an asyncpg.Pool.
        self._pool = pool

    async def unresolved_of_patient(
        self, patient_id: str, devices: Sequence[str] | None
    ) -> list[UUID]:
        rows = await self._pool.fetch(
            """
            SELECT e.escalation_id FROM escalations e JOIN alerts a ON a.alert_id = e.alert_id
            WHERE e.patient_id = $1 AND e.status <> 'resolved'
              AND ($2::text[] IS NULL OR a.device_id = ANY($2::text[]))
            ORDER BY e.escalation_id
            """,
            patient_id,
            None if devices is None else list(devices),
        )
        return [UUID(str(row["escalation_id"])) for row in rows]
