"""The notify use cases with in-memory fakes: paging flow, retries, resume, offset commits, logs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from uuid import UUID, uuid4

import pytest

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    DeadLetter,
    DeliveryAttempt,
    DeliveryStatus,
    Evidence,
    Page,
)
from services.notify.app import consume_alerts
from services.notify.domain import OnCall, Route, ThreadRoot, message_id_for
from services.notify.service_layer.dispatcher import PageDispatcher, PagingPolicy
from services.notify.service_layer.ports import PageInsert, SendOutcome, UndeliveredPage
from vigil.kafka import encode
from vigil.runtime import utcnow

T0 = datetime(2025, 3, 1, 2, 0, 0, tzinfo=UTC)
ONCALL = OnCall(care_team_id="CT-ONC-1", email="oncall-onc1@hospital.example")
FALLBACK = "vigil-oncall-fallback@localhost"
ACCEPTED = SendOutcome(accepted=True, detail="250 ok", reply_code=250)
REFUSED = SendOutcome(accepted=False, detail="ConnectionRefusedError: [Errno 111]")


def alert(phase: AlertPhase = AlertPhase.START, patient_id: str = "P-0001") -> Alert:
    return Alert(
        alert_id=uuid4(),
        dedup_key=f"{patient_id}:fever",
        patient_id=patient_id,
        device_id="thermo-17",
        kind=AlertKind.PHYSIOLOGICAL,
        code="FEVER_SINGLE",
        priority=AlertPriority.HIGH,
        phase=phase,
        state=AlertState.ACTIVE,
        title="Fever 38.6 °C",
        device_time=T0,
        ingest_time=T0,
        evidence=(
            Evidence(
                name="temperature",
                value=38.6,
                unit="°C",
                limit=38.3,
                comparator=">=",
                device_time=T0,
            ),
        ),
        rule_id="fever.single",
        rule_version="2025.03.1",
    )


@dataclass
class StoredPage:
    page: Page
    route: Route
    route_detail: str | None
    status: DeliveryStatus = DeliveryStatus.QUEUED
    attempts: list[DeliveryStatus] = field(default_factory=list)


class FakeRepository:
    """In-memory stand-in for the PostgreSQL repository, with the same idempotency rules."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.alerts: dict[UUID, Alert] = {}
        self.pages: dict[str, StoredPage] = {}
        self.oncall: dict[str, OnCall] = {"P-0001": ONCALL}

    async def record_alert(self, alert: Alert) -> bool:
        self.journal.append(f"alert:{alert.phase.value}")
        fresh = alert.alert_id not in self.alerts
        self.alerts.setdefault(alert.alert_id, alert)
        return fresh

    async def find_oncall(self, patient_id: str) -> OnCall | None:
        return self.oncall.get(patient_id)

    async def find_thread_root(self, dedup_key: str) -> ThreadRoot | None:
        for stored in self.pages.values():
            source = self.alerts[stored.page.alert_id]
            if stored.page.dedup_key == dedup_key and source.phase is AlertPhase.START:
                return ThreadRoot(
                    stored.page.idempotency_key,
                    stored.page.recipient,
                    stored.page.care_team_id,
                    stored.route,
                )
        return None

    async def insert_page(
        self, page: Page, *, route: Route, route_detail: str | None
    ) -> PageInsert:
        existing = self.pages.get(page.idempotency_key)
        if existing is not None:
            return PageInsert(new=False, page_id=existing.page.page_id, status=existing.status)
        self.journal.append("page")
        self.pages[page.idempotency_key] = StoredPage(page, route, route_detail)
        return PageInsert(new=True, page_id=page.page_id, status=DeliveryStatus.QUEUED)

    async def record_attempt(
        self,
        page_id: UUID,
        *,
        channel: str,
        recipient: str,
        status: DeliveryStatus,
        at: datetime,
        detail: str | None,
        provider_message_id: str | None,
    ) -> int:
        self.journal.append(f"attempt:{status.value}")
        stored = self.by_id(page_id)
        stored.attempts.append(status)
        if stored.status is not DeliveryStatus.SENT:
            stored.status = status
        return len(stored.attempts)

    async def undelivered_pages(self) -> list[UndeliveredPage]:
        return [
            UndeliveredPage(
                page=s.page,
                alert=self.alerts[s.page.alert_id],
                route=s.route,
                route_detail=s.route_detail,
                attempts_made=len(s.attempts),
            )
            for s in self.pages.values()
            if s.status in (DeliveryStatus.QUEUED, DeliveryStatus.FAILED)
        ]

    def by_id(self, page_id: UUID) -> StoredPage:
        return next(s for s in self.pages.values() if s.page.page_id == page_id)


