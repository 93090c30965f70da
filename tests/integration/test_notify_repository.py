"""The notify PostgreSQL repository (and the dispatcher on top of it) against a real database.

Runs against the test stack's PostgreSQL (``pg_dsn`` from conftest); the migrations are applied
here too (idempotently). Every test uses its
own patient, alert and page ids, so tests share a database without seeing each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import asyncpg
import pytest

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    DeliveryAttempt,
    DeliveryStatus,
    Evidence,
)
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.domain import UNASSIGNED_CARE_TEAM, PageOrder, Route, decide
from services.notify.service_layer.dispatcher import PageDispatcher, PagingPolicy
from services.notify.service_layer.ports import SendOutcome
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

FALLBACK = "vigil-oncall-fallback@localhost"
T0 = datetime(2025, 3, 1, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    await apply_migrations(pg_dsn)
    connections = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield connections
    finally:
        await connections.close()


@pytest.fixture
def repository(pool: Any) -> PostgresNotifyRepository:
    return PostgresNotifyRepository(pool)


def _tag() -> str:
    return uuid.uuid4().hex[:10]


async def _care_team_with_patient(pool: Any, oncall_email: str) -> tuple[str, str]:
    tag = _tag()
    team, patient = f"CT-{tag}", f"P-{tag}"
    await pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, $2, $3)",
        team,
        "Paediatric oncology",
        oncall_email,
    )
    await pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
    )
    return team, patient


def _alert(patient_id: str, phase: AlertPhase = AlertPhase.START) -> Alert:
    return Alert(
        alert_id=uuid.uuid4(),
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
        ingest_time=T0 + timedelta(seconds=2),
        evidence=(
            Evidence(
                name="temperature",
                value=38.6,
                unit="°C",
                limit=38.3,
                comparator=">=",
                device_time=T0,
                message_id=uuid.uuid4(),
            ),
        ),
        rule_id="fever.single",
        rule_version="2025.03.1",
    )


async def _queue(repository: PostgresNotifyRepository, alert: Alert) -> PageOrder:
    """Record the alert and queue the page ``decide`` asks for, as the dispatcher does."""
    await repository.record_alert(alert)
    decision = decide(
        alert,
        oncall=await repository.find_oncall(alert.patient_id),
        thread=await repository.find_thread_root(alert.dedup_key),
        fallback_email=FALLBACK,
    )
    assert isinstance(decision, PageOrder)
    stored = await repository.insert_page(
        decision.to_page(alert, created_at=T0),
        route=decision.route,
        route_detail=decision.route_detail,
    )
    assert stored.new
    return decision


ACCEPTED = SendOutcome(accepted=True, detail="250 ok", reply_code=250)


class ScriptedSender:
    """Answers sends with the given outcomes in order, then with ``then``; keeps what was sent."""

    def __init__(self, *outcomes: SendOutcome, then: SendOutcome = ACCEPTED) -> None:
        self._outcomes = list(outcomes)
        self._then = then
        self.sent: list[tuple[str, EmailMessage]] = []

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        self.sent.append((recipient, message))
        return self._outcomes.pop(0) if self._outcomes else self._then


class CollectingPublisher:
    def __init__(self) -> None:
        self.attempts: list[DeliveryAttempt] = []

    async def publish_attempt(self, attempt: DeliveryAttempt) -> None:
        self.attempts.append(attempt)


def _dispatcher(
    repository: PostgresNotifyRepository, sender: ScriptedSender, publisher: CollectingPublisher
) -> PageDispatcher:
    return PageDispatcher(
        repository=repository,
        sender=sender,
        publisher=publisher,
        policy=PagingPolicy(sender_address="vigil-pages@localhost", fallback_email=FALLBACK),
        clock=lambda: T0,
    )


async def test_alert_record_is_idempotent(repository: PostgresNotifyRepository) -> None:
    """Recording the same alert phase twice stores it once and says the second was not new."""
    alert = _alert(f"P-{_tag()}")
    assert await repository.record_alert(alert) is True
    assert await repository.record_alert(alert) is False


async def test_page_insert_is_idempotent_under_the_same_key(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """A second insert with the same idempotency key is not new and leaves one row."""
    _, patient = await _care_team_with_patient(pool, "oncall@hospital.example")
    alert = _alert(patient)
    order = await _queue(repository, alert)

    again = await repository.insert_page(
        order.to_page(alert, created_at=T0 + timedelta(minutes=5)),
        route=order.route,
        route_detail=None,
    )

    assert again.new is False
    assert again.page_id == order.page_id
    assert again.status is DeliveryStatus.QUEUED
    count = await pool.fetchval(
        "SELECT count(*) FROM pages WHERE idempotency_key = $1", order.idempotency_key
    )
    assert count == 1


async def test_oncall_lookup_and_thread_root(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """The patient's team and address are found; the start page is the root of later phases."""
    team, patient = await _care_team_with_patient(pool, "oncall@hospital.example")
    oncall = await repository.find_oncall(patient)
    assert oncall is not None
    assert (oncall.care_team_id, oncall.email) == (team, "oncall@hospital.example")
    assert await repository.find_oncall(f"P-{_tag()}") is None

    start = _alert(patient)
    assert await repository.find_thread_root(start.dedup_key) is None
    start_order = await _queue(repository, start)
    escalate = _alert(patient, AlertPhase.ESCALATE)
    await _queue(repository, escalate)

    root = await repository.find_thread_root(start.dedup_key)
    assert root is not None
    assert root.idempotency_key == start_order.idempotency_key
    assert (root.recipient, root.care_team_id, root.route) == (
        "oncall@hospital.example",
        team,
        Route.CARE_TEAM,
    )


