"""What a care team's registry and notify's HTTP API need from the outside world, as protocols,
plus the records they return.

``ApiRepository`` reads and writes the registry tables the care-team API manages through
``public.TeamRegistry`` (care teams, people, schedules, policies, quiet hours, early-cycle
overrides); ``SettingsChanges`` is one transaction of a care team's audited settings (the change
and its audit entry commit together). ``EscalationCommands`` is the part of
``EscalationService`` notify's HTTP API calls (signed acknowledgement links, Twilio's
webhooks). The PostgreSQL adapter (``adapters/api_queries.py``) and ``EscalationService``
implement them; unit tests pass in-memory fakes.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any, Protocol
from uuid import UUID

from schemas.notify import (
    CareTeamIn,
    EscalationPolicyIn,
    OverrideIn,
    PersonIn,
    ScheduleIn,
)
from services.notify.domain.ack_token import AckClaim
from services.notify.domain.schedule import Rotation
from services.notify.service_layer.escalation import AckResult


@dataclass(frozen=True, slots=True)
class QuietHoursRecord:
    """A care team's quiet hours as stored."""

    timezone: str
    start: time
    end: time
    updated_at: datetime
    updated_by: str


@dataclass(frozen=True, slots=True)
class EarlyCycleRecord:
    """A care team's early-cycle override as stored: the wait in seconds (None: the usual
    chain's), the extra targets as ``{"kind", "ref"}`` objects."""

    ack_wait_s: int | None
    extra_targets: tuple[dict[str, Any], ...]
    updated_at: datetime
    updated_by: str


class SettingsChanges(Protocol):
    """One transaction over a care team's audited settings. The ``*_for_update`` reads lock the
    row they read until the transaction ends; ``audit`` appends to the audit log in it."""

    async def care_team_exists(self, care_team_id: str) -> bool: ...

    async def quiet_hours_for_update(self, care_team_id: str) -> dict[str, str] | None:
        """``{"timezone", "start", "end"}`` (ISO times), as audited; None when there are none."""
        ...

    async def save_quiet_hours(
        self, care_team_id: str, *, timezone: str, start: time, end: time, at: datetime, by: str
    ) -> None: ...

    async def delete_quiet_hours(self, care_team_id: str) -> None: ...

    async def bring_digests_forward(self, care_team_id: str, due_at: datetime) -> None:
        """Every pending quiet-hours digest of the team is due no later than ``due_at``."""
        ...

    async def early_cycle_for_update(self, care_team_id: str) -> dict[str, Any] | None:
        """``{"ack_wait_s", "extra_targets"}`` as audited; None when there is no override."""
        ...

    async def save_early_cycle(
        self, care_team_id: str, setting: dict[str, Any], *, at: datetime, by: str
    ) -> None: ...

    async def delete_early_cycle(self, care_team_id: str) -> None: ...

    async def audit(
        self, actor: str, action: str, subject: str, details: dict[str, Any], *, at: datetime
    ) -> None: ...


class ApiRepository(Protocol):
    """The registry tables of a care team's paging."""

    async def put_care_team(self, team: CareTeamIn) -> None: ...

    async def put_person(self, person: PersonIn) -> None:
        """The person and their contact methods, replaced together."""
        ...

    async def person(self, person_id: str) -> dict[str, Any] | None: ...

    async def put_schedule(self, schedule: ScheduleIn) -> None: ...

    async def add_override(
        self, override_id: UUID, schedule_id: str, override: OverrideIn
    ) -> None: ...

    async def rotation(self, schedule_id: str) -> Rotation | None: ...

    async def put_policy(self, care_team_id: str, policy: EscalationPolicyIn) -> None: ...

    async def quiet_hours(self, care_team_id: str) -> QuietHoursRecord | None: ...

    async def early_cycle(self, care_team_id: str) -> EarlyCycleRecord | None: ...

    def settings_changes(self) -> AbstractAsyncContextManager[SettingsChanges]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        ...


class EscalationCommands(Protocol):
    """What the API asks of the escalation service (``EscalationService`` provides it)."""

    def check_token(self, token: str) -> AckClaim: ...

    async def acknowledge_token(self, token: str) -> AckResult: ...

    async def acknowledge_sms(self, *, sender: str, body: str) -> AckResult: ...

    async def sms_status(
        self, *, message_sid: str, status: str, error_code: str | None
    ) -> bool: ...
