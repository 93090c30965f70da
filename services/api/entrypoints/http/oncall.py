"""A care team's registry for paging: the team itself, its people and their contact methods,
on-call schedules and their overrides, and who is on call now and next.

Reading needs ``read_patient`` (every role of the team); changes need ``manage_team`` (charge
nurse, admin) and are audited. A team that is not one of the caller's, and a person or schedule
of another team, answer 404. The rows are notify's, read and written through
``services.notify.public.TeamRegistry``; a rotation, an override and who is on call go through
``services.api.service_layer.schedules``, as ``vigil admin schedules`` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from datetime import date, datetime, time
from typing import Annotated, Any, Literal
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from schemas.notify import CareTeamIn, PersonIn
from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import Clock, require
from services.api.entrypoints.http.responses import AUTHENTICATED, invalid, not_found
from services.api.service_layer.enrolment import Actor, Invalid, NotFound
from services.api.service_layer.schedules import Rotation, ScheduleService

router = APIRouter(prefix="/api/care-teams", tags=["on-call"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]
Manager = Annotated[Principal, Depends(require(Action.MANAGE_TEAM))]

RegistryId = Annotated[str, Field(min_length=1, max_length=100, description="A person's id.")]

TEAM_404 = not_found("care team")
PERSON_404 = not_found("care team or person")
SCHEDULE_404 = not_found("care team or schedule")


def zone_name(name: str) -> str:
    """An IANA time zone name, or a ValueError naming it."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None
    return name


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CareTeamBody(_Body):
    name: str = Field(min_length=1, max_length=200)
    oncall_email: str = Field(
        min_length=3, max_length=320, description="Paged when nobody else can be."
    )
    timezone: str = Field(default="UTC", description="IANA time zone, e.g. Europe/Berlin.")

    _zone = field_validator("timezone")(zone_name)


class CareTeamView(BaseModel):
    care_team_id: str
    name: str
    oncall_email: str
    timezone: str


class ContactMethod(_Body):
    channel: Literal["email", "sms", "webhook"]
    address: str = Field(
        min_length=1,
        max_length=320,
        description="E-mail address, E.164 phone number, or PagerDuty routing key (webhook).",
    )


class PersonBody(_Body):
    name: str = Field(min_length=1, max_length=200)
    contact_methods: list[ContactMethod] = Field(
        max_length=20, description="Tried in this order; the next one is used when one fails."
    )


class ContactMethodView(BaseModel):
    channel: str
    address: str


class PersonView(BaseModel):
    person_id: str
    name: str
    care_team_id: str
    contact_methods: list[ContactMethodView]


class ScheduleBody(_Body):
    name: str = Field(min_length=1, max_length=200)
    timezone: str = Field(description="IANA time zone of the hand-off time.")
    start_date: date = Field(description="The first participant's first shift starts this day.")
    handoff_time: time = Field(description="Local wall-clock time of the hand-off, e.g. 08:00.")
    shift_days: int = Field(default=1, ge=1, le=366)
    participants: list[RegistryId] = Field(
        min_length=1, max_length=100, description="Person ids of the team, in turn order."
    )

    _zone = field_validator("timezone")(zone_name)

    @field_validator("handoff_time")
    @classmethod
    def _local(cls, value: time) -> time:
        if value.tzinfo is not None:
            raise ValueError("handoff_time is a local time in timezone, without an offset")
        return value


class OverrideView(BaseModel):
    override_id: UUID
    person_id: str
    starts_at: datetime
    ends_at: datetime


class ScheduleView(BaseModel):
    schedule_id: str
    care_team_id: str
    name: str
    timezone: str
    start_date: date
    handoff_time: time
    shift_days: int
    participants: list[str]
    overrides: list[OverrideView] = Field(description="Overrides that have not ended yet.")


class OverrideBody(_Body):
    person_id: RegistryId
    starts_at: AwareDatetime
    ends_at: AwareDatetime


class OverrideCreated(BaseModel):
    override_id: UUID


