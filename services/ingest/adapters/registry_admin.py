"""Writes to the device registry: care teams, patients, devices and their bindings.

Used by the local run (to register the simulated fleet) and by tests. Every write is an upsert,
so registering the same fleet twice changes nothing.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def upsert_care_team(
    conn: asyncpg.Connection | asyncpg.Pool, care_team_id: str, name: str, oncall_email: str
) -> None:
    await conn.execute(
        """
        INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, $2, $3)
        ON CONFLICT (care_team_id) DO UPDATE
            SET name = EXCLUDED.name, oncall_email = EXCLUDED.oncall_email
        """,
        care_team_id,
        name,
        oncall_email,
    )


async def upsert_patient(
    conn: asyncpg.Connection | asyncpg.Pool,
    patient_id: str,
    care_team_id: str,
    weight_kg: float | None = None,
) -> None:
    await conn.execute(
        """
        INSERT INTO patients (patient_id, care_team_id, weight_kg) VALUES ($1, $2, $3)
        ON CONFLICT (patient_id) DO UPDATE
            SET care_team_id = EXCLUDED.care_team_id, weight_kg = EXCLUDED.weight_kg
        """,
        patient_id,
        care_team_id,
        weight_kg,
    )


async def upsert_device(
    conn: asyncpg.Connection | asyncpg.Pool,
    device_id: str,
    kind: str,
    model: str | None = None,
    reporting: str = "continuous",
) -> None:
    """Register a device. ``reporting``: ``continuous`` or, for a thermometer a caregiver reads a
    few times a day, ``spot_check`` (the rules' silence limits follow it, docs/rules.md)."""
    await conn.execute(
        """
        INSERT INTO devices (device_id, kind, model, reporting) VALUES ($1, $2, $3, $4)
        ON CONFLICT (device_id) DO UPDATE
            SET kind = EXCLUDED.kind, model = EXCLUDED.model, reporting = EXCLUDED.reporting
        """,
        device_id,
        kind,
        model,
        reporting,
    )


async def bind_device(
    conn: asyncpg.Connection | asyncpg.Pool,
    device_id: str,
    patient_id: str,
    valid_from: datetime,
    valid_to: datetime | None = None,
) -> None:
    if valid_from.tzinfo is None:
        raise ValueError("valid_from must be timezone-aware")
    await conn.execute(
        """
        INSERT INTO device_bindings (device_id, patient_id, valid_from, valid_to)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (device_id, valid_from) DO UPDATE
            SET patient_id = EXCLUDED.patient_id, valid_to = EXCLUDED.valid_to
        """,
        device_id,
        patient_id,
        valid_from,
        valid_to,
    )
