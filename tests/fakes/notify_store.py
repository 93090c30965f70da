"""An in-memory unit of work and repositories for unit tests of ``EscalationService``.

``MemoryNotifyDatabase`` holds what the paging path's tables hold, on lists and dicts; its
``unit_of_work`` (the ``UnitOfWorkFactory`` the service is given) makes a ``FakeUnitOfWork``
whose repositories (``FakeEscalations``, ``FakeOutbox``, ``FakeBundles``, ``FakePolicies``,
``FakeHeartbeats``) read and write them the way the PostgreSQL repositories do: kept when the
block commits and put back as they were when it does not (with ``transaction=False`` every
write stands on its own, as each statement does on PostgreSQL). The service opens and advances
escalations with the pure engine through them; whom the commands page and on which channel is
the pure routing (``domain.routing.route``, ``after_failure``); pages carry the same idempotency
keys, are claimed, attempted, retried and failed over. What it does not model raises
``NotImplementedError`` or answers "nothing": bundling windows, quiet hours and their digests,
the technical hold, PagerDuty's upstream acknowledge / resolve, delivery receipts.

``AsItsOwnUnitOfWork`` makes one small test double stand for a unit of work and all of its
repositories at once.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn, Self, cast
from uuid import UUID

from schemas.events import Alert, Page
from services.notify.domain.bundling import BundleWindow
from services.notify.domain.channel_failover import (
    AttemptVerdict,
    Delivered,
    NextChannel,
    OutcomeUnknown,
    RetryLater,
)
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    Acknowledge,
    EscalationState,
    EscalationStatus,
    NotifyFallback,
    PageCommand,
    PolicySnapshot,
    TimelineEntry,
    Transition,
)
from services.notify.domain.monitoring_end import PatientStanding
from services.notify.domain.quiet_hours import QuietHours
from services.notify.domain.routing import (
    EMAIL,
    UNDELIVERABLE,
    ContactMethod,
    Deliver,
    PagePurpose,
    Recipient,
    ResolveUpstream,
    SentPage,
    ToFallback,
    after_failure,
    page_id_for,
    route,
)
from services.notify.service_layer.ports import PageJob, SendOutcome
from services.notify.service_layer.unit_of_work import Change, EscalationRecord, TechnicalHold

# Pages that asked someone to act: what an all clear is routed from.
_TRIGGERS = (PagePurpose.ALERT, PagePurpose.ESCALATION, PagePurpose.QUIET_DIGEST)


@dataclass
class StoredPage:
    """A row of ``pages``, as far as the paging path reads it."""

    key: str
    escalation_id: UUID
    alert: Alert
    care_team_id: str
    recipient: Recipient
    rank: int
    channel: str
    address: str
    purpose: PagePurpose
    has_next_channel: bool
    created_at: datetime
    route_detail: str | None = None
    status: str = "queued"
    tries: int = 0
    attempts: int = 0
    next_attempt_at: datetime | None = None
    updated_at: datetime | None = None
    provider_ref: str | None = None

    @property
    def page_id(self) -> UUID:
        return page_id_for(self.key)


@dataclass
class StoredEscalation:
    escalation_id: UUID
    alert: Alert
    care_team_id: str
    snapshot: PolicySnapshot
    state: EscalationState
    opened_at: datetime
    timeline: list[TimelineEntry] = field(default_factory=list)

    def record(self) -> EscalationRecord:
        return EscalationRecord(
            escalation_id=self.escalation_id,
            dedup_key=self.alert.dedup_key,
            alert_id=self.alert.alert_id,
            patient_id=self.alert.patient_id,
            care_team_id=self.care_team_id,
            bundle_id=None,
            opened_at=self.opened_at,
            snapshot=self.snapshot,
            state=self.state,
        )


class MemoryAlerts:
    """``NotifyRepository``: the alert log, every phase once."""

    def __init__(self) -> None:
        self.alerts: dict[UUID, Alert] = {}

    async def record_alert(self, alert: Alert) -> bool:
        if alert.alert_id in self.alerts:
            return False
        self.alerts[alert.alert_id] = alert
        return True


class MemoryNotifyDatabase:
    """What the paging path's tables hold, read and written by the fake repositories."""

    def __init__(self, *, fallback_email: str = DEFAULT_FALLBACK_EMAIL) -> None:
        self.fallback_email = fallback_email
        self.teams: dict[str, str] = {}
        # patient -> (end of infusion, discharge), as the care-team API records them.
        self.course_ends: dict[str, tuple[datetime | None, datetime | None]] = {}
        self.pumps: set[str] = set()
        self.policies: dict[str, PolicySnapshot] = {}
        self.oncall_emails: dict[str, str] = {}
        self.contacts: dict[str, list[ContactMethod]] = {}
        self.escalations: dict[UUID, StoredEscalation] = {}
        self.pages: list[StoredPage] = []
        self.tokens: set[str] = set()
        self.heartbeat_at: dict[str, tuple[datetime, datetime | None]] = {}
        # (by, via, dedup_key) of each acknowledgement, as the audit log records it.
        self.audit: list[tuple[str, str, str]] = []
        self.commits = 0
        self.rollbacks = 0
        # Each commit's ``durable``, in order (False: it did not wait for the disk).
        self.durable: list[bool] = []

    def unit_of_work(self, *, transaction: bool = True) -> FakeUnitOfWork:
        return FakeUnitOfWork(self, transaction=transaction)

    # -- set-up --------------------------------------------------------------------------------

    def add_team(
        self, care_team_id: str, policy: PolicySnapshot, *, oncall_email: str | None = None
    ) -> None:
        self.policies[care_team_id] = policy
        if oncall_email is not None:
            self.oncall_emails[care_team_id] = oncall_email

    def add_patient(self, patient_id: str, care_team_id: str) -> None:
        self.teams[patient_id] = care_team_id

    def end_course(
        self,
        patient_id: str,
        *,
        infusion_ended_at: datetime | None = None,
        discharged_at: datetime | None = None,
    ) -> None:
        """Record the patient's end of infusion and / or discharge."""
        self.course_ends[patient_id] = (infusion_ended_at, discharged_at)

    def add_person(self, person_id: str, *methods: tuple[str, str]) -> None:
        """``methods``: (channel, address) in rank order."""
        self.contacts[person_id] = [
            ContactMethod(rank, channel, address) for rank, (channel, address) in enumerate(methods)
        ]

    def pages_of(self, escalation_id: UUID) -> list[StoredPage]:
        return [p for p in self.pages if p.escalation_id == escalation_id]

    # -- writing pages, as ``_Writer`` does ----------------------------------------------------

    def _pages_for(
        self, escalation: StoredEscalation, commands: tuple[PageCommand, ...], at: datetime
    ) -> list[StoredPage]:
        owner = f"esc:{escalation.escalation_id}" + (
            "" if escalation.state.round_no == 0 else f"~round{escalation.state.round_no}"
        )
        new: list[StoredPage] = []
        for command in commands:
            if isinstance(command, NotifyFallback):
                key_base = f"{owner}:{command.pass_no}:{command.step_index}:fallback"
                new += self._fallback(escalation, PagePurpose.ALERT, key_base, command.reason, at)
                continue
            key_base = (
                f"{owner}:{command.purpose.value}:{command.pass_no}"
                f":{command.step_index}:{command.recipient}"
            )
            recipient = Recipient.parse(command.recipient)
            sent = (
                [
                    SentPage(
                        p.recipient,
                        p.rank,
                        p.channel,
                        p.address,
                        p.key,
                        p.status,
                        p.created_at,
                        p.updated_at,
                    )
                    for p in self.pages_of(escalation.escalation_id)
                    if p.purpose in _TRIGGERS
                ]
                if command.purpose is PagePurpose.ALL_CLEAR
                else []
            )
            for step in route(
                recipient, command.purpose, self.contacts.get(recipient.id, []), sent
            ):
                if isinstance(step, ResolveUpstream):
                    continue  # PagerDuty's upstream resolve is not modelled here
                if isinstance(step, ToFallback):
                    new += self._fallback(escalation, command.purpose, key_base, step.reason, at)
                    continue
                new += self._add(escalation, step, command.purpose, key_base, at)
        return new

    def _fallback(
        self,
        escalation: StoredEscalation,
        purpose: PagePurpose,
        key_base: str,
        reason: str,
        at: datetime,
    ) -> list[StoredPage]:
        team = escalation.care_team_id
        address = self.oncall_emails.get(team) or self.fallback_email
        escalation.timeline.append(TimelineEntry("fallback", {"reason": reason, "to": address}))
        step = Deliver(Recipient.fallback_of(team), 0, EMAIL, address, route_detail=reason)
        return self._add(escalation, step, purpose, key_base, at)

    def _add(
        self,
        escalation: StoredEscalation,
        step: Deliver,
        purpose: PagePurpose,
        key_base: str,
        at: datetime,
    ) -> list[StoredPage]:
        key = f"{key_base}{step.key_suffix}#{step.rank}"
        if any(p.key == key for p in self.pages):
            return []
        page = StoredPage(
            key=key,
            escalation_id=escalation.escalation_id,
            alert=escalation.alert,
            care_team_id=escalation.care_team_id,
            recipient=step.recipient,
            rank=step.rank,
            channel=step.channel,
            address=step.address,
            purpose=purpose,
            has_next_channel=step.has_next_channel,
            created_at=at,
            route_detail=step.route_detail,
            next_attempt_at=at,
        )
        self.pages.append(page)
        return [page]

    def _after_failure(self, page: StoredPage, next_channel: bool, at: datetime) -> None:
        escalation = self.escalations[page.escalation_id]
        key_base = page.key.rpartition("#")[0]
        then = after_failure(
            page.recipient,
            page.rank,
            self.contacts.get(page.recipient.id, []),
            next_channel=next_channel,
        )
        if isinstance(then, Deliver):
            escalation.timeline.append(
                TimelineEntry("channel_failover", {"from": page.channel, "to": then.channel})
            )
            self._add(escalation, then, page.purpose, key_base, at)
            return
        escalation.timeline.append(
            TimelineEntry("delivery_failed", {"recipient_ref": page.recipient.ref})
        )
        if then is not None:
            self._fallback(escalation, page.purpose, key_base + UNDELIVERABLE, then.reason, at)

    def _page(self, page_id: UUID) -> StoredPage:
        return next(p for p in self.pages if p.page_id == page_id)

    def _job(self, page: StoredPage, now: datetime, *, attempt: int | None) -> PageJob:
        escalation = self.escalations[page.escalation_id]
        return PageJob(
            page=Page(
                page_id=page.page_id,
                alert_id=page.alert.alert_id,
                dedup_key=page.alert.dedup_key,
                patient_id=page.alert.patient_id,
                care_team_id=page.care_team_id,
                channel=page.channel,
                recipient=page.address,
                idempotency_key=page.key,
                created_at=page.created_at,
            ),
            alert=page.alert,
            escalation_id=page.escalation_id,
            recipient_ref=page.recipient.ref,
            contact_rank=page.rank,
            purpose=page.purpose,
            tries=page.tries,
            was_sending=False,
            has_next_channel=page.has_next_channel,
            claimed_at=now,
            updated_at=page.updated_at,
            early_cycle=escalation.snapshot.early_cycle,
            attempt=attempt,
        )