async def test_unknown_patient_goes_to_the_fallback(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """An alert for an unregistered patient leaves a page row to the fallback address, with why.

    The fallback relay is down too, so the row stays 'failed' and waits for a retry.
    """
    alert = _alert(f"P-unknown-{_tag()}")
    sender = ScriptedSender(SendOutcome(accepted=False, detail="ConnectionRefusedError"))
    publisher = CollectingPublisher()

    await _dispatcher(repository, sender, publisher).handle_alert(alert)

    row = await pool.fetchrow(
        "SELECT recipient, care_team_id, route, route_detail, status FROM pages"
        " WHERE alert_id = $1",
        alert.alert_id,
    )
    assert row is not None, "the alert vanished: no page row"
    assert row["recipient"] == FALLBACK
    assert row["care_team_id"] == UNASSIGNED_CARE_TEAM
    assert row["route"] == "fallback"
    assert alert.patient_id in row["route_detail"]
    assert row["status"] == "failed"
    assert [recipient for recipient, _ in sender.sent] == [FALLBACK]
    assert [a.status for a in publisher.attempts] == [DeliveryStatus.FAILED]


async def test_attempts_are_numbered_and_sent_is_not_undone_by_a_late_failure(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """Attempts count 1, 2, 3 per page; once sent, a later failed attempt keeps the page sent."""
    _, patient = await _care_team_with_patient(pool, "oncall@hospital.example")
    order = await _queue(repository, _alert(patient))

    numbers = []
    for status in (DeliveryStatus.FAILED, DeliveryStatus.SENT, DeliveryStatus.FAILED):
        numbers.append(
            await repository.record_attempt(
                order.page_id,
                channel="email",
                recipient=order.recipient,
                status=status,
                at=T0,
                detail="test",
                provider_message_id=None,
            )
        )

    assert numbers == [1, 2, 3]
    assert await repository.page_status(order.page_id) is DeliveryStatus.SENT


async def test_resume_lists_pages_whose_send_never_succeeded(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """Queued and failed pages are listed with their alert rebuilt; a sent page is not."""
    _, patient = await _care_team_with_patient(pool, "oncall@hospital.example")
    never_tried_alert = _alert(patient)
    never_tried = await _queue(repository, never_tried_alert)
    failed = await _queue(repository, _alert(patient, AlertPhase.ESCALATE))
    sent = await _queue(repository, _alert(patient, AlertPhase.END))
    for order, status in ((failed, DeliveryStatus.FAILED), (sent, DeliveryStatus.SENT)):
        await repository.record_attempt(
            order.page_id,
            channel="email",
            recipient=order.recipient,
            status=status,
            at=T0,
            detail=None,
            provider_message_id=None,
        )

    listed = {
        item.page.page_id: item
        for item in await repository.undelivered_pages()
        if item.page.patient_id == patient
    }

    assert set(listed) == {never_tried.page_id, failed.page_id}
    assert listed[never_tried.page_id].attempts_made == 0
    assert listed[failed.page_id].attempts_made == 1
    assert listed[never_tried.page_id].alert == never_tried_alert
    assert listed[never_tried.page_id].page.idempotency_key == never_tried.idempotency_key


async def test_dispatcher_resume_resends_a_page_left_by_a_crash(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """A page queued before a crash is sent after start-up and then no longer listed."""
    _, patient = await _care_team_with_patient(pool, "oncall@hospital.example")
    order = await _queue(repository, _alert(patient))
    sender = ScriptedSender()
    dispatcher = _dispatcher(repository, sender, CollectingPublisher())

    await dispatcher.resume()
    await dispatcher.deliver_due()

    assert (order.recipient, order.page_id) in {
        (recipient, uuid.UUID(message["X-Vigil-Page-Id"])) for recipient, message in sender.sent
    }
    assert await repository.page_status(order.page_id) is DeliveryStatus.SENT
    assert order.page_id not in {item.page.page_id for item in await repository.undelivered_pages()}
