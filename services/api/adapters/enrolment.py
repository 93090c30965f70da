"""The enrolment registry on PostgreSQL: ``care_teams``, ``patients``, ``patient_cycles``,
``devices``, ``device_bindings`` and ``device_credential_events``, one transaction per use case
(``services.api.service_layer.enrolment``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import asyncpg

from services.api.service_layer.enrolment import (
    BindingRecord,
    CredentialEvent,
    Cycle,
    DeviceRecord,
    PatientRecord,
)


class PostgresRegistry:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def care_team_exists(self, care_team_id: str) -> bool:
        return bool(
            await self._conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM care_teams WHERE care_team_id = $1)", care_team_id
            )
        )

    async def patient(self, patient_id: str) -> PatientRecord | None:
        row = await self._conn.fetchrow(
            "SELECT patient_id, care_team_id, weight_kg, birth_date, age_years FROM patients "
            "WHERE patient_id = $1 FOR UPDATE",
            patient_id,
        )
        if row is None:
            return None
        return PatientRecord(
            row["patient_id"],
            row["care_team_id"],
            None if row["weight_kg"] is None else float(row["weight_kg"]),
            row["birth_date"],
            row["age_years"],
        )

    async def add_patient(self, patient: PatientRecord) -> bool:
        added = await self._conn.fetchval(
            """
            INSERT INTO patients (patient_id, care_team_id, weight_kg, birth_date, age_years)
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT (patient_id) DO NOTHING RETURNING true
            """,
            patient.patient_id,
            patient.care_team_id,
            patient.weight_kg,
            patient.birth_date,
            patient.age_years,
        )
        return bool(added)

    async def set_weight(self, patient_id: str, weight_kg: float) -> None:
        await self._conn.execute(
            "UPDATE patients SET weight_kg = $2 WHERE patient_id = $1", patient_id, weight_kg
        )

    async def add_cycle(self, patient_id: str, cycle: Cycle) -> None:
        await self._conn.execute(
            "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) VALUES ($1, $2, $3)",
            patient_id,
            cycle.cycle_start,
            cycle.step_up_day,
        )

    async def cycles(self, patient_id: str) -> list[Cycle]:
        rows = await self._conn.fetch(
            "SELECT cycle_start, step_up_day FROM patient_cycles WHERE patient_id = $1 "
            "ORDER BY cycle_start",
            patient_id,
        )
        return [Cycle(r["cycle_start"], r["step_up_day"]) for r in rows]

    async def device(self, device_id: str) -> DeviceRecord | None:
        row = await self._conn.fetchrow(
            "SELECT device_id, kind, model, reporting, care_team_id FROM devices "
            "WHERE device_id = $1 FOR UPDATE",
            device_id,
        )
        if row is None:
            return None
        return DeviceRecord(
            row["device_id"], row["kind"], row["model"], row["reporting"], row["care_team_id"]
        )

    async def add_device(self, device: DeviceRecord) -> bool:
        added = await self._conn.fetchval(
            """
            INSERT INTO devices (device_id, kind, model, reporting, care_team_id)
            VALUES ($1, $2, $3, $4, $5) ON CONFLICT (device_id) DO NOTHING RETURNING true
            """,
            device.device_id,
            device.kind,
            device.model,
            device.reporting,
            device.care_team_id,
        )
        return bool(added)

    async def bindings(self, device_id: str) -> list[BindingRecord]:
        rows = await self._conn.fetch(
            """
            SELECT b.device_id, b.patient_id, b.valid_from, b.valid_to, p.care_team_id
            FROM device_bindings b LEFT JOIN patients p USING (patient_id)
            WHERE b.device_id = $1 ORDER BY b.valid_from
            """,
            device_id,
        )
        return [
            BindingRecord(
                r["device_id"], r["patient_id"], r["valid_from"], r["valid_to"], r["care_team_id"]
            )
            for r in rows
        ]

    async def add_binding(self, binding: BindingRecord) -> None:
        await self._conn.execute(
            "INSERT INTO device_bindings (device_id, patient_id, valid_from, valid_to) "
            "VALUES ($1, $2, $3, $4)",
            binding.device_id,
            binding.patient_id,
            binding.valid_from,
            binding.valid_to,
        )

    async def end_binding(self, device_id: str, valid_from: datetime, valid_to: datetime) -> None:
        await self._conn.execute(
            "UPDATE device_bindings SET valid_to = $3 WHERE device_id = $1 AND valid_from = $2",
            device_id,
            valid_from,
            valid_to,
        )

    async def add_credential_event(self, event: CredentialEvent) -> None:
        await self._conn.execute(
            "INSERT INTO device_credential_events (device_id, action, at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            event.device_id,
            event.action,
            event.at,
        )

    async def credential_events(self, device_id: str) -> list[CredentialEvent]:
        rows = await self._conn.fetch(
            "SELECT device_id, action, at FROM device_credential_events WHERE device_id = $1 "
            "ORDER BY at, action",
            device_id,
        )
        return [CredentialEvent(r["device_id"], r["action"], r["at"]) for r in rows]


class PostgresRegistryStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresRegistry]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresRegistry(conn)
