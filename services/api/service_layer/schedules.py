"""A care team's on-call schedules: who is on call now and next, a schedule's rotation set, an
override added. Behind ``vigil admin schedules`` and the care-team API's routes
``PUT /api/care-teams/{id}/schedules/{schedule_id}``, ``POST .../overrides`` and
``GET /api/care-teams/{id}/on-call`` (``entrypoints/http/oncall.py``).

The rows are notify's, read and written through ``services.notify.public.TeamRegistry`` (the
``Registry`` port). A team the actor may not act for answers ``NotFound``, as does a schedule of
another team; a rotation's participants and an override's person must be people of the team
(``Invalid``, ``domain.oncall.unknown_refs``). Changes are audited with the actor, subject
``care_team:<id>``: ``care_team.schedule_changed`` (the definition before and after) and
``care_team.override_added``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import date, datetime, time
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from schemas.notify import OverrideIn, ScheduleIn
from services.api.domain.clocks import local_time
from services.api.domain.oncall import Shift, shift, team_zone, unknown_refs
from services.api.service_layer.enrolment import Actor, AuditPort, Invalid, NotFound


class Registry(Protocol):
    """What this module uses of ``services.notify.public.TeamRegistry``."""

    async def care_team(self, care_team_id: str) -> dict[str, Any] | None: ...
    async def people(self, care_team_id: str) -> list[dict[str, Any]]: ...
    async def schedule_ids(self, care_team_id: str) -> list[str]: ...
    async def schedule(self, schedule_id: str, *, since: datetime) -> dict[str, Any] | None: ...
    async def put_schedule(self, schedule: ScheduleIn) -> None: ...
    async def add_override(self, schedule_id: str, override: OverrideIn) -> uuid.UUID: ...
    async def on_call(self, schedule_id: str, at: datetime) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class OnCall:
    """Who is on call at ``at`` on each of the team's schedules, times in ``timezone``."""

    care_team_id: str
    timezone: str
    at: datetime
    at_local: str
    schedules: tuple[Shift, ...]


@dataclass(frozen=True, slots=True)
class Rotation:
    """A rotation to set; a field left None keeps the schedule's current value (a new schedule
    needs ``participants``, ``start_date`` and ``handoff_time``; its name defaults to its id,
    its zone to the team's, its shifts to one day)."""

    name: str | None = None
    timezone: str | None = None
    start_date: date | None = None
    handoff_time: time | None = None
    shift_days: int | None = None
    participants: tuple[str, ...] | None = None