class FakeEscalations:
    """``EscalationRepository`` over the database's escalations."""

    def __init__(self, db: MemoryNotifyDatabase) -> None:
        self._db = db

    async def under_cover(self) -> list[tuple[UUID, str, str]]:
        return []  # regional cover is not modelled: nothing is filed under a covering team

    async def refile(self, escalation_id: UUID, *, care_team_id: str, snapshot: object) -> None:
        _not_modelled("regional cover's hand-back")

    async def add(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        state: EscalationState,
        at: datetime,
    ) -> UUID | None:
        escalation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:escalation:{alert.dedup_key}")
        if escalation_id in self._db.escalations:
            return None
        self._db.escalations[escalation_id] = StoredEscalation(
            escalation_id, alert, care_team_id, snapshot, state, opened_at=at
        )
        return escalation_id

    async def add_not_paged(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        reason: str,
        at: datetime,
    ) -> UUID | None:
        state = EscalationState(
            status=EscalationStatus.RESOLVED, step_index=0, pass_no=0, due_at=None, resolved_at=at
        )
        escalation_id = await self.add(
            alert, care_team_id=care_team_id, snapshot=snapshot, state=state, at=at
        )
        if escalation_id is not None:
            detail = {"reason": reason, "alert_id": str(alert.alert_id), "rule_id": alert.rule_id}
            self._db.escalations[escalation_id].timeline.append(TimelineEntry("not_paged", detail))
            self._db.audit.append(("notify", f"not_paged:{reason}", alert.dedup_key))
        return escalation_id

    async def lock(
        self, escalation_id: UUID, *, whole_bundle: bool = False
    ) -> list[EscalationRecord]:
        escalation = self._db.escalations.get(escalation_id)
        return [] if escalation is None else [escalation.record()]

    async def lock_due(self, now: datetime, *, limit: int) -> list[EscalationRecord]:
        due = [
            e.record()
            for e in self._db.escalations.values()
            if e.state.status is EscalationStatus.OPEN
            and e.state.due_at is not None
            and e.state.due_at <= now
        ]
        return sorted(due, key=lambda r: cast(datetime, r.state.due_at))[:limit]

    async def save(self, changes: Sequence[Change]) -> None:
        for record, transition in changes:
            self._db.escalations[record.escalation_id].state = transition.state

    async def record_acknowledged(
        self, record: EscalationRecord, event: Acknowledge, *, at: datetime
    ) -> None:
        self._db.audit.append((event.by, event.via, record.dedup_key))

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        for escalation in self._db.escalations.values():
            if escalation.alert.dedup_key == dedup_key:
                return escalation.escalation_id
        return None

    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
        self._db.escalations[escalation_id].timeline.append(entry)

    async def state_of(self, escalation_id: UUID) -> EscalationState | None:
        escalation = self._db.escalations.get(escalation_id)
        return None if escalation is None else escalation.state

    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None:
        return None

    async def open_paged_to(self, channel: str, address: str) -> UUID | None:
        for page in reversed(self._db.pages):
            escalation = self._db.escalations[page.escalation_id]
            if (
                page.channel == channel
                and page.address == address
                and page.status in ("sent", "delivered")
                and escalation.state.status in (EscalationStatus.OPEN, EscalationStatus.EXHAUSTED)
            ):
                return page.escalation_id
        return None

    async def spend_token(self, digest: str, at: datetime) -> bool:
        if digest in self._db.tokens:
            return False
        self._db.tokens.add(digest)
        return True


