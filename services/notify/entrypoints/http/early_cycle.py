"""Routes of a care team's early-cycle escalation override: set, read, remove (management
endpoints). The change and its audit entry are ``service_layer/team_settings.py``'s."""

from fastapi import APIRouter, HTTPException

from schemas.notify import EarlyCycleEscalationIn, EarlyCycleEscalationOut, TargetIn
from services.notify.entrypoints.http.deps import MANAGED, Repository, Service
from services.notify.service_layer import team_settings

router = APIRouter()


@router.put(
    "/care-teams/{care_team_id}/early-cycle-escalation", dependencies=MANAGED, status_code=204
)
async def put_early_cycle(
    care_team_id: str, body: EarlyCycleEscalationIn, service: Service, repository: Repository
) -> None:
    # Who is paged, and how soon, for a fever that may be CRS: audited like quiet hours.
    if not await team_settings.set_early_cycle(repository, care_team_id, body, clock=service.now):
        raise HTTPException(status_code=404, detail="no such care team")


@router.get("/care-teams/{care_team_id}/early-cycle-escalation", dependencies=MANAGED)
async def get_early_cycle(care_team_id: str, repository: Repository) -> EarlyCycleEscalationOut:
    override = await repository.early_cycle(care_team_id)
    if override is None:
        raise HTTPException(
            status_code=404,
            detail="no early-cycle escalation: early-cycle fevers page the usual chain",
        )
    wait = override.ack_wait_s
    return EarlyCycleEscalationOut(
        care_team_id=care_team_id,
        ack_wait_minutes=None if wait is None else wait / 60,
        extra_targets=tuple(TargetIn(kind=t["kind"], ref=t["ref"]) for t in override.extra_targets),
        updated_at=override.updated_at,
        updated_by=override.updated_by,
    )


@router.delete(
    "/care-teams/{care_team_id}/early-cycle-escalation", dependencies=MANAGED, status_code=204
)
async def delete_early_cycle(
    care_team_id: str, by: str, service: Service, repository: Repository
) -> None:
    if not by.strip():
        raise HTTPException(status_code=422, detail="by names who removes it")
    if not await team_settings.remove_early_cycle(
        repository, care_team_id, by=by, clock=service.now
    ):
        raise HTTPException(status_code=404, detail="no early-cycle escalation")
