"""Threshold proposals in PostgreSQL (``threshold_proposals``, migration 0037); an approval
appends the version in the same transaction as its decision."""

from __future__ import annotations

import json

import asyncpg

from services.api.adapters.repository import append_version, lock_versions, previous_overrides
from services.api.adapters.sign_off import PostgresProposals
from services.api.service_layer.thresholds import Approval, Proposal, Scope

# Where each scope's versions are kept: (table, key column).
VERSIONS: dict[str, tuple[str, str]] = {
    "care_team": ("rule_protocols", "care_team_id"),
    "patient": ("patient_rule_overrides", "patient_id"),
}
_COLUMNS = (
    "proposal_id, scope, subject_id, care_team_id, overrides, reason, based_on, proposed_by, "
    "proposed_at, decision, decided_by, decided_at, version"
)


class PostgresProposalStore(PostgresProposals[Proposal]):
    TABLE = "threshold_proposals"
    COLUMNS = _COLUMNS

    def _proposal(self, row: asyncpg.Record) -> Proposal:
        overrides = row["overrides"]
        return Proposal(
            proposal_id=row["proposal_id"],
            scope=row["scope"],
            subject_id=row["subject_id"],
            care_team_id=row["care_team_id"],
            overrides=dict(json.loads(overrides) if isinstance(overrides, str) else overrides),
            reason=row["reason"],
            based_on=row["based_on"],
            proposed_by=row["proposed_by"],
            proposed_at=row["proposed_at"],
            decision=row["decision"],
            decided_by=row["decided_by"],
            decided_at=row["decided_at"],
            version=row["version"],
        )

    async def newest_version(self, scope: Scope, subject_id: str) -> int:
        table, key = VERSIONS[scope]
        value = await self._pool.fetchval(
            f"SELECT max(version) FROM {table} WHERE {key} = $1", subject_id
        )
        return int(value or 0)

    async def pending_for(self, scope: Scope, subject_id: str) -> Proposal | None:
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM threshold_proposals "
            "WHERE scope = $1 AND subject_id = $2 AND decision IS NULL",
            scope,
            subject_id,
        )
        return self._proposal(row) if row else None

    async def add(self, proposal: Proposal) -> None:
        await self._pool.execute(
            f"INSERT INTO threshold_proposals ({_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, NULL, NULL, NULL, NULL)",
            proposal.proposal_id,
            proposal.scope,
            proposal.subject_id,
            proposal.care_team_id,
            json.dumps(proposal.overrides),
            proposal.reason,
            proposal.based_on,
            proposal.proposed_by,
            proposal.proposed_at,
        )

    async def approve(self, approved: Proposal) -> Approval:
        assert approved.decided_by is not None and approved.decided_at is not None
        table, key = VERSIONS[approved.scope]
        async with self._pool.acquire() as conn, conn.transaction():
            previous = await lock_versions(conn, table, key, approved.subject_id)
            newest = previous["version"] if previous else 0
            if not await self._still_pending(conn, approved.proposal_id):
                return Approval("not_pending", newest, {})
            if newest != approved.based_on:
                return Approval("stale", newest, {})
            row = await append_version(
                conn,
                table,
                key,
                approved.subject_id,
                previous,
                approved.overrides,
                approved.decided_by,
                approved.decided_at,
                approved.reason if approved.scope == "patient" else None,
            )
            await self._approved(conn, approved, row["version"])
        return Approval("approved", int(row["version"]), previous_overrides(previous))
