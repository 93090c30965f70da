"""A care team's paging set up, and alerts acted on, through notify's public service layer: for
tests about paging where the HTTP API is beside the point. The care-team API's routes for the
same things (``/api/care-teams/...``, ``/api/alerts/...``) have tests of their own in
``tests/api``.

Bodies are given as the dicts the care-team API's JSON would carry and validated by notify's own
input models (``schemas.notify``), so a test's setup is checked as strictly as a request's.
``timeline`` answers what notify records for an alert in its JSON form (times as ISO strings, ids
as text). Acknowledging and snoozing go through the escalation service the test runs (its clock,
its channels), as an acknowledgement by a clinician would.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any

from fastapi.encoders import jsonable_encoder

from schemas.notify import (
    CareTeamIn,
    EarlyCycleEscalationIn,
    EscalationPolicyIn,
    OverrideIn,
    PersonIn,
    ScheduleIn,
)
from services.notify.public import AlertTimelines, TeamRegistry
from services.notify.service_layer.escalation import AckResult, EscalationService
from vigil.runtime import utcnow


class NotifyDesk:
    """Notify's registry and alert actions over ``pool``; ``service`` (the test's escalation
    service) acknowledges and snoozes, ``clock`` times the audited settings changes."""

    def __init__(
        self,
        pool: Any,
        service: EscalationService | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.registry = TeamRegistry(pool, clock)
        self._timelines = AlertTimelines(pool)
        self._service = service

    # -- the registry ------------------------------------------------------------------------

    async def care_team(
        self, care_team_id: str, *, oncall_email: str, name: str = "Onc", timezone: str = "UTC"
    ) -> None:
        await self.registry.put_care_team(
            CareTeamIn(
                care_team_id=care_team_id, name=name, oncall_email=oncall_email, timezone=timezone
            )
        )

    async def person(
        self,
        person_id: str,
        *,
        care_team_id: str | None,
        contact_methods: list[dict[str, str]],
        name: str | None = None,
    ) -> None:
        await self.registry.put_person(
            PersonIn.model_validate(
                {
                    "person_id": person_id,
                    "name": name or person_id,
                    "care_team_id": care_team_id,
                    "contact_methods": contact_methods,
                }
            )
        )

    async def schedule(self, body: dict[str, Any]) -> None:
        await self.registry.put_schedule(ScheduleIn.model_validate(body))

    async def override(self, schedule_id: str, body: dict[str, Any]) -> None:
        await self.registry.add_override(schedule_id, OverrideIn.model_validate(body))

    async def policy(self, care_team_id: str, body: dict[str, Any]) -> None:
        """The team's escalation policy; fails the test when its id is another team's."""
        written = await self.registry.put_policy(
            care_team_id, EscalationPolicyIn.model_validate(body)
        )
        assert written, f"policy {body.get('policy_id')} belongs to another care team"

    async def quiet_hours(
        self, care_team_id: str, *, timezone: str, start: str, end: str, by: str
    ) -> bool:
        """Set them (``start``/``end`` as ``HH:MM``); False when there is no such care team."""
        return await self.registry.set_quiet_hours(
            care_team_id,
            timezone=timezone,
            start=time.fromisoformat(start),
            end=time.fromisoformat(end),
            by=by,
        )

    async def early_cycle(self, care_team_id: str, body: dict[str, Any]) -> bool:
        """Set the early-cycle escalation; False when there is no such care team."""
        return await self.registry.set_early_cycle(
            care_team_id, EarlyCycleEscalationIn.model_validate(body)
        )

    # -- alerts ------------------------------------------------------------------------------

    async def timeline(self, dedup_key: str) -> dict[str, Any]:
        """The alert's escalation as notify records it; fails the test when there is none."""
        recorded = await self._timelines.timeline(dedup_key)
        assert recorded is not None, f"no escalation for {dedup_key}"
        answer: dict[str, Any] = jsonable_encoder(recorded)
        return answer

    async def acknowledge(self, dedup_key: str, by: str) -> AckResult:
        """Acknowledge the alert's escalation; fails the test when there is none."""
        service = self._commands()
        escalation_id = await service.escalation_id_for(dedup_key)
        assert escalation_id is not None, f"no escalation for {dedup_key}"
        return await service.acknowledge(escalation_id, by=by, via="api")

    async def snooze(self, dedup_key: str, *, by: str, minutes: float) -> None:
        """Pause the alert's chain for ``minutes`` on the service's clock."""
        service = self._commands()
        escalation_id = await service.escalation_id_for(dedup_key)
        assert escalation_id is not None, f"no escalation for {dedup_key}"
        await service.snooze(escalation_id, until=service.now() + timedelta(minutes=minutes), by=by)

    def _commands(self) -> EscalationService:
        assert self._service is not None, "NotifyDesk needs the test's escalation service"
        return self._service
