"""The roster of the caller's care teams: every patient on one list, most urgent first."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from services.api.domain.access import Action, Principal
from services.api.domain.roster import RosterRow, roster
from services.api.entrypoints.http.deps import Clock, require_patient
from services.api.entrypoints.http.responses import AUTHENTICATED

router = APIRouter(prefix="/api", tags=["patients"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require_patient(Action.READ_PATIENT))]


class RosterAlert(BaseModel):
    dedup_key: str
    title: str
    priority: str
    opened_at: datetime = Field(description="Device time of the episode's first alert.")
    acknowledged_by: str | None


class RosterEntry(BaseModel):
    patient_id: str
    care_team_id: str
    care_team_name: str
    care_team_centre: str | None = Field(
        default=None, description="The team's centre (organisation); null when it has none."
    )
    timezone: str = Field(description="The care team's zone; the texts show times in it.")
    infusion_day: int | None = Field(
        description="Day of the current cycle (day 1: the first 24 h from its start); null "
        "without a recorded cycle start."
    )
    infusion_day_text: str
    temperature: str = Field(description="Newest reading, its site and its age.")
    pump: str = Field(description="Newest pump state and its age, as the pump reported it.")
    pump_last_running_at: datetime | None = Field(
        default=None,
        description="For a pump not running now: when it last reported running (in `pump`).",
    )
    bag_empty_at: datetime | None = Field(
        description="Predicted from the newest report of a running pump, on the pump's clock."
    )
    bag: str
    devices: list[str] = Field(description="Each device bound now and when it was last heard.")
    open_alerts: list[RosterAlert]
    alerts: str


class Roster(BaseModel):
    generated_at: datetime
    sort: str
    patients: list[RosterEntry]


def entry(row: RosterRow) -> RosterEntry:
    return RosterEntry(
        patient_id=row.patient_id,
        care_team_id=row.care_team_id,
        care_team_name=row.care_team_name,
        care_team_centre=row.care_team_centre,
        timezone=row.timezone,
        infusion_day=row.infusion_day,
        infusion_day_text=row.infusion_day_text,
        temperature=row.temperature_text,
        pump=row.pump_text,
        pump_last_running_at=row.pump_last_running_at,
        bag_empty_at=row.bag_empty_at,
        bag=row.bag_text,
        devices=list(row.devices_text),
        open_alerts=[
            RosterAlert(
                dedup_key=a.dedup_key,
                title=a.title,
                priority=a.priority,
                opened_at=a.opened_at,
                acknowledged_by=a.acknowledged_by,
            )
            for a in row.alerts
        ],
        alerts=row.alerts_text,
    )


@router.get("/roster", response_model=Roster)
async def patient_roster(
    request: Request,
    principal: Reader,
    clock: Clock,
    sort: Annotated[Literal["urgency", "patient", "day", "bag"], Query()] = "urgency",
) -> Roster:
    """Every patient of the caller's care teams: infusion day, newest temperature and its age,
    pump state, bag remaining and predicted empty, devices and when each was last heard from,
    open alerts. ``urgency``: unacknowledged alerts by priority, then acknowledged ones, then a
    pump not running, then the rest."""
    now = clock()
    rows = roster(await request.app.state.roster.facts(principal.care_teams, now), now, sort)
    await request.app.state.audit.record(principal.user_id, "patients.roster", "roster", {})
    return Roster(generated_at=now, sort=sort, patients=[entry(r) for r in rows])
