"""Care-team protocols (fever and pump thresholds) and per-patient overrides.

Both are versioned and append-only. A change is proposed by one person and takes effect when a
second person approves it (``service_layer/thresholds.py``): the approval writes the new version,
signed off by the approver, and an audit entry with the old and new values and the proposer. The
rules service uses each key's newest version; a replay can rebuild any older one.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field

from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import Repository, require
from services.api.entrypoints.http.responses import AUTHENTICATED, invalid, not_found
from services.api.entrypoints.http.sign_off import (
    DECIDED,
    Limit,
    Status,
    StatusFilter,
    decide,
    person,
)
from services.api.service_layer.thresholds import Proposal, Scope, ThresholdChanges

router = APIRouter(prefix="/api", tags=["protocols"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]
Changer = Annotated[Principal, Depends(require(Action.CHANGE_THRESHOLDS))]


class ThresholdChange(BaseModel):
    overrides: dict[str, Any] = Field(
        description="Threshold names of the rules (e.g. fever_single_c) and their new values."
    )
    reason: str | None = Field(default=None, max_length=500)


class Version(BaseModel):
    version: int
    overrides: dict[str, Any]
    signed_off_by: str
    signed_off_at: str
    reason: str | None = None


class ProposalView(BaseModel):
    proposal_id: UUID
    scope: Literal["care_team", "patient"]
    subject_id: str = Field(description="The care team's id, or the patient's.")
    care_team_id: str
    overrides: dict[str, Any]
    reason: str | None
    based_on_version: int = Field(description="The newest version when it was proposed (0: none).")
    proposed_by: str
    proposed_at: datetime
    status: Status
    decided_by: str | None
    decided_at: datetime | None
    version: int | None = Field(description="The version its approval wrote.")


def _view(p: Proposal) -> ProposalView:
    return ProposalView(
        proposal_id=p.proposal_id,
        scope=p.scope,
        subject_id=p.subject_id,
        care_team_id=p.care_team_id,
        overrides=p.overrides,
        reason=p.reason,
        based_on_version=p.based_on,
        proposed_by=p.proposed_by,
        proposed_at=p.proposed_at,
        status=p.status,
        decided_by=p.decided_by,
        decided_at=p.decided_at,
        version=p.version,
    )


def _changes(request: Request) -> ThresholdChanges:
    changes: ThresholdChanges = request.app.state.threshold_changes
    return changes


async def _propose(
    request: Request,
    principal: Principal,
    scope: Scope,
    subject_id: str,
    care_team_id: str,
    change: ThresholdChange,
) -> ProposalView:
    try:
        proposal = await _changes(request).propose(
            person(principal), scope, subject_id, care_team_id, change.overrides, change.reason
        )
    except ValueError as error:
        raise invalid("overrides", str(error), where="body") from None
    return _view(proposal)


def _versions(rows: list[dict[str, Any]]) -> list[Version]:
    return [
        Version(
            version=r["version"],
            overrides=json.loads(r["overrides"])
            if isinstance(r["overrides"], str)
            else dict(r["overrides"]),
            signed_off_by=r["signed_off_by"],
            signed_off_at=r["signed_off_at"].isoformat(),
            reason=r.get("reason"),
        )
        for r in rows
    ]


@router.get("/care-teams")
async def care_teams(principal: Reader, repository: Repository) -> list[dict[str, Any]]:
    return await repository.care_teams(principal.care_teams)


@router.get(
    "/care-teams/{care_team_id}/protocol",
    response_model=list[Version],
    responses=not_found("care team"),
)
async def protocol_versions(
    care_team_id: str, principal: Reader, repository: Repository
) -> list[Version]:
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    return _versions(await repository.protocol_versions(care_team_id))


@router.put(
    "/care-teams/{care_team_id}/protocol",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ProposalView,
    responses=not_found("care team"),
)
async def change_protocol(
    request: Request, care_team_id: str, change: ThresholdChange, principal: Changer
) -> ProposalView:
    """Propose the care team's next protocol version (it replaces a pending proposal)."""
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    return await _propose(request, principal, "care_team", care_team_id, care_team_id, change)


@router.get(
    "/patients/{patient_id}/overrides",
    response_model=list[Version],
    responses=not_found("patient"),
)
async def override_versions(
    request: Request, patient_id: str, principal: Reader, repository: Repository
) -> list[Version]:
    if await repository.patient(principal.care_teams, patient_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
    await request.app.state.audit.record(
        principal.user_id, "patient.overrides", f"patient:{patient_id}", {}
    )
    return _versions(await repository.override_versions(patient_id))


@router.put(
    "/patients/{patient_id}/overrides",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ProposalView,
    responses=not_found("patient"),
)
async def change_overrides(
    request: Request,
    patient_id: str,
    change: ThresholdChange,
    principal: Changer,
    repository: Repository,
) -> ProposalView:
    """Propose the patient's next override version (it replaces a pending proposal)."""
    patient = await repository.patient(principal.care_teams, patient_id)
    if patient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
    return await _propose(
        request, principal, "patient", patient_id, patient["care_team_id"], change
    )


@router.get("/threshold-proposals", response_model=list[ProposalView])
async def proposals(
    request: Request,
    principal: Reader,
    status_: StatusFilter = "pending",
    limit: Limit = 100,
) -> list[ProposalView]:
    """Threshold proposals of the caller's care teams, newest first (default: pending ones)."""
    store = request.app.state.threshold_proposals
    return [_view(p) for p in await store.listed(principal.care_teams, status_, limit)]


async def _decide(
    request: Request, proposal_id: UUID, principal: Principal, approve: bool
) -> ProposalView:
    store = request.app.state.threshold_proposals
    return _view(await decide(store, _changes(request), proposal_id, principal, approve))


@router.post(
    "/threshold-proposals/{proposal_id}/approve",
    response_model=ProposalView,
    responses=DECIDED,
)
async def approve_proposal(request: Request, proposal_id: UUID, principal: Changer) -> ProposalView:
    """The second sign-off: someone other than the proposer, who may change thresholds,
    approves; the proposal becomes the next version, signed off by them. 403 for the proposer."""
    return await _decide(request, proposal_id, principal, approve=True)


@router.post(
    "/threshold-proposals/{proposal_id}/reject",
    response_model=ProposalView,
    responses=DECIDED,
)
async def reject_proposal(request: Request, proposal_id: UUID, principal: Changer) -> ProposalView:
    """Reject a pending proposal (``withdrawn`` when its proposer does it)."""
    return await _decide(request, proposal_id, principal, approve=False)
