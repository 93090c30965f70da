"""First-response guidance for families under two sign-offs, like threshold changes
(``service_layer/thresholds.py``).

What a family is told to do while the care team is on its way is clinical advice: one person's
slip must not reach a frightened parent at 3 a.m. So a text for one alarm and one language is
first a *proposal* by someone who may change thresholds; it takes effect when a second such
person approves it, as the next version, signed off by the approver (the proposal keeps who
proposed it). It is refused at approval if another version was written since it was proposed. A
newer proposal for the same alarm and language withdraws the pending one; the proposer may
withdraw, anyone who may approve may reject. Every step is audited.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, Protocol

from services.api.service_layer.caregivers import CAREGIVER_LANGUAGES
from services.api.service_layer.thresholds import Audit, Person, ProposalRefused

Decision = Literal["approved", "rejected", "withdrawn"]

#: A rule's family the family is told of, or one alert code (more specific: it wins).
_ALARM = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class GuidanceProposal:
    proposal_id: uuid.UUID
    care_team_id: str
    alarm: str
    language: str
    text: str
    based_on: int
    proposed_by: str
    proposed_at: datetime
    decision: Decision | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    version: int | None = None

    @property
    def status(self) -> str:
        return self.decision or "pending"


@dataclass(frozen=True, slots=True)
class GuidanceApproval:
    outcome: Literal["approved", "not_pending", "stale"]
    version: int
    old: str | None


class GuidanceStore(Protocol):
    async def newest_version(self, care_team_id: str, alarm: str, language: str) -> int: ...
    async def pending_for(
        self, care_team_id: str, alarm: str, language: str
    ) -> GuidanceProposal | None: ...
    async def get(self, proposal_id: uuid.UUID) -> GuidanceProposal | None: ...
    async def add(self, proposal: GuidanceProposal) -> None: ...
    async def decide(self, proposal: GuidanceProposal) -> bool:
        """Record a rejection or withdrawal of a pending proposal; False when it was no longer
        pending."""
        ...

    async def approve(self, approved: GuidanceProposal) -> GuidanceApproval:
        """In one transaction: if still pending and the newest version is still the one it was
        based on, record the approval and append the text as the next version."""
        ...


class InvalidGuidance(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_guidance(alarm: str, language: str, text: str) -> str:
    """The text as it will be stored (trimmed); InvalidGuidance otherwise."""
    if not _ALARM.match(alarm):
        raise InvalidGuidance("alarm", "an alarm: lower-case letters, digits, _ and .")
    if language not in CAREGIVER_LANGUAGES:
        raise InvalidGuidance("language", f"one of {', '.join(CAREGIVER_LANGUAGES)}")
    cleaned = " ".join(text.split())
    if not cleaned or len(cleaned) > MAX_TEXT:
        raise InvalidGuidance("text", f"1 to {MAX_TEXT} characters")
    return cleaned


def _subject(p: GuidanceProposal) -> str:
    return f"care_team:{p.care_team_id}"


class GuidanceChanges:
    def __init__(self, store: GuidanceStore, audit: Audit, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock

    async def propose(
        self, by: Person, care_team_id: str, alarm: str, language: str, text: str
    ) -> GuidanceProposal:
        cleaned = check_guidance(alarm, language, text)
        now = self._clock()
        earlier = await self._store.pending_for(care_team_id, alarm, language)
        if earlier is not None:
            withdrawn = replace(
                earlier, decision="withdrawn", decided_by=by.username, decided_at=now
            )
            if await self._store.decide(withdrawn):
                await self._audit.record(
                    by.user_id,
                    "caregiver_guidance.withdrawn",
                    _subject(earlier),
                    {"proposal": str(earlier.proposal_id), "superseded": True},
                )
        proposal = GuidanceProposal(
            proposal_id=uuid.uuid4(),
            care_team_id=care_team_id,
            alarm=alarm,
            language=language,
            text=cleaned,
            based_on=await self._store.newest_version(care_team_id, alarm, language),
            proposed_by=by.username,
            proposed_at=now,
        )
        await self._store.add(proposal)
        await self._audit.record(
            by.user_id,
            "caregiver_guidance.proposed",
            _subject(proposal),
            {
                "proposal": str(proposal.proposal_id),
                "alarm": alarm,
                "language": language,
                "text": cleaned,
                "based_on": proposal.based_on,
            },
        )
        return proposal

    async def approve(self, by: Person, proposal: GuidanceProposal) -> GuidanceProposal:
        if proposal.decision is not None:
            raise ProposalRefused(409, f"proposal already {proposal.decision}")
        if by.username == proposal.proposed_by:
            raise ProposalRefused(403, "guidance for families needs a second person's sign-off")
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
            "caregiver_guidance.changed",
            _subject(proposal),
            {
                "alarm": proposal.alarm,
                "language": proposal.language,
                "old": result.old,
                "new": proposal.text,
                "version": result.version,
                "proposed_by": proposal.proposed_by,
                "proposal": str(proposal.proposal_id),
            },
        )
        return replace(approved, version=result.version)

    async def reject(self, by: Person, proposal: GuidanceProposal) -> GuidanceProposal:
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
            f"caregiver_guidance.{decision}",
            _subject(proposal),
            {"proposal": str(proposal.proposal_id)},
        )
        return decided
