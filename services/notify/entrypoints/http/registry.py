"""Routes of the registry: care teams, people and their contact methods, on-call schedules and
their overrides, who is on call, escalation policies. Management endpoints (bearer token)."""

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException

from schemas.notify import (
    CareTeamIn,
    EscalationPolicyIn,
    OnCallOut,
    OverrideIn,
    PersonIn,
    ScheduleIn,
)
from services.notify.domain.schedule import on_call_at
from services.notify.entrypoints.http.deps import MANAGED, Repository
from vigil.runtime import utcnow

router = APIRouter()


def same_id(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise HTTPException(status_code=422, detail="id in the path and the body differ")


@router.put("/care-teams/{care_team_id}", dependencies=MANAGED, status_code=204)
async def put_care_team(care_team_id: str, body: CareTeamIn, repository: Repository) -> None:
    same_id(care_team_id, body.care_team_id)
    await repository.put_care_team(body)


@router.put("/people/{person_id}", dependencies=MANAGED, status_code=204)
async def put_person(person_id: str, body: PersonIn, repository: Repository) -> None:
    same_id(person_id, body.person_id)
    await repository.put_person(body)


@router.get("/people/{person_id}", dependencies=MANAGED)
async def get_person(person_id: str, repository: Repository) -> dict[str, Any]:
    person = await repository.person(person_id)
    if person is None:
        raise HTTPException(status_code=404, detail="no such person")
    return person


@router.put("/schedules/{schedule_id}", dependencies=MANAGED, status_code=204)
async def put_schedule(schedule_id: str, body: ScheduleIn, repository: Repository) -> None:
    same_id(schedule_id, body.schedule_id)
    await repository.put_schedule(body)


@router.post("/schedules/{schedule_id}/overrides", dependencies=MANAGED, status_code=201)
async def post_override(
    schedule_id: str, body: OverrideIn, repository: Repository
) -> dict[str, str]:
    override_id = uuid.uuid4()
    await repository.add_override(override_id, schedule_id, body)
    return {"override_id": str(override_id)}


@router.get("/schedules/{schedule_id}/oncall", dependencies=MANAGED)
async def get_oncall(
    schedule_id: str, repository: Repository, at: datetime | None = None
) -> OnCallOut:
    when = at or utcnow()
    if when.tzinfo is None:
        raise HTTPException(status_code=422, detail="at must carry a UTC offset")
    rotation = await repository.rotation(schedule_id)
    if rotation is None:
        raise HTTPException(status_code=404, detail="no such schedule")
    return OnCallOut(schedule_id=schedule_id, at=when, person_id=on_call_at(rotation, when))


@router.put("/care-teams/{care_team_id}/escalation-policy", dependencies=MANAGED, status_code=204)
async def put_policy(care_team_id: str, body: EscalationPolicyIn, repository: Repository) -> None:
    await repository.put_policy(care_team_id, body)