class FakeOutbox:
    """``OutboxRepository``: the pages the engine's commands ask for, written as the
    database's ``_pages_for`` writes them (the pure routing over its contact methods), claimed,
    attempted and failed over."""

    def __init__(self, db: MemoryNotifyDatabase) -> None:
        self._db = db

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
        escalation = self._db.escalations[escalation_id]
        escalation.timeline.append(TimelineEntry("opened", {"policy_id": snapshot.policy_id}))
        escalation.timeline.extend(transition.timeline)
        new = self._db._pages_for(escalation, transition.commands, at)
        # Claimed for the caller, their first attempt opened (in flight).
        for page in new:
            page.status, page.attempts = "sending", 1
            page.next_attempt_at = claim_until
        return [self._db._job(page, at, attempt=1) for page in new]

    async def add_effects(self, changes: Sequence[Change], *, at: datetime) -> None:
        for record, transition in changes:
            escalation = self._db.escalations[record.escalation_id]
            escalation.timeline.extend(transition.timeline)
            self._db._pages_for(escalation, transition.commands, at)

    async def sync_upstream(self, escalation_ids: Sequence[UUID], *, at: datetime) -> None:
        return None  # PagerDuty's upstream acknowledge / resolve is not modelled here

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]:
        jobs: list[PageJob] = []
        for page in self._db.pages:
            if len(jobs) >= limit:
                break
            if page.status not in ("queued", "failed") or page.next_attempt_at is None:
                continue
            if page.next_attempt_at > now:
                continue
            state = self._db.escalations[page.escalation_id].state
            if page.purpose is PagePurpose.ALERT and state.status in (
                EscalationStatus.ACKNOWLEDGED,
                EscalationStatus.RESOLVED,
            ):
                # Asks for an action already taken or called off.
                page.status, page.next_attempt_at = "cancelled", None
                continue
            page.status = "sending"
            jobs.append(self._db._job(page, now, attempt=None))
        return jobs

    async def begin_attempt(self, job: PageJob, *, at: datetime) -> PageJob:
        page = self._db._page(job.page.page_id)
        page.attempts += 1
        return replace(job, attempt=page.attempts, resolving=False)

    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None:
        for job, outcome, verdict, status in outcomes:
            page = self._db._page(job.page.page_id)
            page.updated_at = at
            page.tries += 0 if job.resolving else 1
            if isinstance(verdict, Delivered):
                page.status, page.next_attempt_at = status, None
                page.provider_ref = outcome.provider_id
            elif isinstance(verdict, OutcomeUnknown):
                page.status, page.next_attempt_at = "unknown", None
            elif isinstance(verdict, RetryLater):
                page.status = "failed"
                page.next_attempt_at = at + timedelta(seconds=verdict.delay_s)
            else:
                page.status, page.next_attempt_at = "failed", None
                self._db._after_failure(page, isinstance(verdict, NextChannel), at)

    async def job_for_provider_ref(self, provider_ref: str, now: datetime) -> PageJob | None:
        _not_modelled("delivery receipts")

    async def record_receipt(self, job: PageJob, *, status: str, at: datetime) -> None:
        _not_modelled("delivery receipts")


