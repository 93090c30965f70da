"""The end of infusion and discharge on PostgreSQL: the columns of ``patients`` that migration
0038 adds and the patient's ``device_bindings``, one transaction per use case
(``services.api.service_layer.discharge``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from services.api.service_layer.discharge import CourseRecord, PatientBinding

_RECORD_COLUMNS = (
    "patient_id, care_team_id, infusion_ended_at, discharged_at, discharge_reason, discharged_by"
)


def _record(row: Any) -> CourseRecord:
    return CourseRecord(
        row["patient_id"],
        row["care_team_id"],
        row["infusion_ended_at"],
        row["discharged_at"],
        row["discharge_reason"],
        row["discharged_by"],
    )


class PostgresDischargeRegistry:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def record(self, patient_id: str) -> CourseRecord | None:
        row = await self._conn.fetchrow(
            f"SELECT {_RECORD_COLUMNS} FROM patients WHERE patient_id = $1 FOR UPDATE",
            patient_id,
        )
        return None if row is None else _record(row)

    async def bindings(self, patient_id: str) -> list[PatientBinding]:
        # Each device's row locked, in id order, as enrolment locks one before binding it.
        rows = await self._conn.fetch(
            """
            SELECT b.device_id, d.kind, b.valid_from, b.valid_to
            FROM device_bindings b JOIN devices d USING (device_id)
            WHERE b.patient_id = $1
            ORDER BY b.device_id, b.valid_from
            FOR UPDATE OF d
            """,
            patient_id,
        )
        return [
            PatientBinding(r["device_id"], r["kind"], r["valid_from"], r["valid_to"]) for r in rows
        ]

    async def end_binding(self, device_id: str, valid_from: datetime, valid_to: datetime) -> None:
        await self._conn.execute(
            "UPDATE device_bindings SET valid_to = $3 WHERE device_id = $1 AND valid_from = $2",
            device_id,
            valid_from,
            valid_to,
        )

    async def end_infusion(self, patient_id: str, at: datetime) -> None:
        await self._conn.execute(
            "UPDATE patients SET infusion_ended_at = $2 WHERE patient_id = $1", patient_id, at
        )

    async def discharge(self, patient_id: str, at: datetime, reason: str, by: str) -> None:
        await self._conn.execute(
            "UPDATE patients SET discharged_at = $2, discharge_reason = $3, discharged_by = $4 "
            "WHERE patient_id = $1",
            patient_id,
            at,
            reason,
            by,
        )

    async def discharged(self, care_teams: frozenset[str] | None) -> list[CourseRecord]:
        rows = await self._conn.fetch(
            f"SELECT {_RECORD_COLUMNS} FROM patients WHERE discharged_at IS NOT NULL "
            "AND ($1::text[] IS NULL OR care_team_id = ANY($1::text[])) "
            "ORDER BY discharged_at DESC, patient_id",
            None if care_teams is None else sorted(care_teams),
        )
        return [_record(r) for r in rows]


class PostgresDischargeStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresDischargeRegistry]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresDischargeRegistry(conn)
