"""Two-person sign-off: the mechanism threshold changes (``thresholds.py``) and the guidance for
families (``caregiver_guidance.py``) share.

A change is first a *proposal* by one person; it takes effect only when *another* person
approves it, and then becomes the next version, signed off by the approver (the proposal keeps
who proposed it). It is refused at approval if it was decided meanwhile, or if another version
was written since it was proposed (``based_on``). A newer proposal for the same thing withdraws
the pending one; the proposer may withdraw, anyone who may approve may reject. Every step is
audited as ``<kind>.proposed``, ``.withdrawn``, ``.rejected`` and ``.changed``.

Each feature keeps its own payload, its own checks and its own store; this module holds the
states, the rule that the approver is another person and the audit entries of the decisions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, Literal, Protocol, TypeVar

Decision = Literal["approved", "rejected", "withdrawn"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedProposal:
    """Where a proposal stands; each feature's proposal adds its payload."""

    proposal_id: uuid.UUID
    care_team_id: str
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


Old = TypeVar("Old")


@dataclass(frozen=True)  # no slots: a call of Approval[...] sets __orig_class__, refused quietly
class Approval(Generic[Old]):
    """What a store's approval found: ``version`` is the one written, or (stale) the newest one
    found; ``old`` is what the new version replaced."""

    outcome: Literal["approved", "not_pending", "stale"]
    version: int
    old: Old


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


P = TypeVar("P", bound=SignedProposal)
P_contra = TypeVar("P_contra", bound=SignedProposal, contravariant=True)


class Decisions(Protocol[P_contra, Old]):
    """The part of a proposal store the sign-off writes through."""

    async def add(self, proposal: P_contra) -> None: ...

    async def decide(self, proposal: P_contra) -> bool:
        """Record a rejection or withdrawal of a pending proposal; False when it was no longer
        pending."""
        ...

    async def approve(self, approved: P_contra) -> Approval[Old]:
        """In one transaction, with the versions' writers held off: if the proposal is still
        pending and the newest version is still the one it was based on, record the approval and
        append its payload as the next version, signed off by ``approved.decided_by`` at
        ``approved.decided_at``."""
        ...


class TwoPersonSignOff(Generic[P, Old]):
    def __init__(
        self,
        *,
        kind: str,
        needs: str,
        subject: Callable[[P], str],
        store: Decisions[P, Old],
        audit: Audit,
        clock: Callable[[], datetime],
    ) -> None:
        """``kind`` prefixes the audit actions; ``needs`` is what the proposer is told when they
        approve their own proposal; ``subject`` is the audit subject of a proposal."""
        self._kind = kind
        self._needs = needs
        self._subject = subject
        self._store = store
        self._audit = audit
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    async def withdraw_pending(self, by: Person, earlier: P | None, now: datetime) -> None:
        """A newer proposal withdraws the pending one (if it is still pending)."""
        if earlier is None:
            return
        withdrawn = replace(earlier, decision="withdrawn", decided_by=by.username, decided_at=now)
        if await self._store.decide(withdrawn):
            await self._audit.record(
                by.user_id,
                f"{self._kind}.withdrawn",
                self._subject(earlier),
                {"proposal": str(earlier.proposal_id), "superseded": True},
            )

    async def submit(self, by: Person, proposal: P, details: dict[str, Any]) -> P:
        """Store a new proposal and audit it with ``details`` after its id."""
        await self._store.add(proposal)
        await self._audit.record(
            by.user_id,
            f"{self._kind}.proposed",
            self._subject(proposal),
            {"proposal": str(proposal.proposal_id), **details},
        )
        return proposal

    async def approve(
        self,
        by: Person,
        proposal: P,
        changed: Callable[[P, Approval[Old]], dict[str, Any]],
        recheck: Callable[[P], None] | None = None,
    ) -> P:
        """The second sign-off. ``recheck`` may refuse the payload again (ValueError: 409);
        ``changed`` gives the details of the ``.changed`` audit entry."""
        if proposal.decision is not None:
            raise ProposalRefused(409, f"proposal already {proposal.decision}")
        if by.username == proposal.proposed_by:
            raise ProposalRefused(403, self._needs)
        if recheck is not None:
            try:
                recheck(proposal)
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
        await self._audit.record(
            by.user_id,
            f"{self._kind}.changed",
            self._subject(proposal),
            changed(proposal, result),
        )
        return replace(approved, version=result.version)

    async def reject(self, by: Person, proposal: P) -> P:
        """Rejected, or withdrawn when the proposer does it."""
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
            f"{self._kind}.{decision}",
            self._subject(proposal),
            {"proposal": str(proposal.proposal_id)},
        )
        return decided