class ShiftView(BaseModel):
    schedule_id: str
    name: str
    person_id: str | None = Field(description="On call now (None: nobody on this schedule).")
    person_name: str | None
    until: datetime | None = Field(
        description="When they hand over, in the team's time zone (None: nobody else ever "
        "takes over)."
    )
    until_local: str | None = Field(description="The same, e.g. 15 Jan 08:00 (Europe/Berlin).")
    next_person_id: str | None = Field(description="Who is on call from then.")
    next_person_name: str | None


class OnCallView(BaseModel):
    care_team_id: str
    timezone: str = Field(description="The team's IANA time zone, in which times are given.")
    at: datetime
    at_local: str
    schedules: list[ShiftView] = Field(
        description="Each schedule of the team (none: the escalation policy or the team's "
        "on-call address is paged)."
    )


def registry(request: Request) -> Any:
    return request.app.state.team_registry


async def team_or_404(request: Request, principal: Principal, care_team_id: str) -> dict[str, Any]:
    """The caller's care team as notify has it; 404 for another team's or none."""
    team = None
    if principal.sees_team(care_team_id):
        team = await registry(request).care_team(care_team_id)
    if team is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    return dict(team)


async def audit(
    request: Request, principal: Principal, action: str, care_team_id: str, details: dict[str, Any]
) -> None:
    await request.app.state.audit.record(
        principal.user_id, action, f"care_team:{care_team_id}", details
    )


@router.get("/{care_team_id}", response_model=CareTeamView, responses=TEAM_404)
async def get_care_team(request: Request, care_team_id: str, principal: Reader) -> CareTeamView:
    return CareTeamView(**await team_or_404(request, principal, care_team_id))