class FakeBundles:
    """``BundleRepository`` of a database that never holds or bundles an alert."""

    async def pending_bundle_of(self, dedup_key: str) -> UUID | None:
        return None

    async def hold_for_quiet_hours(self, alert: Alert, **_: Any) -> UUID | None:
        _not_modelled("quiet hours")

    async def hold_technical(self, alert: Alert, **_: Any) -> UUID | None:
        _not_modelled("the technical hold (technical_hold_s > 0)")

    async def technical_hold_of(
        self, dedup_key: str, *, ended_at: datetime | None = None
    ) -> TechnicalHold | None:
        return None

    async def release(
        self, dedup_key: str, at: datetime, reason: str, *, kind: str = ""
    ) -> tuple[UUID, list[EscalationRecord]] | None:
        return None

    async def close(self, bundle_id: UUID, at: datetime) -> None:
        _not_modelled("bundles")

    async def next_due(self, now: datetime, *, only: UUID | None = None) -> None:
        return None

    async def claim_window(self, alert: Alert, opening: BundleWindow) -> NoReturn:
        _not_modelled("bundling windows (group_wait_s > 0)")


class FakePolicies:
    """``PolicyRepository``: the database's patients' teams, teams' policies and people's
    contact methods; no team has an early-cycle override or quiet hours."""

    def __init__(self, db: MemoryNotifyDatabase) -> None:
        self._db = db

    async def standing_of(self, patient_id: str, device_id: str) -> PatientStanding | None:
        team = self._db.teams.get(patient_id)
        if team is None:
            return None
        ended, discharged = self._db.course_ends.get(patient_id, (None, None))
        return PatientStanding(team, ended, discharged, device_id in self._db.pumps)

    async def load_policy(self, care_team_id: str) -> PolicySnapshot | None:
        return self._db.policies.get(care_team_id)

    async def early_cycle_override(self, care_team_id: str) -> EarlyCycleOverride | None:
        return None

    async def quiet_hours(self, care_team_id: str) -> QuietHours | None:
        return None

    async def person_for_address(self, channel: str, address: str) -> str | None:
        for person, methods in self._db.contacts.items():
            if any(m.channel == channel and m.address == address for m in methods):
                return person
        return None


