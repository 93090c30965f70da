"""A care team's schedules through ``services.api.service_layer.schedules`` over an in-memory
registry (what ``services.notify.public.TeamRegistry`` answers): a rotation created with the
team's zone by default and changed field by field; the refusals (another team's person or
schedule, a new schedule without its rotation, an override that ends before it starts); the
audit entries; who is on call, named, in the team's zone."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from typing import Any

import pytest

from schemas.notify import OverrideIn, ScheduleIn
from services.api.service_layer.enrolment import Actor, Invalid, NotFound
from services.api.service_layer.schedules import Rotation, ScheduleService
from services.notify.domain.schedule import Override, next_change, on_call_at
from services.notify.domain.schedule import Rotation as Rotating

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
OPERATOR = Actor("operator:ops", None)


class MemoryRegistry:
    def __init__(self) -> None:
        self.teams = {"onc": {"care_team_id": "onc", "timezone": "Europe/Paris"}, "haem": {}}
        self.staff = {"onc": {"ana": "Ana", "ben": "Ben", "cleo": "Cleo"}, "haem": {"xav": "X"}}
        self.schedules: dict[str, dict[str, Any]] = {}

    async def care_team(self, care_team_id: str) -> dict[str, Any] | None:
        return self.teams.get(care_team_id)

    async def people(self, care_team_id: str) -> list[dict[str, Any]]:
        found = self.staff.get(care_team_id, {})
        return [{"person_id": p, "name": n} for p, n in found.items()]

    async def schedule_ids(self, care_team_id: str) -> list[str]:
        return sorted(k for k, s in self.schedules.items() if s["care_team_id"] == care_team_id)

    async def schedule(self, schedule_id: str, *, since: datetime) -> dict[str, Any] | None:
        found = self.schedules.get(schedule_id)
        if found is None:
            return None
        return {**found, "overrides": [o for o in found["overrides"] if o["ends_at"] > since]}

    async def put_schedule(self, schedule: ScheduleIn) -> None:
        kept = self.schedules.get(schedule.schedule_id, {}).get("overrides", [])
        self.schedules[schedule.schedule_id] = {
            **schedule.model_dump(),
            "participants": list(schedule.participants),
            "overrides": kept,
        }

    async def add_override(self, schedule_id: str, override: OverrideIn) -> uuid.UUID:
        override_id = uuid.uuid4()
        self.schedules[schedule_id]["overrides"].append(
            {"override_id": override_id, **override.model_dump()}
        )
        return override_id

    async def on_call(self, schedule_id: str, at: datetime) -> dict[str, Any] | None:
        s = self.schedules.get(schedule_id)
        if s is None:
            return None
        rotation = Rotating(
            schedule_id,
            s["timezone"],
            s["start_date"],
            s["handoff_time"],
            s["shift_days"],
            tuple(s["participants"]),
            tuple(Override(o["person_id"], o["starts_at"], o["ends_at"]) for o in s["overrides"]),
        )
        change = next_change(rotation, at)
        return {
            "person_id": on_call_at(rotation, at),
            "next_at": None if change is None else change[0],
            "next_person_id": None if change is None else change[1],
        }


class MemoryAudit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, dict[str, Any]]] = []

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        self.entries.append((actor, action, subject, details))


def world() -> tuple[ScheduleService, MemoryRegistry, MemoryAudit]:
    registry, audit = MemoryRegistry(), MemoryAudit()
    return ScheduleService(registry, audit, lambda: T0), registry, audit


WEEKLY = Rotation(
    participants=("ana", "ben"),
    start_date=date(2026, 3, 2),
    handoff_time=time(20, 0),
    shift_days=7,
)


async def test_a_rotation_set_then_changed_field_by_field_and_who_is_on_call() -> None:
    service, _, audit = world()
    created = await service.set_rotation(OPERATOR, "onc", "nights", WEEKLY)
    assert (created["name"], created["timezone"]) == ("nights", "Europe/Paris")

    # 10 March 13:00 Paris is in the second week: Ben, until 16 March 20:00, then Ana.
    now = await service.on_call(OPERATOR, "onc")
    (shift,) = now.schedules
    assert (shift.person_name, shift.next_person_name) == ("Ben", "Ana")
    assert shift.until_local == "16 Mar 20:00 (Europe/Paris)"
    assert now.at_local == "10 Mar 13:00 (Europe/Paris)"

    changed = await service.set_rotation(
        OPERATOR, "onc", "nights", Rotation(participants=("cleo", "ana"))
    )
    assert (changed["shift_days"], changed["handoff_time"]) == (7, time(20, 0))
    assert (await service.on_call(OPERATOR, "onc")).schedules[0].person_id == "ana"

    await service.add_override(
        OPERATOR,
        "onc",
        "nights",
        "ben",
        datetime(2026, 3, 10, 11, 0, tzinfo=UTC),
        datetime(2026, 3, 10, 14, 0, tzinfo=UTC),
    )
    assert (await service.on_call(OPERATOR, "onc")).schedules[0].person_id == "ben"
    assert [(a, action, subject) for a, action, subject, _ in audit.entries] == [
        ("operator:ops", "care_team.schedule_changed", "care_team:onc"),
        ("operator:ops", "care_team.schedule_changed", "care_team:onc"),
        ("operator:ops", "care_team.override_added", "care_team:onc"),
    ]
    assert audit.entries[0][3]["before"] is None
    assert audit.entries[1][3]["before"]["participants"] == ["ana", "ben"]
    assert audit.entries[1][3]["after"]["participants"] == ["cleo", "ana"]


async def test_refusals_change_nothing() -> None:
    service, registry, audit = world()
    with pytest.raises(Invalid, match="start date"):
        await service.set_rotation(OPERATOR, "onc", "days", Rotation(participants=("ana",)))
    with pytest.raises(Invalid, match="person:xav"):
        await service.set_rotation(
            OPERATOR,
            "onc",
            "nights",
            Rotation(participants=("xav",), start_date=date(2026, 3, 2), handoff_time=time(8)),
        )
    with pytest.raises(Invalid, match="time zone"):
        await service.set_rotation(
            OPERATOR,
            "onc",
            "nights",
            Rotation(
                participants=("ana",),
                start_date=date(2026, 3, 2),
                handoff_time=time(8),
                timezone="Mars/Olympus",
            ),
        )
    await service.set_rotation(OPERATOR, "onc", "nights", WEEKLY)
    with pytest.raises(NotFound):
        await service.set_rotation(OPERATOR, "haem", "nights", WEEKLY)
    with pytest.raises(NotFound):
        await service.on_call(Actor("u-1", frozenset({"haem"})), "onc")
    with pytest.raises(Invalid, match="ends after"):
        await service.add_override(OPERATOR, "onc", "nights", "ana", T0, T0)
    with pytest.raises(Invalid, match="not a person"):
        await service.add_override(OPERATOR, "onc", "nights", "xav", T0, T0.replace(hour=14))
    assert registry.schedules["nights"]["overrides"] == []
    assert len(audit.entries) == 1
