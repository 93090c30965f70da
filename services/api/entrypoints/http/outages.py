"""The pipeline's outages: each time Vigil was not watching (a heartbeat silence notify
recorded), newest first. Read-only; any signed-in member of a care team may read them
(``read_patient``): an outage is the whole pipeline's, not one team's, and names no patient.
The rows are notify's, read through ``services.notify.public.PipelineOutages``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, Field

from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import require
from services.api.entrypoints.http.responses import AUTHENTICATED

router = APIRouter(prefix="/api", tags=["pipeline"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]


class PipelineOutage(BaseModel):
    outage_id: str
    source: str = Field(description="The heartbeat source that fell silent.")
    started_at: datetime = Field(
        description="Device time of the last heartbeat before the silence."
    )
    ended_at: datetime | None = Field(
        description="Device time of the first heartbeat back; None while it lasts."
    )
    detected_at: datetime = Field(description="When notify noticed the silence (its clock).")
    recovered_at: datetime | None = Field(description="When notify saw heartbeats again.")
    summarised_at: datetime | None = Field(
        description="When the care teams were sent the outage's summary."
    )
    teams_told: int = Field(description="How many care teams were sent the summary.")


@router.get("/pipeline-outages", response_model=list[PipelineOutage])
async def pipeline_outages(
    request: Request,
    principal: Reader,
    since: Annotated[
        AwareDatetime | None,
        Query(description="Only outages that had not ended by then (with a UTC offset)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[PipelineOutage]:
    """When Vigil was not watching: each heartbeat silence, newest first."""
    rows = await request.app.state.pipeline_outages.outages(since=since, limit=limit)
    return [PipelineOutage.model_validate(row) for row in rows]
