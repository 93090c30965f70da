"""The part of a two-person sign-off's proposals table (``service_layer/sign_off.py``) that is
the same for every feature: reading proposals, recording a rejection or withdrawal, and, inside
an approval's transaction, checking the proposal is still pending and recording the approval.

A feature's store subclasses it with its table, its columns and how a row becomes its proposal,
and writes its own versions. Every proposals table has the columns ``proposal_id``,
``care_team_id``, ``proposed_at``, ``decision``, ``decided_by``, ``decided_at`` and ``version``.
"""

from __future__ import annotations

import uuid
from typing import ClassVar, Generic, TypeVar

import asyncpg

from services.api.service_layer.sign_off import SignedProposal

P = TypeVar("P", bound=SignedProposal)


class PostgresProposals(Generic[P]):
    TABLE: ClassVar[str]
    COLUMNS: ClassVar[str]  # in the order a row is inserted

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def _proposal(self, row: asyncpg.Record) -> P:
        raise NotImplementedError

    async def get(self, proposal_id: uuid.UUID) -> P | None:
        row = await self._pool.fetchrow(
            f"SELECT {self.COLUMNS} FROM {self.TABLE} WHERE proposal_id = $1", proposal_id
        )
        return self._proposal(row) if row else None

    async def listed(self, teams: frozenset[str], status: str | None, limit: int) -> list[P]:
        """The proposals of these care teams, newest first; ``status`` pending or a decision."""
        rows = await self._pool.fetch(
            f"SELECT {self.COLUMNS} FROM {self.TABLE} WHERE care_team_id = ANY($1::text[]) "
            "AND ($2::text IS NULL OR coalesce(decision, 'pending') = $2) "
            "ORDER BY proposed_at DESC LIMIT $3",
            list(teams),
            status,
            limit,
        )
        return [self._proposal(r) for r in rows]

    async def decide(self, proposal: P) -> bool:
        status = await self._pool.execute(
            f"UPDATE {self.TABLE} SET decision = $2, decided_by = $3, decided_at = $4 "
            "WHERE proposal_id = $1 AND decision IS NULL",
            proposal.proposal_id,
            proposal.decision,
            proposal.decided_by,
            proposal.decided_at,
        )
        return bool(status == "UPDATE 1")

    async def _still_pending(self, conn: asyncpg.Connection, proposal_id: uuid.UUID) -> bool:
        """In the approval's transaction: whether it is undecided, held until the commit."""
        pending = await conn.fetchval(
            f"SELECT decision IS NULL FROM {self.TABLE} WHERE proposal_id = $1 FOR UPDATE",
            proposal_id,
        )
        return bool(pending)

    async def _approved(self, conn: asyncpg.Connection, approved: P, version: int) -> None:
        """In the approval's transaction: the approval and the version it wrote."""
        await conn.execute(
            f"UPDATE {self.TABLE} SET decision = 'approved', decided_by = $2, "
            "decided_at = $3, version = $4 WHERE proposal_id = $1",
            approved.proposal_id,
            approved.decided_by,
            approved.decided_at,
            version,
        )