class FakeSender:
    def __init__(self, *outcomes: SendOutcome, then: SendOutcome = ACCEPTED) -> None:
        self._outcomes = list(outcomes)
        self._then = then
        self.sent: list[tuple[str, EmailMessage]] = []

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        self.sent.append((recipient, message))
        return self._outcomes.pop(0) if self._outcomes else self._then


class FakePublisher:
    def __init__(self) -> None:
        self.attempts: list[DeliveryAttempt] = []
        self.dead_letters: list[DeadLetter] = []
        self.page_sent = asyncio.Event()

    async def publish_attempt(self, attempt: DeliveryAttempt) -> None:
        self.attempts.append(attempt)
        if attempt.status is DeliveryStatus.SENT:
            self.page_sent.set()

    async def publish_dead_letter(self, letter: DeadLetter) -> None:
        self.dead_letters.append(letter)


class HandClock:
    """A clock tests move by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Rig:
    repository: FakeRepository
    sender: FakeSender
    publisher: FakePublisher
    clock: HandClock
    dispatcher: PageDispatcher
    journal: list[str]


def rig(
    *outcomes: SendOutcome,
    then: SendOutcome = ACCEPTED,
    max_send_attempts: int = 5,
    retry_base_s: float = 2.0,
    clock: Callable[[], datetime] | None = None,
) -> Rig:
    journal: list[str] = []
    repository = FakeRepository(journal)
    sender = FakeSender(*outcomes, then=then)
    publisher = FakePublisher()
    hand = HandClock()
    dispatcher = PageDispatcher(
        repository=repository,
        sender=sender,
        publisher=publisher,
        policy=PagingPolicy(
            sender_address="vigil-pages@localhost",
            fallback_email=FALLBACK,
            max_send_attempts=max_send_attempts,
            retry_base_s=retry_base_s,
            retry_cap_s=60.0,
        ),
        clock=clock or hand,
    )
    return Rig(repository, sender, publisher, hand, dispatcher, journal)


async def test_start_pages_the_oncall_once_even_when_redelivered() -> None:
    """A start phase is sent and published once; the same alert again sends nothing."""
    r = rig()
    start = alert()

    await r.dispatcher.handle_alert(start)
    await r.dispatcher.handle_alert(start)

    assert [recipient for recipient, _ in r.sender.sent] == [ONCALL.email]
    assert [(a.attempt, a.status) for a in r.publisher.attempts] == [(1, DeliveryStatus.SENT)]
    (stored,) = r.repository.pages.values()
    assert stored.status is DeliveryStatus.SENT
    assert r.publisher.attempts[0].provider_message_id == message_id_for(
        stored.page.idempotency_key
    )


async def test_continue_is_recorded_but_not_paged() -> None:
    """A continue phase reaches the alert log and no one's inbox."""
    r = rig()
    await r.dispatcher.handle_alert(alert(AlertPhase.CONTINUE))
    assert r.journal == ["alert:continue"]
    assert r.sender.sent == []


async def test_escalation_replies_to_the_start_page() -> None:
    """The escalation e-mail threads under the start page the clinician already has."""
    r = rig()
    await r.dispatcher.handle_alert(alert(AlertPhase.START))
    await r.dispatcher.handle_alert(alert(AlertPhase.ESCALATE))
    (_, first), (_, second) = r.sender.sent
    assert second["In-Reply-To"] == first["Message-ID"]


async def test_failed_send_is_retried_on_the_backoff_schedule() -> None:
    """A refused send is recorded as failed and tried again once its delay (2 s) has passed."""
    r = rig(REFUSED)
    await r.dispatcher.handle_alert(alert())
    (stored,) = r.repository.pages.values()
    assert stored.status is DeliveryStatus.FAILED
    assert r.dispatcher.next_due() == T0 + timedelta(seconds=2)

    r.clock.advance(1.9)
    assert await r.dispatcher.deliver_due() == 0
    r.clock.advance(0.1)
    assert await r.dispatcher.deliver_due() == 1

    assert stored.attempts == [DeliveryStatus.FAILED, DeliveryStatus.SENT]
    assert r.repository.by_id(stored.page.page_id).status is DeliveryStatus.SENT
    assert [a.attempt for a in r.publisher.attempts] == [1, 2]
    assert r.dispatcher.waiting == 0


