"""First-response guidance for families under two sign-offs (``sign_off.py``), like threshold
changes (``thresholds.py``).

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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from services.api.service_layer import sign_off
from services.api.service_layer.caregivers import CAREGIVER_LANGUAGES
from services.api.service_layer.sign_off import (
    Audit,
    Person,
    SignedProposal,
    TwoPersonSignOff,
)

#: A rule's family the family is told of, or one alert code (more specific: it wins).
_ALARM = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_TEXT = 200

GuidanceApproval = sign_off.Approval[str | None]  # ``old``: the text it replaced


@dataclass(frozen=True, slots=True, kw_only=True)
class GuidanceProposal(SignedProposal):
    alarm: str
    language: str
    text: str


class GuidanceStore(sign_off.Decisions[GuidanceProposal, str | None], Protocol):
    async def newest_version(self, care_team_id: str, alarm: str, language: str) -> int: ...
    async def pending_for(
        self, care_team_id: str, alarm: str, language: str
    ) -> GuidanceProposal | None: ...
    async def get(self, proposal_id: uuid.UUID) -> GuidanceProposal | None: ...


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


def _changed(proposal: GuidanceProposal, result: GuidanceApproval) -> dict[str, Any]:
    return {
        "alarm": proposal.alarm,
        "language": proposal.language,
        "old": result.old,
        "new": proposal.text,
        "version": result.version,
        "proposed_by": proposal.proposed_by,
        "proposal": str(proposal.proposal_id),
    }


class GuidanceChanges:
    def __init__(self, store: GuidanceStore, audit: Audit, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._sign_off = TwoPersonSignOff(
            kind="caregiver_guidance",
            needs="guidance for families needs a second person's sign-off",
            subject=_subject,
            store=store,
            audit=audit,
            clock=clock,
        )

    async def propose(
        self, by: Person, care_team_id: str, alarm: str, language: str, text: str
    ) -> GuidanceProposal:
        cleaned = check_guidance(alarm, language, text)
        now = self._sign_off.now()
        await self._sign_off.withdraw_pending(
            by, await self._store.pending_for(care_team_id, alarm, language), now
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
        return await self._sign_off.submit(
            by,
            proposal,
            {"alarm": alarm, "language": language, "text": cleaned, "based_on": proposal.based_on},
        )

    async def approve(self, by: Person, proposal: GuidanceProposal) -> GuidanceProposal:
        return await self._sign_off.approve(by, proposal, _changed)

    async def reject(self, by: Person, proposal: GuidanceProposal) -> GuidanceProposal:
        return await self._sign_off.reject(by, proposal)
