"""The paging path's storage as repositories, one per aggregate, behind a unit of work.

``async with uow:`` opens one transaction and exposes the repositories as attributes; ``await
uow.commit()`` makes what they wrote durable; leaving the block without a commit rolls it all
back. The PostgreSQL side is ``adapters.postgres`` (one module per repository, one connection
shared through ``PostgresUnitOfWork``); unit tests pass in-memory fakes (``tests/fakes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self
from uuid import UUID

from schemas.events import Alert
from services.notify.domain.bundling import Placement
from services.notify.domain.channel_failover import AttemptVerdict
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    Acknowledge,
    EscalationState,
    PolicySnapshot,
    TimelineEntry,
    Transition,
)
from services.notify.domain.quiet_hours import QuietHours
from services.notify.domain.schedule import Rotation
from services.notify.service_layer.ports import PageJob, SendOutcome


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    """One escalation as loaded under its row lock: what the engine needs (its frozen policy
    and its state) and what its pages are filed under."""

    escalation_id: UUID
    dedup_key: str
    alert_id: UUID
    patient_id: str
    care_team_id: str
    bundle_id: UUID | None
    opened_at: datetime
    snapshot: PolicySnapshot
    state: EscalationState


#: An escalation and what the engine made of an event for it.
Change = tuple[EscalationRecord, Transition]


class EscalationRepository(Protocol):
    """Escalations: opened, locked and saved around the pure engine, their timeline."""

    async def add(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        state: EscalationState,
        at: datetime,
    ) -> UUID | None:
        """Insert the episode's escalation in ``state``; None when its dedup key has one."""
        ...

    async def lock(
        self, escalation_id: UUID, *, whole_bundle: bool = False
    ) -> list[EscalationRecord]:
        """The escalation, or with ``whole_bundle`` every escalation of its bundle, locked
        until the unit of work ends; empty when there is none."""
        ...

    async def lock_due(self, now: datetime, *, limit: int) -> list[EscalationRecord]:
        """Open escalations whose next step is due, locked; those another unit of work holds
        are skipped, not waited for."""
        ...

    async def save(self, changes: Sequence[Change]) -> None:
        """Write each escalation's new state."""
        ...

    async def record_acknowledged(
        self, record: EscalationRecord, event: Acknowledge, *, at: datetime
    ) -> None:
        """The acknowledgement in the audit log, in the same transaction as the ack."""
        ...

    async def escalation_id_for(self, dedup_key: str) -> UUID | None: ...
    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None: ...
    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None: ...
    async def open_paged_to(self, channel: str, address: str) -> UUID | None: ...
    async def spend_token(self, digest: str, at: datetime) -> bool: ...
    async def state_of(self, escalation_id: UUID) -> EscalationState | None: ...
    async def timeline(self, dedup_key: str) -> dict[str, Any] | None: ...


class OutboxRepository(Protocol):
    """The page outbox: the pages the engine's commands ask for, claimed under a lease,
    attempts opened, outcomes and receipts."""

    async def add_opened(
        self,
        alert: Alert,
        escalation_id: UUID,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        transition: Transition,
        at: datetime,
        claim_until: datetime,
    ) -> list[PageJob]:
        """The ``opened`` timeline entry, the first transition's entries and the pages its
        commands ask for, claimed until ``claim_until`` (an attempt in flight each) and
        returned for the caller to send at once."""
        ...

    async def add_effects(self, changes: Sequence[Change], *, at: datetime) -> None:
        """Each transition's timeline entries and the pages its commands ask for, queued."""
        ...

    async def sync_upstream(self, escalation_ids: Sequence[UUID], *, at: datetime) -> None:
        """Queue PagerDuty's acknowledge / resolve for the incidents these escalations opened,
        when they stopped."""
        ...

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
