"""The paging path's storage as repositories, one per aggregate, behind a unit of work.

``async with uow:`` opens one transaction and exposes the repositories as attributes; ``await
uow.commit()`` makes what they wrote durable; leaving the block without a commit rolls it all
back. The PostgreSQL side is ``adapters.postgres`` (one module per repository, one connection
shared through ``PostgresUnitOfWork``); unit tests pass in-memory fakes (``tests/fakes``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self
from uuid import UUID

from schemas.events import Alert
from services.notify.domain.bundling import Placement
from services.notify.domain.channel_failover import AttemptVerdict
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    EscalationEvent,
    EscalationState,
    PolicySnapshot,
    TimelineEntry,
    Transition,
)
from services.notify.domain.quiet_hours import QuietHours
from services.notify.domain.schedule import Rotation
from services.notify.service_layer.ports import PageJob, SendOutcome


class EscalationRepository(Protocol):
    """Escalations: opened, their state changed under a row lock, their timeline."""

    async def escalation_id_for(self, dedup_key: str) -> UUID | None: ...
    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None: ...
    async def open_and_fire(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        lease_s: float,
    ) -> tuple[UUID | None, list[PageJob]]: ...
    async def apply(
        self,
        escalation_id: UUID,
        event: EscalationEvent,
        *,
        at: datetime,
        whole_bundle: bool = False,
    ) -> Transition | None: ...
    async def tick_due(
        self, now: datetime, *, limit: int, event_for: Callable[[datetime], EscalationEvent]
    ) -> int: ...
    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None: ...
    async def open_paged_to(self, channel: str, address: str) -> UUID | None: ...
    async def spend_token(self, digest: str, at: datetime) -> bool: ...
    async def state_of(self, escalation_id: UUID) -> EscalationState | None: ...
    async def timeline(self, dedup_key: str) -> dict[str, Any] | None: ...


class OutboxRepository(Protocol):
    """The page outbox: claimed under a lease, attempts opened, outcomes and receipts."""

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]: ...
    async def begin_attempt(self, job: PageJob, *, at: datetime) -> PageJob: ...
    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None: ...
    async def job_for_provider_ref(self, provider_ref: str, now: datetime) -> PageJob | None: ...
    async def record_receipt(self, job: PageJob, *, status: str, at: datetime) -> None: ...


class BundleRepository(Protocol):
    """Bursts, quiet-hours digests and technical holds, and the escalations held in them."""

    async def open_in_window(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        group_wait_s: float,
        lease_s: float,
    ) -> tuple[Placement, UUID | None, list[PageJob], datetime]: ...
    async def pending_bundle_of(self, dedup_key: str) -> UUID | None: ...
    async def hold_for_quiet_hours(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        until: datetime,
    ) -> UUID | None: ...
    async def hold_technical(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        until: datetime,
    ) -> UUID | None: ...
    async def resolve_in_technical_hold(
        self, dedup_key: str, at: datetime, *, ended_at: datetime | None = None
    ) -> bool: ...
    async def release_from_quiet_hours(
        self, dedup_key: str, at: datetime, reason: str, *, kind: str = ...
    ) -> bool: ...
    async def next_due(self, now: datetime, *, only: UUID | None = None) -> Any: ...
    async def flush(self, bundle: Any, now: datetime) -> None: ...


class PolicyRepository(Protocol):
    """What is frozen onto an alert: its team, the team's policy, override and quiet hours."""

    async def team_of_patient(self, patient_id: str) -> str | None: ...
    async def load_policy(self, care_team_id: str) -> PolicySnapshot | None: ...
    async def early_cycle_override(self, care_team_id: str) -> EarlyCycleOverride | None: ...
    async def rotation(self, schedule_id: str) -> Rotation | None: ...
    async def quiet_hours(self, care_team_id: str) -> QuietHours | None: ...
    async def person_for_address(self, channel: str, address: str) -> str | None: ...


class HeartbeatRepository(Protocol):
    """The pipeline's heartbeat sources: last seen, silent since."""

    async def watch_source(self, source: str, at: datetime) -> None: ...
    async def heartbeat_seen(self, source: str, at: datetime) -> None: ...
    async def heartbeats(self) -> list[tuple[str, datetime, datetime | None]]: ...
    async def mark_silent(self, source: str, since: datetime | None) -> None: ...


class UnitOfWork(Protocol):
    @property
    def escalations(self) -> EscalationRepository: ...
    @property
    def outbox(self) -> OutboxRepository: ...
    @property
    def bundles(self) -> BundleRepository: ...
    @property
    def policies(self) -> PolicyRepository: ...
    @property
    def heartbeats(self) -> HeartbeatRepository: ...

    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Roll back whatever was not committed."""
        ...

    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...
