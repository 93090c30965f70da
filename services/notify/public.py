"""What other services may use of notify (``tests/unit/test_layers.py``): acknowledging,
snoozing and resolving an alert by its dedup key through the escalation service, so the chain
stops (or pauses) at once and the timeline records who did it; reading an alert's escalation
timeline; a care team's registry (the team, its people, on-call schedules and overrides, who is
on call now and next, the escalation policy, quiet hours and the early-cycle escalation), read
and changed through notify's own repository and use cases; the pipeline's outages (when Vigil
was not watching), read-only; regional cover's hours and who acts for a covered team at an
instant (pure, ``domain/cover.py``), and the morning summary of a night of cover (pure,
``domain/cover_summary.py``, over ``night_alerts``, the escalations of a covered team's patients
opened in a window), which notify also e-mails, and the windows it tells of (``nights_to_tell``:
a window a revocation cut short ends at the revocation), the same for the API and the e-mail.
The care-team API never writes notify's tables itself; it decides who may ask."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any

import asyncpg

from schemas.notify import (
    CareTeamIn,
    EarlyCycleEscalationIn,
    EscalationPolicyIn,
    OverrideIn,
    PersonIn,
    ScheduleIn,
)
from services.notify.adapters.api_queries import PostgresApiRepository
from services.notify.adapters.outage_store import PostgresOutageStore
from services.notify.adapters.postgres.cover_summaries import night_alerts
from services.notify.adapters.postgres.patient_escalations import PostgresPatientEscalations
from services.notify.adapters.postgres.unit_of_work import PostgresUnitOfWork
from services.notify.bootstrap import build_escalation
from services.notify.domain.cover import (
    Agreement,
    CoverGrant,
    CoverHours,
    Window,
    grants,
    last_window,
    window_at,
)
from services.notify.domain.cover_summary import (
    NightAlert,
    NightToTell,
    Revocation,
    nights_to_tell,
    summarise,
)
from services.notify.domain.schedule import next_change, on_call_at
from services.notify.service_layer import team_settings
from services.notify.service_layer.closing import close_patient
from services.notify.service_layer.escalation import AckOutcome
from services.notify.settings import NotifySettings

__all__ = [
    "Agreement",
    "AlertActions",
    "AlertTimelines",
    "CoverGrant",
    "CoverHours",
    "NightAlert",
    "NightToTell",
    "PatientEscalations",
    "PipelineOutages",
    "Revocation",
    "TeamRegistry",
    "Window",
    "grants",
    "last_window",
    "night_alerts",
    "nights_to_tell",
    "summarise",
    "window_at",
]


class AlertActions:
    """Acknowledge and resolve over ``pool``, the database notify writes."""

    def __init__(self, pool: Any) -> None:
        # Acknowledging and resolving send nothing, so the channels the settings enable are
        # never used here.
        self._service, self._closers = build_escalation(NotifySettings(), pool)

    async def acknowledge(self, dedup_key: str, by: str, at: datetime) -> bool:
        escalation_id = await self._service.escalation_id_for(dedup_key)
        if escalation_id is None:
            return False
        result = await self._service.acknowledge(escalation_id, by=by, via="dashboard")
        return result.outcome is AckOutcome.ACKNOWLEDGED

    async def snooze(self, dedup_key: str, by: str, minutes: float) -> datetime | None:
        """Pause the alert's chain for ``minutes`` on the escalation service's clock; when it
        ends (None: the alert has no escalation)."""
        escalation_id = await self._service.escalation_id_for(dedup_key)
        if escalation_id is None:
            return None
        until = self._service.now() + timedelta(minutes=minutes)
        await self._service.snooze(escalation_id, until=until, by=by)
        return until

    async def resolve(self, dedup_key: str, by: str, at: datetime) -> bool:
        escalation_id = await self._service.escalation_id_for(dedup_key)
        if escalation_id is None:
            return False
        return await self._service.resolve(escalation_id, at=at)


class AlertTimelines:
    """An alert's escalation as notify records it, over ``pool``: status, who acknowledged,
    the timeline's events and every delivery attempt: what notify's own
    ``GET /alerts/{dedup_key}/timeline`` answers."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def timeline(self, dedup_key: str) -> dict[str, Any] | None:
        async with PostgresUnitOfWork(self._pool, transaction=False) as uow:
            result: dict[str, Any] | None = await uow.escalations.timeline(dedup_key)
            return result


