"""Guidance for families in PostgreSQL (``caregiver_guidance`` and its proposals, migration
0042); an approval appends the version in the same transaction as its decision."""

from __future__ import annotations

from typing import Any

import asyncpg

from services.api.adapters.sign_off import PostgresProposals
from services.api.service_layer.caregiver_guidance import GuidanceApproval, GuidanceProposal

_COLUMNS = (
    "proposal_id, care_team_id, alarm, language, text, based_on, proposed_by, proposed_at, "
    "decision, decided_by, decided_at, version"
)


class PostgresGuidanceStore(PostgresProposals[GuidanceProposal]):
    TABLE = "caregiver_guidance_proposals"
    COLUMNS = _COLUMNS

    def _proposal(self, row: asyncpg.Record) -> GuidanceProposal:
        return GuidanceProposal(**{key: row[key] for key in _COLUMNS.split(", ")})

    async def newest_version(self, care_team_id: str, alarm: str, language: str) -> int:
        value = await self._pool.fetchval(
            "SELECT max(version) FROM caregiver_guidance "
            "WHERE care_team_id = $1 AND alarm = $2 AND language = $3",
            care_team_id,
            alarm,
            language,
        )
        return int(value or 0)

    async def pending_for(
        self, care_team_id: str, alarm: str, language: str
    ) -> GuidanceProposal | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM caregiver_guidance_proposals WHERE care_team_id = $1 "
            "AND alarm = $2 AND language = $3 AND decision IS NULL",
            care_team_id,
            alarm,
            language,
        )
        return self._proposal(row) if row else None

    async def current(self, care_team_id: str) -> list[dict[str, Any]]:
        """The newest version of each alarm and language of the team."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT ON (alarm, language) alarm, language, version, text, proposed_by, "
            "signed_off_by, signed_off_at FROM caregiver_guidance WHERE care_team_id = $1 "
            "ORDER BY alarm, language, version DESC",
            care_team_id,
        )
        return [dict(r) for r in rows]

    async def add(self, proposal: GuidanceProposal) -> None:
        await self._pool.execute(
            f"INSERT INTO caregiver_guidance_proposals ({_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL, NULL, NULL)",
            proposal.proposal_id,
            proposal.care_team_id,
            proposal.alarm,
            proposal.language,
            proposal.text,
            proposal.based_on,
            proposal.proposed_by,
            proposal.proposed_at,
        )

    async def approve(self, approved: GuidanceProposal) -> GuidanceApproval:
        assert approved.decided_by is not None and approved.decided_at is not None
        async with self._pool.acquire() as conn, conn.transaction():
            # Writers of this team's guidance are serialised: two approvals never write one
            # version number twice.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('caregiver_guidance:' || $1))",
                approved.care_team_id,
            )
            newest = await conn.fetchrow(
                "SELECT version, text FROM caregiver_guidance WHERE care_team_id = $1 "
                "AND alarm = $2 AND language = $3 ORDER BY version DESC LIMIT 1",
                approved.care_team_id,
                approved.alarm,
                approved.language,
            )
            version = int(newest["version"]) if newest else 0
            if not await self._still_pending(conn, approved.proposal_id):
                return GuidanceApproval("not_pending", version, None)
            if version != approved.based_on:
                return GuidanceApproval("stale", version, None)
            await conn.execute(
                "INSERT INTO caregiver_guidance (care_team_id, alarm, language, version, text, "
                "proposed_by, signed_off_by, signed_off_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                approved.care_team_id,
                approved.alarm,
                approved.language,
                version + 1,
                approved.text,
                approved.proposed_by,
                approved.decided_by,
                approved.decided_at,
            )
            await self._approved(conn, approved, version + 1)
        return GuidanceApproval("approved", version + 1, None if newest is None else newest["text"])
