"""Notify's metric objects and observers (``services/notify/adapters/metrics.py``): what each
observation moves, the alert-to-first-attempt latency, and that no label carries an id."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from schemas.events import (
    Alert,
    AlertPhase,
    AlertState,
    DeadLetter,
    Page,
)
from services.notify.adapters.metrics import (
    NotifyMetrics,
    NotifyReadiness,
    ObservedAlertHandler,
    ObservedDeadLetters,
)
from services.notify.domain.channel_failover import Delivered, GiveUp, NextChannel, RetryLater
from services.notify.domain.routing import PagePurpose
from services.notify.service_layer.ports import PageJob, SendOutcome
from services.notify.settings import NotifySettings
from tests.factories import make_alert
from tests.ops_scrape import Samples, label_values, parse, value

T0 = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
PATIENT, DEVICE = "P-metrics-7781", "thermo-metrics-7781"


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def alert(phase: AlertPhase = AlertPhase.START) -> Alert:
    return make_alert(
        patient_id=PATIENT,
        code="fever_single",
        phase=phase,
        at=T0,
        alert_id=uuid.uuid4(),
        dedup_key=f"{PATIENT}:fever",
        device_id=DEVICE,
        state=AlertState.ACTIVE,
        evidence=(),
        rule_id="fever",
    )


def page(of: Alert, channel: str = "email") -> Page:
    return Page(
        page_id=uuid.uuid4(),
        alert_id=of.alert_id,
        dedup_key=of.dedup_key,
        patient_id=of.patient_id,
        care_team_id="CT-metrics",
        channel=channel,
        recipient="nurse@h.test",
        idempotency_key=uuid.uuid4().hex,
        created_at=T0,
    )


def job(of: Alert, channel: str = "email", *, bundle: tuple[Alert, ...] = ()) -> PageJob:
    return PageJob(
        page=page(of, channel),
        alert=of,
        escalation_id=uuid.uuid4(),
        recipient_ref="person:nurse",
        contact_rank=0,
        purpose=PagePurpose.ALERT,
        tries=0,
        was_sending=False,
        has_next_channel=True,
        claimed_at=T0,
        updated_at=None,
        bundle=bundle,
    )


def samples(metrics: NotifyMetrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


class Recorder:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.letters: list[DeadLetter] = []

    async def handle_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)

    async def publish_dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)


async def test_received_alerts_are_counted_and_handed_on() -> None:
    """The observing handler counts by kind, priority and phase, then calls the real one."""
    metrics, inner = NotifyMetrics(), Recorder()
    first = alert()
    await ObservedAlertHandler(inner, metrics).handle_alert(first)
    assert inner.alerts == [first]
    labels = {"kind": "physiological", "priority": "high", "phase": "start"}
    assert value(samples(metrics), "vigil_notify_alerts_received_total", **labels) == 1.0


async def test_dead_letters_are_published_then_counted_by_reason() -> None:
    """A dead letter still reaches the sink, and its reason code is the only label."""
    metrics, inner = NotifyMetrics(), Recorder()
    letter = DeadLetter.for_payload(
        reason="invalid_alert",
        detail="x",
        service="notify",
        source_topic="vigil.alerts.v1",
        received_at=T0,
        payload=b"{",
    )
    await ObservedDeadLetters(inner, metrics).publish_dead_letter(letter)
    assert inner.letters == [letter]
    page_ = samples(metrics)
    assert value(page_, "vigil_notify_dead_letters_total", reason="invalid_alert") == 1.0


def test_escalation_outcomes_count_attempts_pages_and_failovers() -> None:
    """Accepted: an attempt 'sent' and a page sent. Failed with a retry left: an attempt
    'failed' only. Failed for good: a failover to the next channel, or given up."""
    metrics = NotifyMetrics()
    a = alert()
    metrics.escalation_outcomes(
        [
            (job(a, "sms"), SendOutcome(accepted=True, detail="ok"), Delivered(), "sent"),
            (job(a, "email"), SendOutcome(accepted=False, detail="421"), RetryLater(2), "failed"),
            (job(a, "sms"), SendOutcome(accepted=False, detail="x"), NextChannel("p"), "failed"),
            (job(a, "webhook"), SendOutcome(accepted=False, detail="x"), GiveUp("p"), "failed"),
        ]
    )
    s = samples(metrics)
    assert value(s, "vigil_notify_delivery_attempts_total", channel="sms", status="sent") == 1
    assert value(s, "vigil_notify_delivery_attempts_total", channel="sms", status="failed") == 1
    assert value(s, "vigil_notify_delivery_attempts_total", channel="email", status="failed") == 1
    assert value(s, "vigil_notify_pages_sent_total", channel="sms") == 1
    assert value(s, "vigil_notify_pages_sent_total", channel="email") == 0
    assert value(s, "vigil_notify_failovers_total", channel="sms", outcome="next_channel") == 1
    assert value(s, "vigil_notify_failovers_total", channel="webhook", outcome="gave_up") == 1
    assert value(s, "vigil_notify_failovers_total", channel="email", outcome="next_channel") == 0


def test_first_attempt_latency_is_observed_once_per_alert_from_its_arrival() -> None:
    """The latency runs from the alert's arrival to the first attempt of any page about it;
    later attempts (other recipients, retries) do not observe it again."""
    clock = Monotonic()
    metrics = NotifyMetrics(monotonic=clock)
    a = alert()
    metrics.alert_received(a)
    clock.now += 5.5
    sent = SendOutcome(accepted=True, detail="ok")
    metrics.escalation_outcomes([(job(a), sent, Delivered(), "sent")])
    clock.now += 60
    metrics.escalation_outcomes([(job(a), sent, Delivered(), "sent")])
    s = samples(metrics)
    assert value(s, "vigil_notify_first_attempt_seconds_count") == 1
    assert value(s, "vigil_notify_first_attempt_seconds_sum") == 5.5


def test_a_bundle_page_is_the_first_attempt_of_every_alert_it_lists() -> None:
    """One page listing three alerts observes three latencies, each from its own arrival."""
    clock = Monotonic()
    metrics = NotifyMetrics(monotonic=clock)
    burst = [alert(), alert(), alert()]
    for a in burst:
        metrics.alert_received(a)
        clock.now += 1.0
    metrics.escalation_outcomes(
        [(job(burst[0], bundle=tuple(burst)), SendOutcome(True, "ok"), Delivered(), "sent")]
    )
    s = samples(metrics)
    assert value(s, "vigil_notify_first_attempt_seconds_count") == 3
    assert value(s, "vigil_notify_first_attempt_seconds_sum") == 3.0 + 2.0 + 1.0


def test_alerts_that_never_page_do_not_pile_up_without_bound() -> None:
    """Arrivals awaiting a first attempt are capped: the oldest are forgotten first."""
    metrics = NotifyMetrics()
    first = alert()
    metrics.alert_received(first)
    for _ in range(10_000):
        metrics.alert_received(alert())
    metrics.escalation_outcomes([(job(first), SendOutcome(True, "ok"), Delivered(), "sent")])
    assert value(samples(metrics), "vigil_notify_first_attempt_seconds_count") == 0


def test_ack_latency_and_heartbeat_age() -> None:
    """Acknowledgement latency is observed by route; a heartbeat source's age is the clock
    minus its last device time, computed when scraped."""
    metrics = NotifyMetrics()
    metrics.acknowledged("link", T0, T0 + timedelta(minutes=7))
    clock = {"now": T0 + timedelta(seconds=40)}
    metrics.heartbeats_seen([("heartbeat-pipeline", T0, None)], lambda: clock["now"])
    s = samples(metrics)
    assert value(s, "vigil_notify_ack_seconds_sum", via="link") == 420.0
    assert value(s, "vigil_notify_heartbeat_age_seconds", source="heartbeat-pipeline") == 40.0
    clock["now"] += timedelta(seconds=20)
    metrics.heartbeats_seen([("heartbeat-pipeline", T0 + timedelta(seconds=55), None)], lambda: T0)
    s = samples(metrics)
    assert value(s, "vigil_notify_heartbeat_age_seconds", source="heartbeat-pipeline") == 5.0


async def test_no_label_value_is_a_patient_or_device_id() -> None:
    """After every kind of observation about a patient's alert, neither the patient id nor the
    device id (nor the recipient) appears in any label value."""
    clock = Monotonic()
    metrics = NotifyMetrics(monotonic=clock)
    a = alert()
    await ObservedAlertHandler(Recorder(), metrics).handle_alert(a)
    metrics.escalation_outcomes([(job(a, "email"), SendOutcome(True, "ok"), Delivered(), "sent")])
    metrics.escalation_outcomes([(job(a, "sms"), SendOutcome(False, "x"), NextChannel("p"), "f")])
    metrics.receipt("sms", "delivered")
    metrics.acknowledged("sms", T0, T0)
    values = label_values(samples(metrics))
    assert values, "the observations above must have created labelled series"
    for forbidden in (PATIENT, DEVICE, "nurse@h.test"):
        assert not any(forbidden in v for v in values), forbidden


def test_readiness_needs_the_database_and_an_assigned_consumer() -> None:
    """Ready only while the last database poll succeeded and the consumer has partitions."""
    ready = NotifyReadiness()
    assert ready.check()[0] is False
    ready.database_ok = True
    assert ready.check() == (False, "alert consumer has no partition assigned")
    ready.consumer_assigned = lambda: True
    assert ready.check() == (True, "ready")
    ready.database_ok = False
    assert ready.check()[0] is False


def test_ops_port_defaults_to_9103_and_accepts_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """VIGIL_NOTIFY_OPS_PORT: 9103 by default, 0 asks for a free port."""
    monkeypatch.delenv("VIGIL_NOTIFY_OPS_PORT", raising=False)
    assert NotifySettings().ops_port == 9103
    monkeypatch.setenv("VIGIL_NOTIFY_OPS_PORT", "0")
    assert NotifySettings().ops_port == 0