class ScheduleService:
    def __init__(self, registry: Registry, audit: AuditPort, clock: Callable[[], datetime]) -> None:
        self._registry = registry
        self._audit = audit
        self._clock = clock

    async def on_call(self, actor: Actor, care_team_id: str, at: datetime | None = None) -> OnCall:
        team = await self._team(actor, care_team_id)
        zone = team_zone(team.get("timezone"))
        when = at or self._clock()
        registry = self._registry
        names = {p["person_id"]: p["name"] for p in await registry.people(care_team_id)}
        shifts = []
        for schedule_id in await registry.schedule_ids(care_team_id):
            schedule = await registry.schedule(schedule_id, since=when)
            now = await registry.on_call(schedule_id, when)
            if schedule is None or now is None:
                continue  # removed meanwhile
            shifts.append(
                shift(
                    schedule_id,
                    schedule["name"],
                    now["person_id"],
                    now["next_at"],
                    now["next_person_id"],
                    zone,
                    names,
                )
            )
        return OnCall(
            care_team_id,
            zone,
            when.astimezone(ZoneInfo(zone)),
            local_time(when, zone),
            tuple(shifts),
        )

    async def schedules(self, actor: Actor, care_team_id: str) -> list[dict[str, Any]]:
        """The team's schedules as defined, each with its overrides not yet over."""
        await self._team(actor, care_team_id)
        found = []
        for schedule_id in await self._registry.schedule_ids(care_team_id):
            schedule = await self._registry.schedule(schedule_id, since=self._clock())
            if schedule is not None:
                found.append(schedule)
        return found

    async def set_rotation(
        self, actor: Actor, care_team_id: str, schedule_id: str, rotation: Rotation
    ) -> dict[str, Any]:
        """Create or change one of the team's rotations (its overrides stay); the schedule as
        it now stands."""
        team = await self._team(actor, care_team_id)
        existing = await self._registry.schedule(schedule_id, since=self._clock())
        if existing is not None and existing["care_team_id"] != care_team_id:
            raise NotFound(f"no such schedule: {schedule_id}")
        base: dict[str, Any] = existing or {
            "name": schedule_id,
            "timezone": team_zone(team.get("timezone")),
            "shift_days": 1,
        }
        changed = {k: v for k, v in vars_of(rotation).items() if v is not None}
        merged = {**base, **changed}
        for needed in ("participants", "start_date", "handoff_time"):
            if merged.get(needed) is None:
                raise Invalid(f"a new schedule needs {needed.replace('_', ' ')}", needed)
        zone = str(merged["timezone"])
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise Invalid(f"unknown time zone {zone!r}", "timezone") from None
        if merged["handoff_time"].tzinfo is not None:
            raise Invalid("the hand-off time is a local time, without an offset", "handoff_time")
        if not 1 <= int(merged["shift_days"]) <= 366:
            raise Invalid("a shift lasts 1 to 366 days", "shift_days")
        people = await self._people(care_team_id)
        unknown = unknown_refs((("person", p) for p in merged["participants"]), people, ())
        if unknown:
            raise Invalid("not people of the team: " + ", ".join(unknown), "participants")
        try:
            schedule = ScheduleIn(
                schedule_id=schedule_id,
                care_team_id=care_team_id,
                name=str(merged["name"]),
                timezone=zone,
                start_date=merged["start_date"],
                handoff_time=merged["handoff_time"],
                shift_days=int(merged["shift_days"]),
                participants=tuple(merged["participants"]),
            )
        except ValidationError as error:
            raise Invalid(_first_error(error), "schedule") from None
        await self._registry.put_schedule(schedule)
        await self._audit.record(
            actor.audit_id,
            "care_team.schedule_changed",
            f"care_team:{care_team_id}",
            {
                "schedule_id": schedule_id,
                "before": None if existing is None else definition(existing),
                "after": definition(schedule.model_dump()),
            },
        )
        now = await self._registry.schedule(schedule_id, since=self._clock())
        assert now is not None
        return now

    async def add_override(
        self,
        actor: Actor,
        care_team_id: str,
        schedule_id: str,
        person_id: str,
        starts_at: datetime,
        ends_at: datetime,
    ) -> uuid.UUID:
        """One of the team's people covers the schedule from ``starts_at`` to ``ends_at`` (the
        latest override wins where two overlap)."""
        await self._team(actor, care_team_id)
        schedule = await self._registry.schedule(schedule_id, since=self._clock())
        if schedule is None or schedule["care_team_id"] != care_team_id:
            raise NotFound(f"no such schedule: {schedule_id}")
        if starts_at.utcoffset() is None or ends_at.utcoffset() is None:
            raise Invalid("an override's times need a UTC offset", "starts_at")
        if ends_at <= starts_at:
            raise Invalid("an override ends after it starts", "ends_at")
        if unknown_refs([("person", person_id)], await self._people(care_team_id), ()):
            raise Invalid("not a person of the team", "person_id")
        override_id = await self._registry.add_override(
            schedule_id, OverrideIn(person_id=person_id, starts_at=starts_at, ends_at=ends_at)
        )
        await self._audit.record(
            actor.audit_id,
            "care_team.override_added",
            f"care_team:{care_team_id}",
            {
                "schedule_id": schedule_id,
                "override_id": str(override_id),
                "person_id": person_id,
                "starts_at": starts_at.isoformat(),
                "ends_at": ends_at.isoformat(),
            },
        )
        return override_id

    async def _team(self, actor: Actor, care_team_id: str) -> dict[str, Any]:
        team = await self._registry.care_team(care_team_id) if actor.sees(care_team_id) else None
        if team is None:
            raise NotFound(f"no such care team: {care_team_id}")
        return dict(team)

    async def _people(self, care_team_id: str) -> set[str]:
        return {p["person_id"] for p in await self._registry.people(care_team_id)}


def vars_of(rotation: Rotation) -> dict[str, Any]:
    return {f.name: getattr(rotation, f.name) for f in fields(rotation)}


def definition(schedule: dict[str, Any]) -> dict[str, Any]:
    """A schedule's definition as audited (JSON values)."""
    return {
        "name": schedule["name"],
        "timezone": schedule["timezone"],
        "start_date": schedule["start_date"].isoformat(),
        "handoff_time": schedule["handoff_time"].isoformat(),
        "shift_days": schedule["shift_days"],
        "participants": list(schedule["participants"]),
    }


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))