@router.put(
    "/{care_team_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=TEAM_404,
)
async def put_care_team(
    request: Request, care_team_id: str, body: CareTeamBody, principal: Manager
) -> Response:
    """Set the team's name, fallback address and time zone. A team of the caller's that is not
    registered yet is created."""
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    before = await registry(request).care_team(care_team_id)
    team = CareTeamIn(care_team_id=care_team_id, **body.model_dump())
    await registry(request).put_care_team(team)
    await audit(
        request,
        principal,
        "care_team.changed",
        care_team_id,
        {"before": before, "after": body.model_dump()},
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{care_team_id}/people", response_model=list[PersonView], responses=TEAM_404)
async def list_people(request: Request, care_team_id: str, principal: Reader) -> list[PersonView]:
    await team_or_404(request, principal, care_team_id)
    return [PersonView(**p) for p in await registry(request).people(care_team_id)]


async def person_of_team(request: Request, care_team_id: str, person_id: str) -> Any:
    person = await registry(request).person(person_id)
    if person is None or person["care_team_id"] != care_team_id:
        return None
    return person


@router.get("/{care_team_id}/people/{person_id}", response_model=PersonView, responses=PERSON_404)
async def get_person(
    request: Request, care_team_id: str, person_id: str, principal: Reader
) -> PersonView:
    await team_or_404(request, principal, care_team_id)
    person = await person_of_team(request, care_team_id, person_id)
    if person is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such person")
    return PersonView(**person)


@router.put(
    "/{care_team_id}/people/{person_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=PERSON_404,
)
async def put_person(
    request: Request,
    care_team_id: str,
    person_id: Annotated[str, Path(max_length=100)],
    body: PersonBody,
    principal: Manager,
) -> Response:
    """Create or change one of the team's people and their contact methods (replaced
    together). A person of another team answers 404."""
    await team_or_404(request, principal, care_team_id)
    existing = await registry(request).person(person_id)
    if existing is not None and existing["care_team_id"] != care_team_id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such person")
    person = PersonIn(
        person_id=person_id,
        name=body.name,
        care_team_id=care_team_id,
        contact_methods=tuple(m.model_dump() for m in body.contact_methods),
    )
    await registry(request).put_person(person)
    await audit(
        request,
        principal,
        "care_team.person_changed",
        care_team_id,
        {
            "person_id": person_id,
            "created": existing is None,
            "channels": len(person.contact_methods),
        },
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{care_team_id}/schedules", response_model=list[ScheduleView], responses=TEAM_404)
async def list_schedules(
    request: Request, care_team_id: str, principal: Reader, clock: Clock
) -> list[ScheduleView]:
    await team_or_404(request, principal, care_team_id)
    views = []
    for schedule_id in await registry(request).schedule_ids(care_team_id):
        schedule = await registry(request).schedule(schedule_id, since=clock())
        if schedule is not None:
            views.append(ScheduleView(**schedule))
    return views


async def schedule_of_team(
    request: Request, care_team_id: str, schedule_id: str, clock: Clock
) -> dict[str, Any] | None:
    schedule = await registry(request).schedule(schedule_id, since=clock())
    if schedule is None or schedule["care_team_id"] != care_team_id:
        return None
    return dict(schedule)


@router.get(
    "/{care_team_id}/schedules/{schedule_id}",
    response_model=ScheduleView,
    responses=SCHEDULE_404,
)
async def get_schedule(
    request: Request, care_team_id: str, schedule_id: str, principal: Reader, clock: Clock
) -> ScheduleView:
    await team_or_404(request, principal, care_team_id)
    schedule = await schedule_of_team(request, care_team_id, schedule_id, clock)
    if schedule is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such schedule")
    return ScheduleView(**schedule)


@router.put(
    "/{care_team_id}/schedules/{schedule_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=SCHEDULE_404,
)
async def put_schedule(
    request: Request,
    care_team_id: str,
    schedule_id: Annotated[str, Path(max_length=100)],
    body: ScheduleBody,
    principal: Manager,
    clock: Clock,
) -> Response:
    """Create or change one of the team's rotations; its overrides stay. Participants must be
    people of the team (422 otherwise); a schedule of another team answers 404."""
    await team_or_404(request, principal, care_team_id)
    rotation = Rotation(
        name=body.name,
        timezone=body.timezone,
        start_date=body.start_date,
        handoff_time=body.handoff_time,
        shift_days=body.shift_days,
        participants=tuple(body.participants),
    )
    async with _refusals():
        await schedules(request, clock).set_rotation(
            _actor(principal), care_team_id, schedule_id, rotation
        )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{care_team_id}/schedules/{schedule_id}/overrides",
    status_code=status.HTTP_201_CREATED,
    response_model=OverrideCreated,
    responses=SCHEDULE_404,
)
async def post_override(
    request: Request,
    care_team_id: str,
    schedule_id: str,
    body: OverrideBody,
    principal: Manager,
    clock: Clock,
) -> OverrideCreated:
    """One of the team's people covers the schedule from ``starts_at`` to ``ends_at``; the
    latest override wins where two overlap."""
    await team_or_404(request, principal, care_team_id)
    async with _refusals():
        override_id = await schedules(request, clock).add_override(
            _actor(principal),
            care_team_id,
            schedule_id,
            body.person_id,
            body.starts_at,
            body.ends_at,
        )
    return OverrideCreated(override_id=override_id)


@router.get("/{care_team_id}/on-call", response_model=OnCallView, responses=TEAM_404)
async def on_call(
    request: Request,
    care_team_id: str,
    principal: Reader,
    clock: Clock,
    at: AwareDatetime | None = None,
) -> OnCallView:
    """Who is on call now (or at ``at``) on each of the team's schedules, until when, and who
    is next; times in the team's time zone, the zone named."""
    await team_or_404(request, principal, care_team_id)
    found = await schedules(request, clock).on_call(_actor(principal), care_team_id, at)
    return OnCallView(
        care_team_id=found.care_team_id,
        timezone=found.timezone,
        at=found.at,
        at_local=found.at_local,
        schedules=[ShiftView(**asdict(entry)) for entry in found.schedules],
    )


def schedules(request: Request, clock: Callable[[], datetime]) -> ScheduleService:
    """The schedules' use cases (shared with ``vigil admin schedules``) over notify's registry,
    audited as this API audits."""
    return ScheduleService(registry(request), request.app.state.audit, clock)


def _actor(principal: Principal) -> Actor:
    return Actor(principal.user_id, principal.care_teams)


@asynccontextmanager
async def _refusals() -> AsyncIterator[None]:
    """The use case's refusals as this API answers them: a schedule of another team (or none)
    404, a check of the body 422 naming the field."""
    try:
        yield
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such schedule") from None
    except Invalid as error:
        raise invalid(error.field, str(error), where="body") from None
