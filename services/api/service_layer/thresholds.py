"""Threshold changes under two sign-offs (``sign_off.py``): one member of the care team proposes,
another approves.

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
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from services.api.service_layer import sign_off
from services.api.service_layer.sign_off import Person, SignedProposal, TwoPersonSignOff
from services.rules.public import Thresholds

Scope = Literal["care_team", "patient"]
Audit = sign_off.Audit  # where the audit port is also imported from
Approval = sign_off.Approval[dict[str, Any]]  # ``old``: the overrides it replaced


@dataclass(frozen=True, slots=True, kw_only=True)
class Proposal(SignedProposal):
    scope: Scope
    subject_id: str  # the care team's id, or the patient's
    overrides: dict[str, Any]
    reason: str | None


class ProposalStore(sign_off.Decisions[Proposal, dict[str, Any]], Protocol):
    async def newest_version(self, scope: Scope, subject_id: str) -> int: ...
    async def pending_for(self, scope: Scope, subject_id: str) -> Proposal | None: ...
    async def get(self, proposal_id: uuid.UUID) -> Proposal | None: ...


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


def _subject(proposal: Proposal) -> str:
    kind = "care_team" if proposal.scope == "care_team" else "patient"
    return f"{kind}:{proposal.subject_id}"


def _changed(proposal: Proposal, result: Approval) -> dict[str, Any]:
    return {
        "old": result.old,
        "new": proposal.overrides,
        "version": result.version,
        "reason": proposal.reason,
        "proposed_by": proposal.proposed_by,
        "proposal": str(proposal.proposal_id),
    }


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
        self._check = check
        self._sign_off = TwoPersonSignOff(
            kind="thresholds",
            needs="a threshold change needs a second person's sign-off",
            subject=_subject,
            store=store,
            audit=audit,
            clock=clock,
        )

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
        now = self._sign_off.now()
        await self._sign_off.withdraw_pending(
            by, await self._store.pending_for(scope, subject_id), now
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
        return await self._sign_off.submit(
            by,
            proposal,
            {"overrides": proposal.overrides, "based_on": proposal.based_on, "reason": reason},
        )

    async def approve(self, by: Person, proposal: Proposal) -> Proposal:
        """Checked again (the defaults may have moved), then signed off as the next version."""
        return await self._sign_off.approve(
            by, proposal, _changed, recheck=lambda p: self._check(p.overrides)
        )

    async def reject(self, by: Person, proposal: Proposal) -> Proposal:
        return await self._sign_off.reject(by, proposal)
