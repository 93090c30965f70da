"""Cover agreements in PostgreSQL (``cover_agreements``, migration 0045): one row per version;
and what the access check needs to know about a subject reached through cover."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import asyncpg

from services.api.service_layer.cover import Version, in_force
from services.notify.public import Agreement, CoverHours, NightAlert, night_alerts

_COLUMNS = (
    "agreement_id, version, covering_team_id, covered_team_id, timezone, days, starts, ends, "
    "exceptions, revoked, reason, proposed_by, proposed_side, proposed_at, decision, "
    "decided_by, decided_at"
)


def _version(row: asyncpg.Record) -> Version:
    return Version(
        agreement_id=row["agreement_id"],
        version=row["version"],
        covering_team_id=row["covering_team_id"],
        covered_team_id=row["covered_team_id"],
        hours=CoverHours(
            row["timezone"],
            frozenset(row["days"]),
            row["starts"],
            row["ends"],
            frozenset(row["exceptions"]),
        ),
        proposed_by=row["proposed_by"],
        proposed_side=row["proposed_side"],
        proposed_at=row["proposed_at"],
        revoked=row["revoked"],
        reason=row["reason"],
        decision=row["decision"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
    )


def _agreements(rows: Iterable[Version]) -> list[Agreement]:
    by_id: dict[uuid.UUID, list[Version]] = {}
    for version in rows:
        by_id.setdefault(version.agreement_id, []).append(version)
    found = []
    for versions in by_id.values():
        current = in_force(versions)
        if current is not None and not current.revoked:
            found.append(current.agreement())
    return found


class PostgresCoverStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def versions(self, agreement_id: uuid.UUID) -> list[Version]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM cover_agreements WHERE agreement_id = $1 ORDER BY version",
            agreement_id,
        )
        return [_version(r) for r in rows]

    async def add(self, version: Version) -> bool:
        hours = version.hours
        try:
            await self._pool.execute(
                f"INSERT INTO cover_agreements ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "$8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                version.agreement_id,
                version.version,
                version.covering_team_id,
                version.covered_team_id,
                hours.timezone,
                sorted(hours.days),
                hours.starts,
                hours.ends,
                sorted(hours.exceptions),
                version.revoked,
                version.reason,
                version.proposed_by,
                version.proposed_side,
                version.proposed_at,
                version.decision,
                version.decided_by,
                version.decided_at,
            )
        except asyncpg.UniqueViolationError:
            return False
        return True

    async def decide(self, version: Version) -> bool:
        status = await self._pool.execute(
            "UPDATE cover_agreements SET decision = $3, decided_by = $4, decided_at = $5 "
            "WHERE agreement_id = $1 AND version = $2 AND decision IS NULL",
            version.agreement_id,
            version.version,
            version.decision,
            version.decided_by,
            version.decided_at,
        )
        return bool(status.endswith(" 1"))

    async def of_teams(self, teams: frozenset[str]) -> list[Version]:
        """Every version of every agreement one of ``teams`` is a side of."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM cover_agreements "
            "WHERE covering_team_id = ANY($1::text[]) OR covered_team_id = ANY($1::text[]) "
            "ORDER BY proposed_at, agreement_id, version",
            list(teams),
        )
        return [_version(r) for r in rows]

    async def in_force_covering(self, teams: frozenset[str]) -> list[Agreement]:
        """The agreements in force (newest approved version, not revoked) in which one of
        ``teams`` covers another team."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM cover_agreements WHERE covering_team_id = ANY($1::text[])",
            list(teams),
        )
        return _agreements(_version(r) for r in rows)

    async def subject_team(
        self, patient_id: str | None, dedup_key: str | None
    ) -> tuple[str, bool] | None:
        """The care team of the patient (or of the alert's patient) and whether they are
        discharged; None for no such subject."""
        if patient_id is not None:
            row = await self._pool.fetchrow(
                "SELECT care_team_id, discharged_at IS NOT NULL AS discharged FROM patients "
                "WHERE patient_id = $1",
                patient_id,
            )
        else:
            row = await self._pool.fetchrow(
                "SELECT p.care_team_id, p.discharged_at IS NOT NULL AS discharged "
                "FROM alerts a JOIN patients p USING (patient_id) WHERE a.dedup_key = $1 LIMIT 1",
                dedup_key,
            )
        return (row["care_team_id"], bool(row["discharged"])) if row else None

    async def teams(self, care_team_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Name, centre and the unit's 24-hour number of each team."""
        rows = await self._pool.fetch(
            """
            SELECT t.care_team_id, t.name, t.timezone, o.organisation_id, o.name AS centre,
                   s.unit_phone
            FROM care_teams t
            LEFT JOIN organisations o USING (organisation_id)
            LEFT JOIN caregiver_team_settings s USING (care_team_id)
            WHERE t.care_team_id = ANY($1::text[])
            """,
            list(care_team_ids),
        )
        return {r["care_team_id"]: dict(r) for r in rows}

    async def night_alerts(
        self, covered_team_id: str, starts: datetime, ends: datetime
    ) -> list[NightAlert]:
        """The escalations of the team's patients opened in [starts, ends), with their
        timeline entries up to ``ends`` (notify's query, the one its summary e-mail reads)."""
        return await night_alerts(self._pool, covered_team_id, starts, ends)

    async def organisations(self, of_teams: frozenset[str] | None) -> list[dict[str, Any]]:
        """The centres (id, name), by name: every one (``None``), or those ``of_teams`` are
        in."""
        if of_teams is None:
            rows = await self._pool.fetch(
                "SELECT organisation_id, name FROM organisations ORDER BY name, organisation_id"
            )
        else:
            rows = await self._pool.fetch(
                "SELECT organisation_id, name FROM organisations WHERE organisation_id IN "
                "(SELECT organisation_id FROM care_teams WHERE care_team_id = ANY($1::text[])) "
                "ORDER BY name, organisation_id",
                list(of_teams),
            )
        return [dict(r) for r in rows]

    async def put_organisation(self, organisation_id: str, name: str) -> None:
        await self._pool.execute(
            "INSERT INTO organisations (organisation_id, name) VALUES ($1, $2) "
            "ON CONFLICT (organisation_id) DO UPDATE SET name = EXCLUDED.name",
            organisation_id,
            name,
        )

    async def set_organisation(self, care_team_id: str, organisation_id: str | None) -> bool:
        """False when ``organisation_id`` names no organisation."""
        try:
            await self._pool.execute(
                "UPDATE care_teams SET organisation_id = $2 WHERE care_team_id = $1",
                care_team_id,
                organisation_id,
            )
        except asyncpg.ForeignKeyViolationError:
            return False
        return True
