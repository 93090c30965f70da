"""Threshold changes under two sign-offs: one member of the care team proposes, another approves.

A care team's protocol (fever and pump thresholds) and a patient's override decide whether a
child is paged at all: one person's slip (44.0 °C for 40.0 °C) must not switch paging off. So a
change is first a *proposal*; it takes effect only when a second person with the right to change
thresholds approves it, and then becomes the next version, signed off by the approver (the
proposal keeps who proposed it). A proposal is checked when proposed and again when approved.
It is refused at approval if another version was written since it was proposed (it was decided
against a protocol that is no longer current). A newer proposal for the same protocol or
patient withdraws the pending one. The proposer may withdraw; anyone who may approve may reject.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from services.rules.public import Thresholds

Scope = Literal["care_team", "patient"]
Decision = Literal["approved", "rejected", "withdrawn"]


@dataclass(frozen=True, slots=True)
class Proposal:
    proposal_id: uuid.UUID
    scope: Scope
    subject_id: str  # the care team's id, or the patient's
    care_team_id: str
    overrides: dict[str, Any]
    reason: str | None
    based_on: int  # the newest version when it was proposed; 0 for none
    proposed_by: str
    proposed_at: datetime
    decision: Decision | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    version: int | None = None  # the version an approval wrote

    @property
    def status(self) -> str:
        return self.decision or "pending"


class ProposalStore(Protocol):
    async def newest_version(self, scope: Scope, subject_id: str) -> int: ...
    async def pending_for(self, scope: Scope, subject_id: str) -> Proposal | None: ...
    async def get(self, proposal_id: uuid.UUID) -> Proposal | None: ...
    async def add(self, proposal: Proposal) -> None: ...
    async def decide(self, proposal: Proposal) -> bool:
        """Record a rejection or withdrawal of a pending proposal; False when it was no longer
        pending."""
        ...

    async def approve(self, approved: Proposal) -> Approval:
        """In one transaction, with the protocol's (or override's) writers held off: if the
        proposal is still pending and the newest version is still the one it was based on,
        record the approval and append its overrides as the next version, signed off by
        ``approved.decided_by`` at ``approved.decided_at``."""
        ...


@dataclass(frozen=True, slots=True)
class Approval:
    outcome: Literal["approved", "not_pending", "stale"]
    version: int  # the version written, or (stale) the newest one found
    old: dict[str, Any]  # the overrides it replaced


def check_overrides(overrides: dict[str, Any]) -> None:
    """Refuse unknown threshold names and values that are incoherent laid over the defaults
    (ValueError), before anything is written."""
    unknown = set(overrides) - set(Thresholds.model_fields)
    if unknown:
        raise ValueError(f"unknown thresholds: {sorted(unknown)}")
    try:
        Thresholds.model_validate({**Thresholds().model_dump(), **overrides}).fever()
    except ValidationError as error:
        raise ValueError(str(error)) from None


class ProposalRefused(Exception):
    """A decision that cannot be taken; ``status`` is the HTTP answer it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Audit(Protocol):
    async def record(
        self, actor: str, action: str, subject: str, details: dict[str, Any]
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Person:
    user_id: str
    username: str


def _subject(proposal: Proposal) -> str:
    kind = "care_team" if proposal.scope == "care_team" else "patient"
    return f"{kind}:{proposal.subject_id}"


class ThresholdChanges:
    def __init__(
        self,
        store: ProposalStore,
        audit: Audit,
        clock: Callable[[], datetime],
        check: Callable[[dict[str, Any]], None],
    ) -> None:
        """``check`` refuses overrides that are unknown or incoherent (raising ValueError)."""
        self._store = store
        self._audit = audit
        self._clock = clock
        self._check = check

    async def propose(
        self,
        by: Person,
        scope: Scope,
        subject_id: str,
        care_team_id: str,
        overrides: dict[str, Any],
        reason: str | None,
    ) -> Proposal:
        self._check(overrides)
        now = self._clock()
        earlier = await self._store.pending_for(scope, subject_id)
        if earlier is not None:
            withdrawn = replace(
                earlier, decision="withdrawn", decided_by=by.username, decided_at=now
            )
            if await self._store.decide(withdrawn):
                await self._audit.record(
                    by.user_id,
                    "thresholds.withdrawn",
                    _subject(earlier),
                    {"proposal": str(earlier.proposal_id), "superseded": True},
                )
        proposal = Proposal(
            proposal_id=uuid.uuid4(),
            scope=scope,
            subject_id=subject_id,
            care_team_id=care_team_id,
            overrides=dict(overrides),
            reason=reason,
            based_on=await self._store.newest_version(scope, subject_id),
            proposed_by=by.username,
            proposed_at=now,
        )
        await self._store.add(proposal)
        await self._audit.record(
            by.user_id,
            "thresholds.proposed",
            _subject(proposal),
            {
                "proposal": str(proposal.proposal_id),
                "overrides": proposal.overrides,
                "based_on": proposal.based_on,
                "reason": reason,
            },
        )
        return proposal

    async def approve(self, by: Person, proposal: Proposal) -> Proposal:
        if proposal.decision is not None:
            raise ProposalRefused(409, f"proposal already {proposal.decision}")
        if by.username == proposal.proposed_by:
            raise ProposalRefused(403, "a threshold change needs a second person's sign-off")
        try:
            self._check(proposal.overrides)
        except ValueError as error:
            raise ProposalRefused(409, f"no longer valid: {error}") from None
        approved = replace(
            proposal, decision="approved", decided_by=by.username, decided_at=self._clock()
        )
        result = await self._store.approve(approved)
        if result.outcome == "not_pending":
            raise ProposalRefused(409, "proposal decided meanwhile")
        if result.outcome == "stale":
            raise ProposalRefused(
                409,
                f"version {result.version} was written after this proposal (made on version "
                f"{proposal.based_on}): propose again on the current one",
            )
        old, version = result.old, result.version
        await self._audit.record(
            by.user_id,
            "thresholds.changed",
            _subject(proposal),
            {
                "old": old,
                "new": proposal.overrides,
                "version": version,
                "reason": proposal.reason,
                "proposed_by": proposal.proposed_by,
                "proposal": str(proposal.proposal_id),
            },
        )
        return replace(approved, version=version)

    async def reject(self, by: Person, proposal: Proposal) -> Proposal:
        if proposal.decision is not None:
            raise ProposalRefused(409, f"proposal already {proposal.decision}")
        decision: Decision = "withdrawn" if by.username == proposal.proposed_by else "rejected"
        decided = replace(
            proposal, decision=decision, decided_by=by.username, decided_at=self._clock()
        )
        if not await self._store.decide(decided):
            raise ProposalRefused(409, "proposal decided meanwhile")
        await self._audit.record(
            by.user_id,
            f"thresholds.{decision}",
            _subject(proposal),
            {"proposal": str(proposal.proposal_id)},
        )
        return decided
