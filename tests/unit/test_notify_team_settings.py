"""A care team's audited settings (``service_layer/team_settings.py``) over an in-memory
repository: quiet hours and the early-cycle override written together with their audit entry
(who, before and after, on the given clock), nothing written or audited for an unknown team,
pending quiet-hours digests moved. The same use cases against PostgreSQL, reached through
``public.TeamRegistry``: tests/integration/test_notify_escalation.py and
test_notify_early_cycle_pg.py; the care-team API's routes for them: tests/api/test_api_oncall.py.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any
from uuid import UUID

import pytest

from schemas.notify import (
    CareTeamIn,
    EarlyCycleEscalationIn,
    EscalationPolicyIn,
    OverrideIn,
    PersonIn,
    ScheduleIn,
)
from services.notify.domain.schedule import Rotation
from services.notify.service_layer import team_settings
from services.notify.service_layer.api_ports import EarlyCycleRecord, QuietHoursRecord
from vigil.audit.actions import AuditAction

# 2025-01-15 12:00 UTC: 13:00 in Berlin, outside 22:00-07:00 quiet hours.
NOW = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)
BERLIN = "Europe/Berlin"


@dataclass
class Tables:
    """What the fake repository holds; copied whole to roll a failed transaction back."""

    care_teams: dict[str, CareTeamIn] = field(default_factory=dict)
    people: dict[str, PersonIn] = field(default_factory=dict)
    schedules: dict[str, ScheduleIn] = field(default_factory=dict)
    overrides: list[tuple[UUID, str, OverrideIn]] = field(default_factory=list)
    policies: dict[str, EscalationPolicyIn] = field(default_factory=dict)
    quiet_hours: dict[str, QuietHoursRecord] = field(default_factory=dict)
    early_cycle: dict[str, EarlyCycleRecord] = field(default_factory=dict)
    # care team -> due_at of its pending quiet-hours digest
    digests: dict[str, datetime] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)


class FakeSettingsChanges:
    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    async def care_team_exists(self, care_team_id: str) -> bool:
        return care_team_id in self.tables.care_teams

    async def quiet_hours_for_update(self, care_team_id: str) -> dict[str, str] | None:
        quiet = self.tables.quiet_hours.get(care_team_id)
        if quiet is None:
            return None
        return {
            "timezone": quiet.timezone,
            "start": quiet.start.isoformat(),
            "end": quiet.end.isoformat(),
        }

    async def save_quiet_hours(
        self, care_team_id: str, *, timezone: str, start: time, end: time, at: datetime, by: str
    ) -> None:
        self.tables.quiet_hours[care_team_id] = QuietHoursRecord(timezone, start, end, at, by)

    async def delete_quiet_hours(self, care_team_id: str) -> None:
        del self.tables.quiet_hours[care_team_id]

    async def bring_digests_forward(self, care_team_id: str, due_at: datetime) -> None:
        if care_team_id in self.tables.digests:
            self.tables.digests[care_team_id] = min(self.tables.digests[care_team_id], due_at)

    async def early_cycle_for_update(self, care_team_id: str) -> dict[str, Any] | None:
        record = self.tables.early_cycle.get(care_team_id)
        if record is None:
            return None
        return {"ack_wait_s": record.ack_wait_s, "extra_targets": list(record.extra_targets)}

    async def save_early_cycle(
        self, care_team_id: str, setting: dict[str, Any], *, at: datetime, by: str
    ) -> None:
        self.tables.early_cycle[care_team_id] = EarlyCycleRecord(
            setting["ack_wait_s"], tuple(setting["extra_targets"]), at, by
        )

    async def delete_early_cycle(self, care_team_id: str) -> None:
        del self.tables.early_cycle[care_team_id]

    async def audit(
        self, actor: str, action: str, subject: str, details: dict[str, Any], *, at: datetime
    ) -> None:
        self.tables.audit.append(
            {"actor": actor, "action": action, "subject": subject, "details": details, "at": at}
        )


class FakeRepository:
    """``ApiRepository`` in memory."""

    def __init__(self) -> None:
        self.tables = Tables()
        self.rotations: dict[str, Rotation] = {}

    @asynccontextmanager
    async def settings_changes(self) -> AsyncIterator[FakeSettingsChanges]:
        working = copy.deepcopy(self.tables)
        yield FakeSettingsChanges(working)
        self.tables = working  # committed only when the block did not raise

    async def put_care_team(self, team: CareTeamIn) -> None:
        self.tables.care_teams[team.care_team_id] = team

    async def put_person(self, person: PersonIn) -> None:
        self.tables.people[person.person_id] = person

    async def person(self, person_id: str) -> dict[str, Any] | None:
        person = self.tables.people.get(person_id)
        if person is None:
            return None
        return {
            "person_id": person.person_id,
            "name": person.name,
            "care_team_id": person.care_team_id,
            "contact_methods": [
                {"channel": m.channel, "address": m.address} for m in person.contact_methods
            ],
        }

    async def put_schedule(self, schedule: ScheduleIn) -> None:
        self.tables.schedules[schedule.schedule_id] = schedule

    async def add_override(self, override_id: UUID, schedule_id: str, override: OverrideIn) -> None:
        self.tables.overrides.append((override_id, schedule_id, override))

    async def rotation(self, schedule_id: str) -> Rotation | None:
        return self.rotations.get(schedule_id)

    async def put_policy(self, care_team_id: str, policy: EscalationPolicyIn) -> None:
        self.tables.policies[care_team_id] = policy

    async def quiet_hours(self, care_team_id: str) -> QuietHoursRecord | None:
        return self.tables.quiet_hours.get(care_team_id)

    async def early_cycle(self, care_team_id: str) -> EarlyCycleRecord | None:
        return self.tables.early_cycle.get(care_team_id)


class Clock:
    """The escalation service's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def repository() -> FakeRepository:
    repository = FakeRepository()
    for team in ("CT-1", "CT-2"):
        repository.tables.care_teams[team] = CareTeamIn(
            care_team_id=team, name="Ward 4", oncall_email="a@x.org", timezone=BERLIN
        )
    return repository


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _quiet(
    repository: FakeRepository,
    clock: Clock,
    team: str = "CT-1",
    *,
    start: time = time(22, 0),
    by: str = "person:lead",
) -> bool:
    return await team_settings.set_quiet_hours(
        repository, team, timezone=BERLIN, start=start, end=time(7, 0), by=by, clock=clock
    )