class PipelineOutages:
    """The pipeline's outages over ``pool``: each heartbeat silence notify recorded (when Vigil
    was not watching), read-only."""

    def __init__(self, pool: Any) -> None:
        self._store = PostgresOutageStore(pool)

    async def outages(self, *, since: datetime | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, at most ``limit``; with ``since``, only those that had not ended by
        then. Each: ``outage_id`` (text), ``source``, ``started_at``, ``ended_at``,
        ``detected_at``, ``recovered_at``, ``summarised_at`` (None while not so) and
        ``teams_told`` (how many care teams were sent the summary)."""
        rows = await self._store.outages(since=since, limit=limit)
        return [{**row, "outage_id": str(row["outage_id"])} for row in rows]


class TeamRegistry:
    """A care team's registry over ``pool``: what notify's repository reads and writes, and
    the audited settings (quiet hours, early-cycle escalation) through notify's use cases, each
    change and its audit entry in one transaction, timed by ``clock``. Answers as plain dicts."""

    def __init__(self, pool: Any, clock: Callable[[], datetime]) -> None:
        self._repository = PostgresApiRepository(pool)
        self._clock = clock

    async def care_team(self, care_team_id: str) -> dict[str, Any] | None:
        return await self._repository.care_team(care_team_id)

    async def put_care_team(self, team: CareTeamIn) -> None:
        await self._repository.put_care_team(team)

    async def people(self, care_team_id: str) -> list[dict[str, Any]]:
        return await self._repository.people_of(care_team_id)

    async def person(self, person_id: str) -> dict[str, Any] | None:
        return await self._repository.person(person_id)

    async def put_person(self, person: PersonIn) -> None:
        await self._repository.put_person(person)

    async def schedule_ids(self, care_team_id: str) -> list[str]:
        return await self._repository.schedule_ids_of(care_team_id)

    async def schedule(self, schedule_id: str, *, since: datetime) -> dict[str, Any] | None:
        """The schedule, its care team and its overrides that end after ``since``."""
        return await self._repository.schedule(schedule_id, since=since)

    async def put_schedule(self, schedule: ScheduleIn) -> None:
        await self._repository.put_schedule(schedule)

    async def add_override(self, schedule_id: str, override: OverrideIn) -> uuid.UUID:
        override_id = uuid.uuid4()
        await self._repository.add_override(override_id, schedule_id, override)
        return override_id

    async def on_call(self, schedule_id: str, at: datetime) -> dict[str, Any] | None:
        """Who is on call on the schedule at ``at`` (``person_id``, None: nobody), and the next
        change: ``next_at`` and ``next_person_id`` (both None when nobody else ever takes
        over). None when there is no such schedule."""
        rotation = await self._repository.rotation(schedule_id)
        if rotation is None:
            return None
        change = next_change(rotation, at)
        return {
            "schedule_id": schedule_id,
            "person_id": on_call_at(rotation, at),
            "next_at": None if change is None else change[0],
            "next_person_id": None if change is None else change[1],
        }

    async def policy(self, care_team_id: str) -> dict[str, Any] | None:
        """The team's own policy: ``policy_id``, ``name``, ``steps`` (``wait_s``,
        ``targets``), ``repeat_count``, ``updated_at``; None when it pages the team's on-call
        address (the default)."""
        return await self._repository.policy(care_team_id)

    async def put_policy(self, care_team_id: str, policy: EscalationPolicyIn) -> bool:
        """Replace the team's policy; False (nothing written) when its ``policy_id`` is
        another team's policy's."""
        try:
            await self._repository.put_policy(care_team_id, policy)
        except asyncpg.exceptions.UniqueViolationError:
            return False
        return True

    async def quiet_hours(self, care_team_id: str) -> dict[str, Any] | None:
        quiet = await self._repository.quiet_hours(care_team_id)
        if quiet is None:
            return None
        return {
            "timezone": quiet.timezone,
            "start": quiet.start,
            "end": quiet.end,
            "updated_at": quiet.updated_at,
            "updated_by": quiet.updated_by,
        }

    async def set_quiet_hours(
        self, care_team_id: str, *, timezone: str, start: time, end: time, by: str
    ) -> bool:
        """False when there is no such care team."""
        return await team_settings.set_quiet_hours(
            self._repository,
            care_team_id,
            timezone=timezone,
            start=start,
            end=end,
            by=by,
            clock=self._clock,
        )

    async def remove_quiet_hours(self, care_team_id: str, *, by: str) -> bool:
        """False when the team has no quiet hours."""
        return await team_settings.remove_quiet_hours(
            self._repository, care_team_id, by=by, clock=self._clock
        )

    async def early_cycle(self, care_team_id: str) -> dict[str, Any] | None:
        """``ack_wait_s`` (None: the usual chain's), ``extra_targets`` (``kind``, ``ref``),
        ``updated_at``, ``updated_by``; None when there is no override."""
        override = await self._repository.early_cycle(care_team_id)
        if override is None:
            return None
        return {
            "ack_wait_s": override.ack_wait_s,
            "extra_targets": [dict(t) for t in override.extra_targets],
            "updated_at": override.updated_at,
            "updated_by": override.updated_by,
        }

    async def set_early_cycle(self, care_team_id: str, body: EarlyCycleEscalationIn) -> bool:
        """False when there is no such care team."""
        return await team_settings.set_early_cycle(
            self._repository, care_team_id, body, clock=self._clock
        )

    async def remove_early_cycle(self, care_team_id: str, *, by: str) -> bool:
        """False when the team has no override."""
        return await team_settings.remove_early_cycle(
            self._repository, care_team_id, by=by, clock=self._clock
        )


class PatientEscalations:
    """A patient's escalations over ``pool``, closed when the care team ends monitoring them
    (end of infusion, discharge): resolved with the reason on their timeline, so nobody goes on
    being paged (``service_layer.closing``)."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._open = PostgresPatientEscalations(pool)

    async def close_patient(
        self,
        patient_id: str,
        *,
        reason: str,
        at: datetime,
        devices: frozenset[str] | None = None,
    ) -> int:
        return await close_patient(
            lambda: PostgresUnitOfWork(self._pool),
            self._open,
            patient_id,
            reason=reason,
            at=at,
            devices=None if devices is None else sorted(devices),
        )
