"""Routes of a care team's quiet hours: set, read, remove (management endpoints). The change and
its audit entry are ``service_layer/team_settings.py``'s."""

from datetime import datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.notify.entrypoints.http.deps import MANAGED, Repository, Service
from services.notify.service_layer import team_settings

router = APIRouter()


class QuietHoursIn(BaseModel):
    """A care team's quiet hours: LOW and INFO alerts arriving between ``start`` and ``end``
    (local wall-clock time in ``timezone``; crosses midnight when start > end) are held and
    paged as one digest when they end. HIGH and MEDIUM are never held."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str = Field(description="IANA time zone, e.g. Europe/Berlin.")
    start: time = Field(description="Local wall-clock time quiet hours begin, e.g. 22:00.")
    end: time = Field(description="Local wall-clock time they end, e.g. 07:00.")
    changed_by: str = Field(min_length=1, description="Who sets them, e.g. person:lead-nurse.")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {name!r}") from exc
        return name

    @model_validator(mode="after")
    def _window(self) -> "QuietHoursIn":
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("start and end are local times in timezone, without an offset")
        if self.start == self.end:
            raise ValueError("quiet hours start and end at different times")
        return self


class QuietHoursOut(BaseModel):
    care_team_id: str
    timezone: str
    start: time
    end: time
    updated_at: datetime
    updated_by: str


@router.put("/care-teams/{care_team_id}/quiet-hours", dependencies=MANAGED, status_code=204)
async def put_quiet_hours(
    care_team_id: str, body: QuietHoursIn, service: Service, repository: Repository
) -> None:
    # The service's clock, so the change is measured on the same clock as the digests.
    if not await team_settings.set_quiet_hours(
        repository,
        care_team_id,
        timezone=body.timezone,
        start=body.start,
        end=body.end,
        by=body.changed_by,
        clock=service.now,
    ):
        raise HTTPException(status_code=404, detail="no such care team")


@router.get("/care-teams/{care_team_id}/quiet-hours", dependencies=MANAGED)
async def get_quiet_hours(care_team_id: str, repository: Repository) -> QuietHoursOut:
    quiet = await repository.quiet_hours(care_team_id)
    if quiet is None:
        raise HTTPException(status_code=404, detail="no quiet hours: every alert pages now")
    return QuietHoursOut(
        care_team_id=care_team_id,
        timezone=quiet.timezone,
        start=quiet.start,
        end=quiet.end,
        updated_at=quiet.updated_at,
        updated_by=quiet.updated_by,
    )


@router.delete("/care-teams/{care_team_id}/quiet-hours", dependencies=MANAGED, status_code=204)
async def delete_quiet_hours(
    care_team_id: str, by: str, service: Service, repository: Repository
) -> None:
    if not by.strip():
        raise HTTPException(status_code=422, detail="by names who removes them")
    if not await team_settings.remove_quiet_hours(
        repository, care_team_id, by=by, clock=service.now
    ):
        raise HTTPException(status_code=404, detail="no quiet hours")