# -- quiet hours ------------------------------------------------------------------------------


async def test_quiet_hours_of_an_unknown_team_are_refused_and_not_audited(
    repository: FakeRepository, clock: Clock
) -> None:
    """No write, no audit entry; the same change for a registered team is both (control)."""
    assert not await _quiet(repository, clock, "CT-9")
    assert repository.tables.quiet_hours == {}
    assert repository.tables.audit == []
    assert await _quiet(repository, clock, "CT-1")
    assert len(repository.tables.audit) == 1


async def test_quiet_hours_set_then_changed_are_audited_with_before_and_after(
    repository: FakeRepository, clock: Clock
) -> None:
    assert await _quiet(repository, clock)
    clock.now = NOW + timedelta(minutes=5)
    assert await _quiet(repository, clock, start=time(23, 0), by="person:other")
    first, second = repository.tables.audit
    assert first == {
        "actor": "person:lead",
        "action": AuditAction.QUIET_HOURS_CHANGED,
        "subject": "care_team:CT-1",
        "details": {
            "before": None,
            "after": {"timezone": BERLIN, "start": "22:00:00", "end": "07:00:00"},
        },
        "at": NOW,
    }
    assert second["details"]["before"] == first["details"]["after"]
    assert second["details"]["after"]["start"] == "23:00:00"
    assert second["at"] == NOW + timedelta(minutes=5)
    assert await repository.quiet_hours("CT-1") == QuietHoursRecord(
        BERLIN, time(23, 0), time(7, 0), NOW + timedelta(minutes=5), "person:other"
    )