async def test_exhausted_page_is_logged_as_an_error_and_left_for_resume(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After max_send_attempts failures: still failed, one error logged, and resume finds it."""
    r = rig(then=REFUSED, max_send_attempts=3)
    await r.dispatcher.handle_alert(alert())
    with caplog.at_level(logging.INFO, logger="vigil.notify"):
        for _ in range(5):
            r.clock.advance(60)
            await r.dispatcher.deliver_due()

    (stored,) = r.repository.pages.values()
    assert stored.attempts == [DeliveryStatus.FAILED] * 3
    assert r.dispatcher.waiting == 0
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == [
        "page_delivery_exhausted"
    ]
    assert await r.dispatcher.resume() == 1
    assert r.dispatcher.waiting == 1


async def test_unknown_patient_is_paged_to_the_fallback_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No care team: an error event is logged and the page goes to the fallback address."""
    r = rig()
    with caplog.at_level(logging.INFO, logger="vigil.notify"):
        await r.dispatcher.handle_alert(alert(patient_id="P-9999"))
    (stored,) = r.repository.pages.values()
    assert stored.page.recipient == FALLBACK
    assert stored.route is Route.FALLBACK
    assert [recipient for recipient, _ in r.sender.sent] == [FALLBACK]
    assert "alert_unroutable" in [rec.getMessage() for rec in caplog.records]


async def test_resume_sends_pages_a_crashed_run_left_queued() -> None:
    """Pages queued but never attempted by an earlier process are sent after resume."""
    earlier = rig(then=REFUSED, max_send_attempts=1)
    await earlier.dispatcher.handle_alert(alert())
    # A new process over the same database: its own sender, no memory of the retry queue.
    r = rig()
    r.repository = earlier.repository
    r.dispatcher = PageDispatcher(
        repository=earlier.repository,
        sender=r.sender,
        publisher=r.publisher,
        policy=PagingPolicy(sender_address="vigil-pages@localhost", fallback_email=FALLBACK),
        clock=r.clock,
    )

    assert await r.dispatcher.resume() == 1
    await r.dispatcher.deliver_due()

    (stored,) = earlier.repository.pages.values()
    assert stored.attempts == [DeliveryStatus.FAILED, DeliveryStatus.SENT]
    assert [a.attempt for a in r.publisher.attempts] == [2]


async def test_logs_carry_no_value_and_no_body(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged while paging contains the temperature, the title or the message text."""
    r = rig(REFUSED)
    with caplog.at_level(logging.DEBUG):
        await r.dispatcher.handle_alert(alert())
        await r.dispatcher.handle_alert(alert(patient_id="P-9999"))
        r.clock.advance(10)
        await r.dispatcher.deliver_due()
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        assert "38.6" not in text and "Fever" not in text and "caregiver" not in text


async def test_retry_loop_delivers_on_its_own_and_stops() -> None:
    """run_retries wakes for a newly scheduled retry, sends it when due, and ends on stop."""
    r = rig(REFUSED, retry_base_s=0.05, clock=utcnow)
    stop = asyncio.Event()
    loop = asyncio.create_task(r.dispatcher.run_retries(stop))

    await r.dispatcher.handle_alert(alert())
    (stored,) = r.repository.pages.values()
    assert stored.status is DeliveryStatus.FAILED
    async with asyncio.timeout(5):
        await r.publisher.page_sent.wait()
    stop.set()
    async with asyncio.timeout(5):
        await loop
    assert stored.attempts == [DeliveryStatus.FAILED, DeliveryStatus.SENT]


@dataclass
class Record:
    value: bytes | None
    offset: int
    topic: str = "vigil.alerts.v1"
    partition: int = 0


class FakeConsumer:
    """Hands out one batch, then sets ``stop``; commits go to the shared journal."""

    def __init__(self, batch: dict[Any, list[Record]], stop: asyncio.Event, journal: list[str]):
        self._batches = [batch]
        self._stop = stop
        self._journal = journal
        self.commits: list[dict[Any, int]] = []

    async def getmany(self, *, timeout_ms: int) -> dict[Any, list[Record]]:
        if not self._batches:
            self._stop.set()
            return {}
        return self._batches.pop(0)

    async def commit(self, offsets: dict[Any, int]) -> None:
        self._journal.append("commit")
        self.commits.append(offsets)


async def test_offsets_are_committed_after_pages_and_attempts_are_stored() -> None:
    """The commit follows the page row and its attempt; a bad record is dead-lettered first."""
    r = rig()
    stop = asyncio.Event()
    partition = ("vigil.alerts.v1", 0)
    consumer = FakeConsumer(
        {
            partition: [
                Record(encode(alert()), offset=41),
                Record(b'{"schema": "vigil.alert.v1", "title": "Fever 38.6"}', offset=42),
            ]
        },
        stop,
        r.journal,
    )

    await consume_alerts(consumer, r.dispatcher, r.publisher, stop, clock=lambda: T0)

    assert r.journal == ["alert:start", "page", "attempt:sent", "commit"]
    assert consumer.commits == [{partition: 43}]
    (letter,) = r.publisher.dead_letters
    assert letter.reason == "invalid_alert"
    assert "38.6" not in letter.detail
