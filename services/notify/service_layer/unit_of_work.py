"""The paging path's storage as repositories, one per aggregate, behind a unit of work.

``async with uow:`` opens one transaction and exposes the repositories as attributes; ``await
uow.commit()`` makes what they wrote durable; leaving the block without a commit rolls it all
back. The service layer is given a ``UnitOfWorkFactory`` and opens a unit of work for each step
(``transaction=False`` for one that needs no transaction). The PostgreSQL side is
``adapters.postgres`` (one module per repository, one connection shared through
``PostgresUnitOfWork``); unit tests pass in-memory fakes (``tests/fakes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, Self
from uuid import UUID

from schemas.events import Alert
from services.notify.domain.bundling import BundleWindow
from services.notify.domain.channel_failover import AttemptVerdict
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    Acknowledge,
    EscalationState,
    PageCommand,
    PolicySnapshot,
    TimelineEntry,
    Transition,
)
from services.notify.domain.monitoring_end import PatientStanding
from services.notify.domain.quiet_hours import QuietHours
from services.notify.domain.routing import PagePurpose
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


@dataclass(frozen=True, slots=True)
class TechnicalHold:
    """A pending technical hold: opened when its alert arrived, paged at ``due_at``."""

    bundle_id: UUID
    opened_at: datetime
    due_at: datetime


@dataclass(frozen=True, slots=True)
class PendingBundle:
    """A bundle due to be paged: a burst's follow-up, a quiet-hours digest or a technical
    hold (``kind``)."""

    bundle_id: UUID
    kind: str
    opened_at: datetime


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

    async def add_not_paged(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        reason: str,
        at: datetime,
    ) -> UUID | None:
        """Record an alert that pages nobody (``domain.monitoring_end``): its escalation
        written already resolved, with nobody paged, a ``not_paged`` timeline entry giving
        ``reason`` and an audit entry; None when its dedup key has an escalation."""
        ...

    async def lock(
        self, escalation_id: UUID, *, whole_bundle: bool = False
    ) -> list[EscalationRecord]:
        """The escalation, or with ``whole_bundle`` every escalation of its bundle, locked
        until the unit of work ends; empty when there is none."""
        ...

    async def lock_held(self, dedup_key: str, bundle_id: UUID) -> list[EscalationRecord]:
        """The episode's escalation held in bundle ``bundle_id``, locked."""
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
    async def note_all(
        self, entries: Sequence[tuple[UUID, TimelineEntry]], at: datetime
    ) -> None: ...
    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None: ...
    async def open_paged_to(self, channel: str, address: str) -> UUID | None: ...
    async def spend_token(self, digest: str, at: datetime) -> bool: ...
    async def state_of(self, escalation_id: UUID) -> EscalationState | None: ...
    async def timeline(self, dedup_key: str) -> dict[str, Any] | None: ...
    async def under_cover(self) -> list[tuple[UUID, str, str]]:
        """Regional cover: the unresolved escalations filed under a team that covers the
        patient's team, not yet handed back: (escalation id, patient, the team filed under)."""
        ...

    async def refile(
        self, escalation_id: UUID, *, care_team_id: str, snapshot: PolicySnapshot
    ) -> None:
        """File the escalation under another team with another frozen policy."""
        ...


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
        then: Sequence[TimelineEntry] = (),
    ) -> list[PageJob]:
        """The ``opened`` timeline entry, the first transition's entries (then ``then``) and
        the pages its commands ask for, claimed until ``claim_until`` (an attempt in flight
        each) and returned for the caller to send at once."""
        ...

    async def add_effects(
        self,
        changes: Sequence[Change],
        *,
        at: datetime,
        alert_purpose: PagePurpose = PagePurpose.ALERT,
    ) -> None:
        """Each transition's timeline entries and the pages its commands ask for, queued
        (the alert pages as ``alert_purpose``: a quiet-hours digest names them so)."""
        ...

    async def add_digest(
        self,
        digest_id: UUID,
        *,
        entries: Sequence[tuple[UUID, TimelineEntry]],
        resolved: Sequence[tuple[EscalationRecord, tuple[PageCommand, ...]]],
        at: datetime,
    ) -> None:
        """A digest's timeline entries, and its pages about the alerts that resolved while
        held, to whom each one's ``commands`` name."""
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

    async def claim_window(
        self, alert: Alert, opening: BundleWindow
    ) -> tuple[bool, BundleWindow | None, UUID | None]:
        """Open ``opening`` as the alert's patient's window unless one of theirs is still open
        at its start, placement serialised per patient until the unit of work ends: whether
        this alert opened it and, when it did not, the patient's latest window and its pending
        follow-up (None when there is none)."""
        ...

    async def add_follow_up(
        self, alert: Alert, *, care_team_id: str, at: datetime, due_at: datetime
    ) -> UUID: ...
    async def hold(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        bundle_id: UUID,
        due_at: datetime,
    ) -> UUID | None:
        """The alert's escalation opened held in the bundle; None when it has one."""
        ...

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
    async def technical_hold_of(
        self, dedup_key: str, *, ended_at: datetime | None = None
    ) -> TechnicalHold | None:
        """The pending technical hold the alert is held in, locked; None when it is not held,
        or when the condition outlasted the hold by the device's clock."""
        ...

    async def release(
        self, dedup_key: str, at: datetime, reason: str, *, kind: str = ...
    ) -> tuple[UUID, list[EscalationRecord]] | None:
        """Take a held alert out of its pending digest or technical hold: the bundle and the
        escalations released (due at ``at`` unless acknowledged), None when not held."""
        ...

    async def close(self, bundle_id: UUID, at: datetime) -> None: ...
    async def next_due(self, now: datetime, *, only: UUID | None = None) -> PendingBundle | None:
        """The next pending bundle due (or bundle ``only``), locked; those another unit of work
        holds are skipped, not waited for."""
        ...

    async def release_all(self, bundle_id: UUID, now: datetime) -> list[EscalationRecord]:
        """The bundle's held escalations nobody acknowledged, made due ``now``."""
        ...

    async def resolved_unpaged(self, bundle_id: UUID) -> list[EscalationRecord]:
        """The bundle's escalations that resolved while held, unpaged and unacknowledged."""
        ...

    async def members(self, bundle_id: UUID) -> list[str]: ...


class PolicyRepository(Protocol):
    """What is frozen onto an alert: its team, the team's policy, override and quiet hours."""

    async def standing_of(self, patient_id: str, device_id: str) -> PatientStanding | None:
        """The patient's care team, end of infusion and discharge, and whether the alert's
        device is a pump; None when the registry does not know the patient."""
        ...

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

    async def commit(self, *, durable: bool = True) -> None:
        """Make what the repositories wrote visible and durable. ``durable=False``: visible at
        once, but the commit does not wait for the disk; it becomes durable with the next commit
        that waits (whatever that one wrote). Only for a step that makes such a commit itself
        before it reports done, and for which a crash of the database in between loses nothing
        that is not redone (the first page of an alert: ``EscalationService._open``)."""
        ...

    async def rollback(self) -> None: ...


class UnitOfWorkFactory(Protocol):
    """A new unit of work each call (``async with`` it). With ``transaction=False`` its
    repositories share one connection but each statement commits on its own: for a read that
    needs no snapshot or lock, or a write that stands alone, at no cost of BEGIN and COMMIT."""

    def __call__(self, *, transaction: bool = True) -> UnitOfWork: ...
