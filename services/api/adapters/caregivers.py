"""Caregiver contacts and a care team's 24-hour number in PostgreSQL (``caregiver_contacts``,
``caregiver_team_settings``, migration 0040); notify reads the same rows when it tells a
family (``services/notify/adapters/postgres/caregivers.py``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.api.service_layer.caregivers import Contact

_COLUMNS = (
    "contact_id, patient_id, care_team_id, sms, email, language, consent_by, consent_at, "
    "consent_note, preferred_from, preferred_until, created_at, updated_by, updated_at, "
    "withdrawn_by, withdrawn_at"
)


def _contact(row: asyncpg.Record) -> Contact:
    return Contact(**{key: row[key] for key in _COLUMNS.split(", ")})


class PostgresContactStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def add(self, contact: Contact) -> None:
        await self._pool.execute(
            f"INSERT INTO caregiver_contacts ({_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            *(getattr(contact, key) for key in _COLUMNS.split(", ")),
        )

    async def get(self, patient_id: str, contact_id: uuid.UUID) -> Contact | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM caregiver_contacts WHERE patient_id = $1 AND contact_id = $2",
            patient_id,
            contact_id,
        )
        return None if row is None else _contact(row)

    async def of_patient(self, patient_id: str) -> list[Contact]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM caregiver_contacts WHERE patient_id = $1 "
            "ORDER BY created_at, contact_id",
            patient_id,
        )
        return [_contact(r) for r in rows]

    async def save(self, contact: Contact) -> None:
        await self._pool.execute(
            "UPDATE caregiver_contacts SET sms = $2, email = $3, language = $4, "
            "preferred_from = $5, preferred_until = $6, updated_by = $7, updated_at = $8, "
            "withdrawn_by = $9, withdrawn_at = $10 WHERE contact_id = $1",
            contact.contact_id,
            contact.sms,
            contact.email,
            contact.language,
            contact.preferred_from,
            contact.preferred_until,
            contact.updated_by,
            contact.updated_at,
            contact.withdrawn_by,
            contact.withdrawn_at,
        )

    async def unit_phone(self, care_team_id: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT unit_phone, updated_by, updated_at FROM caregiver_team_settings "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        return None if row is None else dict(row)

    async def set_unit_phone(
        self, care_team_id: str, phone: str, by: str, at: datetime
    ) -> str | None:
        async with self._pool.acquire() as conn, conn.transaction():
            old = await conn.fetchval(
                "SELECT unit_phone FROM caregiver_team_settings WHERE care_team_id = $1 FOR UPDATE",
                care_team_id,
            )
            await conn.execute(
                "INSERT INTO caregiver_team_settings (care_team_id, unit_phone, updated_by, "
                "updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (care_team_id) DO UPDATE "
                "SET unit_phone = $2, updated_by = $3, updated_at = $4",
                care_team_id,
                phone,
                by,
                at,
            )
        return None if old is None else str(old)
