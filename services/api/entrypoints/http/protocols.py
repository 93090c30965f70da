"""Care-team protocols (fever and pump thresholds) and per-patient overrides.

Both are versioned and append-only: a change writes a new version, signed off by the caller,
and an audit entry with the old and new values. The rules service uses each key's newest
version; a replay can rebuild any older one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field, ValidationError

from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import Clock, Repository, require
from services.api.entrypoints.http.responses import AUTHENTICATED, invalid, not_found
from services.rules.public import Thresholds

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


def _check(overrides: dict[str, Any]) -> None:
    """Refuse unknown names and incoherent values before anything is written."""
    unknown = set(overrides) - set(Thresholds.model_fields)
    if unknown:
        raise invalid("overrides", f"unknown thresholds: {sorted(unknown)}", where="body")
    try:
        Thresholds.model_validate({**Thresholds().model_dump(), **overrides}).fever()
    except (ValidationError, ValueError) as error:
        raise invalid("overrides", str(error), where="body") from None


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
    response_model=Version,
    responses=not_found("care team"),
)
async def change_protocol(
    request: Request,
    care_team_id: str,
    change: ThresholdChange,
    principal: Changer,
    repository: Repository,
    clock: Clock,
) -> Version:
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    _check(change.overrides)
    old, new = await repository.add_protocol_version(
        care_team_id, change.overrides, principal.username, clock()
    )
    await request.app.state.audit.record(
        principal.user_id,
        "thresholds.changed",
        f"care_team:{care_team_id}",
        {"old": old, "new": change.overrides, "version": new["version"], "reason": change.reason},
    )
    return _versions([new])[0]


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
    response_model=Version,
    responses=not_found("patient"),
)
async def change_overrides(
    request: Request,
    patient_id: str,
    change: ThresholdChange,
    principal: Changer,
    repository: Repository,
    clock: Clock,
) -> Version:
    if await repository.patient(principal.care_teams, patient_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
    _check(change.overrides)
    old, new = await repository.add_override_version(
        patient_id, change.overrides, principal.username, clock(), change.reason
    )
    await request.app.state.audit.record(
        principal.user_id,
        "thresholds.changed",
        f"patient:{patient_id}",
        {"old": old, "new": change.overrides, "version": new["version"], "reason": change.reason},
    )
    return _versions([new])[0]