class FakeHeartbeats:
    """``HeartbeatRepository``: each source's last heartbeat and since when it is silent."""

    def __init__(self, db: MemoryNotifyDatabase) -> None:
        self._db = db

    async def watch_source(self, source: str, at: datetime) -> None:
        self._db.heartbeat_at.setdefault(source, (at, None))

    async def heartbeat_seen(self, source: str, at: datetime) -> None:
        _, silent = self._db.heartbeat_at.get(source, (at, None))
        self._db.heartbeat_at[source] = (at, silent)

    async def heartbeats(self) -> list[tuple[str, datetime, datetime | None]]:
        return [(s, seen, silent) for s, (seen, silent) in sorted(self._db.heartbeat_at.items())]

    async def mark_silent(self, source: str, since: datetime | None) -> None:
        seen, _ = self._db.heartbeat_at[source]
        self._db.heartbeat_at[source] = (seen, since)


class FakeUnitOfWork:
    """``UnitOfWork`` over a ``MemoryNotifyDatabase``: ``async with`` it, write through its
    repositories, ``await commit()``; a block left without a commit puts the database's
    escalations, pages and audit entries back as they were when it began. With
    ``transaction=False`` each write stands on its own: nothing is put back, and ``commit``
    has nothing to do."""

    def __init__(self, db: MemoryNotifyDatabase, *, transaction: bool = True) -> None:
        self.db = db
        self.escalations = FakeEscalations(db)
        self.outbox = FakeOutbox(db)
        self.bundles = FakeBundles()
        self.policies = FakePolicies(db)
        self.heartbeats = FakeHeartbeats(db)
        self.committed = False
        self._transactional = transaction
        self._saved: tuple[Any, ...] | None = None

    async def __aenter__(self) -> FakeUnitOfWork:
        if self._transactional:
            db = self.db
            self._saved = copy.deepcopy((db.escalations, db.pages, db.audit))
        self.committed = False
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.committed:
            await self.rollback()

    async def commit(self, *, durable: bool = True) -> None:
        if self._saved is None:
            return
        self.committed = True
        self._saved = None
        self.db.commits += 1
        self.db.durable.append(durable)

    async def rollback(self) -> None:
        if self._saved is None:
            return
        self.db.escalations, self.db.pages, self.db.audit = self._saved
        self._saved = None
        self.db.rollbacks += 1


class AsItsOwnUnitOfWork:
    """A test double that is its own unit of work and every repository of it: the service
    calls ``unit_of_work`` (as its ``UnitOfWorkFactory``) and finds the double's methods under
    ``uow.escalations``, ``uow.outbox`` and the rest. Nothing is rolled back."""

    def unit_of_work(self, *, transaction: bool = True) -> Self:
        return self

    @property
    def escalations(self) -> Self:
        return self

    @property
    def outbox(self) -> Self:
        return self

    @property
    def bundles(self) -> Self:
        return self

    @property
    def policies(self) -> Self:
        return self

    @property
    def heartbeats(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def commit(self, *, durable: bool = True) -> None:
        return None

    async def rollback(self) -> None:
        return None


def _not_modelled(what: str) -> NoReturn:
    raise NotImplementedError(f"the in-memory notify database does not model {what}")
