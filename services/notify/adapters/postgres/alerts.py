"""The notify service's alert log in PostgreSQL.

Owns the SQL against ``alerts``: every alert phase notify receives is recorded once (a
redelivered alert is harmless), and ``alert_from_row`` reads one back. Pages and their attempts
are written by the outbox repository (``adapters.postgres.outbox``).
"""

from __future__ import annotations

import json
from typing import Any

from schemas.events import Alert, Evidence


class PostgresNotifyRepository:
    """Implements ``service_layer.ports.NotifyRepository`` over an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        # asyncpg ships no type information; the pool is an asyncpg.Pool.
        self._pool = pool

    async def record_alert(self, alert: Alert) -> bool:
        evidence = json.dumps([item.model_dump(mode="json") for item in alert.evidence])
        status = await self._pool.execute(
            """
            INSERT INTO alerts (alert_id, dedup_key, patient_id, device_id, kind, code, priority,
                                phase, state, title, device_time, ingest_time, evidence,
                                rule_id, rule_version)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15)
            ON CONFLICT (alert_id) DO NOTHING
            """,
            alert.alert_id,
            alert.dedup_key,
            alert.patient_id,
            alert.device_id,
            alert.kind.value,
            alert.code,
            alert.priority.value,
            alert.phase.value,
            alert.state.value,
            alert.title,
            alert.device_time,
            alert.ingest_time,
            evidence,
            alert.rule_id,
            alert.rule_version,
        )
        return bool(status == "INSERT 0 1")


def alert_from_row(row: Any) -> Alert:
    """An ``alerts`` row (or a join carrying its columns) as the Alert it recorded."""
    return Alert.model_validate(
        {
            "alert_id": row["alert_id"],
            "dedup_key": row["dedup_key"],
            "patient_id": row["patient_id"],
            "device_id": row["device_id"],
            "kind": row["kind"],
            "code": row["code"],
            "priority": row["priority"],
            "phase": row["phase"],
            "state": row["state"],
            "title": row["title"],
            "device_time": row["device_time"],
            "ingest_time": row["ingest_time"],
            "evidence": tuple(Evidence.model_validate(e) for e in json.loads(row["evidence"])),
            "rule_id": row["rule_id"],
            "rule_version": row["rule_version"],
        }
    )