async def test_quiet_hours_bring_a_pending_digest_forward_never_back(
    repository: FakeRepository, clock: Clock
) -> None:
    """Outside the new quiet hours the digest is due now; a digest due sooner stays sooner."""
    repository.tables.digests = {
        "CT-1": NOW + timedelta(hours=10),
        "CT-2": NOW - timedelta(minutes=1),
    }
    assert await _quiet(repository, clock, "CT-1")
    assert await _quiet(repository, clock, "CT-2")
    assert repository.tables.digests == {"CT-1": NOW, "CT-2": NOW - timedelta(minutes=1)}


async def test_quiet_hours_in_force_hold_the_digest_to_their_end(
    repository: FakeRepository, clock: Clock
) -> None:
    """At 23:00 Berlin time, quiet hours 22:00-07:00 move a digest due at 09:00 to 07:00."""
    clock.now = datetime(2025, 1, 15, 22, 0, tzinfo=UTC)  # 23:00 CET
    repository.tables.digests = {"CT-1": datetime(2025, 1, 16, 8, 0, tzinfo=UTC)}
    assert await _quiet(repository, clock)
    assert repository.tables.digests == {"CT-1": datetime(2025, 1, 16, 6, 0, tzinfo=UTC)}


async def test_quiet_hours_removed_are_audited_and_release_the_digest_now(
    repository: FakeRepository, clock: Clock
) -> None:
    assert not await team_settings.remove_quiet_hours(
        repository, "CT-1", by="person:lead", clock=clock
    )
    assert await _quiet(repository, clock)
    repository.tables.digests = {"CT-1": NOW + timedelta(hours=3)}
    clock.now = NOW + timedelta(minutes=1)
    assert await team_settings.remove_quiet_hours(repository, "CT-1", by="person:lead", clock=clock)
    assert repository.tables.quiet_hours == {}
    assert repository.tables.digests == {"CT-1": NOW + timedelta(minutes=1)}
    removal = repository.tables.audit[-1]
    assert removal["details"] == {
        "before": {"timezone": BERLIN, "start": "22:00:00", "end": "07:00:00"},
        "after": None,
    }
    assert (removal["actor"], removal["at"]) == ("person:lead", NOW + timedelta(minutes=1))
    assert len(repository.tables.audit) == 2
    assert await repository.quiet_hours("CT-1") is None


# -- early-cycle override ---------------------------------------------------------------------


async def test_early_cycle_override_given_in_minutes_is_stored_in_seconds_and_audited(
    repository: FakeRepository, clock: Clock
) -> None:
    body = EarlyCycleEscalationIn.model_validate(
        {
            "ack_wait_minutes": 2.5,
            "extra_targets": [{"kind": "person", "ref": "oncologist"}],
            "changed_by": "person:lead",
        }
    )
    assert await team_settings.set_early_cycle(repository, "CT-1", body, clock=clock)
    assert await repository.early_cycle("CT-1") == EarlyCycleRecord(
        150, ({"kind": "person", "ref": "oncologist"},), NOW, "person:lead"
    )
    [entry] = repository.tables.audit
    assert entry["action"] == AuditAction.EARLY_CYCLE_ESCALATION_CHANGED
    assert entry["details"] == {
        "before": None,
        "after": {"ack_wait_s": 150, "extra_targets": [{"kind": "person", "ref": "oncologist"}]},
    }


async def test_early_cycle_override_removed_is_audited_and_then_absent(
    repository: FakeRepository, clock: Clock
) -> None:
    body = EarlyCycleEscalationIn.model_validate({"ack_wait_minutes": 1, "changed_by": "p"})
    assert not await team_settings.set_early_cycle(repository, "CT-9", body, clock=clock)
    assert not await team_settings.remove_early_cycle(
        repository, "CT-1", by="person:lead", clock=clock
    )
    assert repository.tables.audit == []
    assert await team_settings.set_early_cycle(repository, "CT-1", body, clock=clock)
    assert await team_settings.remove_early_cycle(repository, "CT-1", by="person:lead", clock=clock)
    assert repository.tables.audit[-1]["details"] == {
        "before": {"ack_wait_s": 60, "extra_targets": []},
        "after": None,
    }
    assert len(repository.tables.audit) == 2
    assert await repository.early_cycle("CT-1") is None
