"""Routes of alerts and the pipeline's outages: timeline, acknowledge, snooze (read through the
repository, decided by the escalation service); outages read-only. Management endpoints."""

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, HTTPException

from schemas.notify import AcknowledgeIn, AckOut, SnoozeIn
from services.notify.entrypoints.http.deps import MANAGED, Repository, Service
from services.notify.service_layer.escalation import AckOutcome, AckResult

router = APIRouter()


@router.get("/pipeline-outages", dependencies=MANAGED)
async def get_pipeline_outages(
    repository: Repository, since: datetime | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """When Vigil was not watching (read-only): each heartbeat silence, newest first."""
    if since is not None and since.tzinfo is None:
        raise HTTPException(422, "since must carry a UTC offset")
    rows = await repository.outages(since=since, limit=max(1, min(limit, 500)))
    return [
        {key: (str(value) if key == "outage_id" else value) for key, value in row.items()}
        for row in rows
    ]


@router.get("/alerts/{dedup_key}/timeline", dependencies=MANAGED)
async def get_timeline(dedup_key: str, repository: Repository) -> dict[str, Any]:
    timeline = await repository.timeline(dedup_key)
    if timeline is None:
        raise HTTPException(status_code=404, detail="no escalation for this alert")
    return timeline


@router.post("/alerts/{dedup_key}/acknowledge", dependencies=MANAGED)
async def acknowledge(
    dedup_key: str, body: AcknowledgeIn, service: Service, repository: Repository
) -> AckOut:
    escalation_id = await repository.escalation_id_for(dedup_key)
    if escalation_id is None:
        raise HTTPException(status_code=404, detail="no escalation for this alert")
    return ack_out(await service.acknowledge(escalation_id, by=body.by, via="api"))


@router.post("/alerts/{dedup_key}/snooze", dependencies=MANAGED, status_code=204)
async def snooze(dedup_key: str, body: SnoozeIn, service: Service, repository: Repository) -> None:
    escalation_id = await repository.escalation_id_for(dedup_key)
    if escalation_id is None:
        raise HTTPException(status_code=404, detail="no escalation for this alert")
    # The service's clock, so a snooze is measured on the same clock as the chain's timers.
    until = service.now() + timedelta(minutes=body.minutes)
    await service.snooze(escalation_id, until=until, by=body.by)


def ack_out(result: AckResult) -> AckOut:
    if result.outcome is AckOutcome.NOT_FOUND:
        raise HTTPException(status_code=404, detail="no escalation for this alert")
    return AckOut(
        outcome=result.outcome.value,
        escalation_id=None if result.escalation_id is None else str(result.escalation_id),
        detail=result.detail,
    )
