"""Operations surface of notify: its Prometheus metrics, its readiness, and the observers that
feed them.

``NotifyMetrics`` owns every metric object (own registry) and the bookkeeping between an
alert's arrival and its first delivery attempt. The observers are thin wrappers the composition
root puts around the real adapters, so the paging code itself (``service_layer``) knows nothing
about metrics:

- ``ObservedAlertHandler`` / ``ObservedDeadLetters``: alerts received, records dead-lettered;
- ``ObservedUnitOfWork`` (``observed_unit_of_work``, the units of work the escalation service
  is given): attempts, pages sent and failovers of escalation pages (from
  ``outbox.record_outcomes``; every page is an escalation page, including the fallback chain
  of an alert no policy covers), delivery receipts, acknowledgements, heartbeat ages, alerts
  not paged for a patient discharged or past the end of infusion;
- ``poll_database``: the open-escalation count, and whether the database answers.

No label ever carries a patient id, device id, recipient or page content: label values are
channels, statuses, purposes, priorities, alert kinds and phases, acknowledgement routes, and
heartbeat sources (pipeline components such as ``heartbeat-pipeline``, not patients' devices).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.events import Alert, DeadLetter
from services.notify.adapters.postgres.escalations import PostgresEscalations
from services.notify.adapters.postgres.heartbeats import PostgresHeartbeats
from services.notify.adapters.postgres.outbox import PostgresOutbox
from services.notify.adapters.postgres.unit_of_work import PostgresUnitOfWork
from services.notify.domain.channel_failover import AttemptVerdict, GiveUp, NextChannel
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    Acknowledge,
    PolicySnapshot,
)
from services.notify.service_layer.ports import PageJob, SendOutcome
from services.notify.service_layer.unit_of_work import EscalationRecord, UnitOfWorkFactory
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify.ops")

# Alert arrival to first attempt: tens of milliseconds for a patient's first alert; up to
# group_wait (5 s by default) for an alert held in a burst's follow-up page.
_FIRST_ATTEMPT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
    300.0,
)
# Page to acknowledgement: minutes, at 3 a.m.
_ACK_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
# Alerts whose first attempt is still awaited; bounded so alerts that never page (recorded
# phases, heartbeats, other instances' pages) cannot grow it without end.
_MAX_AWAITED = 10_000


class NotifyMetrics:
    """Every metric notify exports, all prefixed ``vigil_notify_``."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._awaiting_first: OrderedDict[UUID, float] = OrderedDict()
        self._heartbeats: dict[str, datetime] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.alerts_received = Counter(
            "vigil_notify_alerts_received",
            "Alert records read from Kafka and handled, by kind, priority and phase.",
            ["kind", "priority", "phase"],
            registry=r,
        )
        self.dead_letters = Counter(
            "vigil_notify_dead_letters",
            "Alert records that could not be read, dead-lettered, by reason.",
            ["reason"],
            registry=r,
        )
        self.pages_sent = Counter(
            "vigil_notify_pages_sent",
            "Pages the provider accepted (mail server, Twilio, PagerDuty), by channel.",
            ["channel"],
            registry=r,
        )
        self.attempts = Counter(
            "vigil_notify_delivery_attempts",
            "Delivery attempts and receipts, by channel and status (sent, failed, unknown, "
            "delivered).",
            ["channel", "status"],
            registry=r,
        )
        self.failovers = Counter(
            "vigil_notify_failovers",
            "Pages handed on after their channel failed for good: to the person's next contact "
            "method (next_channel) or, none left, given up to the escalation (gave_up).",
            ["channel", "outcome"],
            registry=r,
        )
        self.not_paged = Counter(
            "vigil_notify_alerts_not_paged",
            "New alerts recorded without paging anyone because the patient was discharged "
            "(or, a pump's alert, their infusion had ended) by the alert's device time, by why "
            "(discharged, infusion_ended).",
            ["why"],
            registry=r,
        )
        self.open_escalations = Gauge(
            "vigil_notify_open_escalations",
            "Escalations still open (not acknowledged, resolved or exhausted), all instances.",
            registry=r,
        )
        self.first_attempt_seconds = Histogram(
            "vigil_notify_first_attempt_seconds",
            "From an alert's arrival in this process to the first delivery attempt of a page "
            "about it (includes the bundling window).",
            buckets=_FIRST_ATTEMPT_BUCKETS,
            registry=r,
        )
        self.ack_seconds = Histogram(
            "vigil_notify_ack_seconds",
            "From an escalation's opening to its acknowledgement, by route (api, link, sms).",
            ["via"],
            buckets=_ACK_BUCKETS,
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "vigil_notify_heartbeat_age_seconds",
            "Wall clock minus the device time of the last pipeline heartbeat, per source.",
            ["source"],
            registry=r,
        )

    # -- alert arrival and first attempt ------------------------------------------------------

    def alert_received(self, alert: Alert) -> None:
        self.alerts_received.labels(alert.kind.value, alert.priority.value, alert.phase.value).inc()
        self._remember(self._awaiting_first, alert.alert_id, self._monotonic())

    def _first_attempt_of(self, alert_ids: Iterable[UUID]) -> None:
        now = self._monotonic()
        for alert_id in alert_ids:
            arrived = self._awaiting_first.pop(alert_id, None)
            if arrived is not None:
                self.first_attempt_seconds.observe(max(0.0, now - arrived))

    @staticmethod
    def _remember(table: OrderedDict[UUID, Any], key: UUID, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > _MAX_AWAITED:
            table.popitem(last=False)

    # -- attempts -----------------------------------------------------------------------------

    def escalation_outcomes(
        self, outcomes: Iterable[tuple[PageJob, SendOutcome, AttemptVerdict, str]]
    ) -> None:
        """The recorded outcomes of a batch of escalation pages."""
        for job, outcome, verdict, status in outcomes:
            channel = job.page.channel
            self.attempts.labels(channel, status).inc()
            if outcome.accepted:
                self.pages_sent.labels(channel).inc()
            if isinstance(verdict, NextChannel):
                self.failovers.labels(channel, "next_channel").inc()
            elif isinstance(verdict, GiveUp):
                self.failovers.labels(channel, "gave_up").inc()
            self._first_attempt_of(a.alert_id for a in (job.bundle or (job.alert,)))

    def receipt(self, channel: str, status: str) -> None:
        self.attempts.labels(channel, status).inc()

    # -- acknowledgement and heartbeats -------------------------------------------------------

    def acknowledged(self, via: str, opened_at: datetime, at: datetime) -> None:
        self.ack_seconds.labels(via).observe(max(0.0, (at - opened_at).total_seconds()))

    def heartbeats_seen(
        self, rows: Iterable[tuple[str, datetime, datetime | None]], now: Callable[[], datetime]
    ) -> None:
        """Track each source's last heartbeat; its age is computed at every scrape."""
        for source, last_seen, _silent_since in rows:
            if source not in self._heartbeats:

                def age(source: str = source) -> float:
                    return (now() - self._heartbeats[source]).total_seconds()

                self.heartbeat_age.labels(source).set_function(age)
            self._heartbeats[source] = last_seen


@dataclass
class NotifyReadiness:
    """What ``/readyz`` is decided from: the database answered the last poll, and the alert
    consumer has partitions assigned."""

    database_ok: bool = False
    consumer_assigned: Callable[[], bool] = lambda: False

    def check(self) -> tuple[bool, str]:
        if not self.database_ok:
            return False, "database not answering"
        if not self.consumer_assigned():
            return False, "alert consumer has no partition assigned"
        return True, "ready"


# -- observers the composition root wraps around the real adapters ------------------------------


class ObservedAlertHandler:
    """Counts every alert before handing it on (``app.AlertHandler``)."""

    def __init__(self, inner: Any, metrics: NotifyMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def handle_alert(self, alert: Alert) -> None:
        self._metrics.alert_received(alert)
        await self._inner.handle_alert(alert)


class ObservedDeadLetters:
    """Counts dead letters before publishing them (``app.DeadLetterSink``)."""

    def __init__(self, inner: Any, metrics: NotifyMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def publish_dead_letter(self, letter: DeadLetter) -> None:
        await self._inner.publish_dead_letter(letter)
        self._metrics.dead_letters.labels(letter.reason).inc()


def observed_unit_of_work(
    pool: Any,
    metrics: NotifyMetrics,
    *,
    now: Callable[[], datetime],
    fallback_email: str = DEFAULT_FALLBACK_EMAIL,
) -> UnitOfWorkFactory:
    """Units of work over ``pool`` that report what they record to ``metrics``
    (``ObservedUnitOfWork``): what the composition root gives the service layer when metrics
    are on."""

    def unit_of_work(*, transaction: bool = True) -> ObservedUnitOfWork:
        return ObservedUnitOfWork(
            pool, metrics, now=now, fallback_email=fallback_email, transaction=transaction
        )

    return unit_of_work


class ObservedUnitOfWork(PostgresUnitOfWork):
    """A PostgreSQL unit of work that reports to ``NotifyMetrics`` what its repositories
    recorded once it is durable (at its commit; at once without a transaction): attempts,
    pages sent and failovers of escalation pages (``outbox.record_outcomes``; every page is an
    escalation page, including the fallback chain of an alert no policy covers), delivery
    receipts, acknowledgements (their latency from the escalation's opening); and the
    heartbeat ages it reads."""

    def __init__(
        self, pool: Any, metrics: NotifyMetrics, *, now: Callable[[], datetime], **kwargs: Any
    ) -> None:
        super().__init__(pool, **kwargs)
        self._metrics = metrics
        self._now = now
        self._pending: list[Callable[[NotifyMetrics], None]] = []

    async def __aenter__(self) -> ObservedUnitOfWork:
        await super().__aenter__()
        self.escalations = _ObservedEscalations(
            self._conn, self._report, fallback_email=self._fallback_email
        )
        self.outbox = _ObservedOutbox(self._conn, self._report, fallback_email=self._fallback_email)
        self.heartbeats = _ObservedHeartbeats(self._conn, self._metrics, self._now)
        return self

    def _report(self, report: Callable[[NotifyMetrics], None]) -> None:
        if self._transactional:
            self._pending.append(report)
        else:
            report(self._metrics)

    async def commit(self, *, durable: bool = True) -> None:
        await super().commit(durable=durable)
        pending, self._pending[:] = list(self._pending), []
        for report in pending:
            report(self._metrics)

    async def rollback(self) -> None:
        self._pending.clear()
        await super().rollback()


#: Hands a report to the unit of work, for when what it observed is durable.
_Report = Callable[[Callable[[NotifyMetrics], None]], None]


class _ObservedEscalations(PostgresEscalations):
    """Notes the acknowledgement of the escalation an event was applied to (not the other
    escalations of its bundle acknowledged with it), for its latency once committed."""

    def __init__(self, db: Any, report: _Report, **kwargs: Any) -> None:
        super().__init__(db, **kwargs)
        self._report = report
        self._named: UUID | None = None

    async def lock(
        self, escalation_id: UUID, *, whole_bundle: bool = False
    ) -> list[EscalationRecord]:
        self._named = escalation_id
        return await super().lock(escalation_id, whole_bundle=whole_bundle)

    async def add_not_paged(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        reason: str,
        at: datetime,
    ) -> UUID | None:
        escalation_id = await super().add_not_paged(
            alert, care_team_id=care_team_id, snapshot=snapshot, reason=reason, at=at
        )
        if escalation_id is not None:
            why = reason.replace(" ", "_")
            self._report(lambda metrics: metrics.not_paged.labels(why).inc())
        return escalation_id

    async def record_acknowledged(
        self, record: EscalationRecord, event: Acknowledge, *, at: datetime
    ) -> None:
        await super().record_acknowledged(record, event, at=at)
        if record.escalation_id == self._named:
            via, opened_at = event.via, record.opened_at
            self._report(lambda metrics: metrics.acknowledged(via, opened_at, at))


class _ObservedOutbox(PostgresOutbox):
    """Notes the outcomes of delivery attempts and the delivery receipts it records."""

    def __init__(self, db: Any, report: _Report, **kwargs: Any) -> None:
        super().__init__(db, **kwargs)
        self._report = report

    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None:
        await super().record_outcomes(outcomes, at=at)
        recorded = list(outcomes)
        self._report(lambda metrics: metrics.escalation_outcomes(recorded))

    async def record_receipt(self, job: PageJob, *, status: str, at: datetime) -> None:
        await super().record_receipt(job, status=status, at=at)
        channel = job.page.channel
        self._report(lambda metrics: metrics.receipt(channel, status))


class _ObservedHeartbeats(PostgresHeartbeats):
    """Reports the age of every heartbeat source it reads."""

    def __init__(self, db: Any, metrics: NotifyMetrics, now: Callable[[], datetime]) -> None:
        super().__init__(db)
        self._metrics = metrics
        self._now = now

    async def heartbeats(self) -> list[tuple[str, datetime, datetime | None]]:
        rows = await super().heartbeats()
        self._metrics.heartbeats_seen(rows, self._now)
        return rows


async def poll_database(
    pool: Any,
    metrics: NotifyMetrics,
    readiness: NotifyReadiness,
    stop: asyncio.Event,
    *,
    interval_s: float = 5.0,
) -> None:
    """Every ``interval_s``: count open escalations; whether that worked is the database half
    of readiness."""
    while not stop.is_set():
        try:
            count = await asyncio.wait_for(
                pool.fetchval("SELECT count(*) FROM escalations WHERE status = 'open'"),
                timeout=interval_s,
            )
        except Exception as error:
            if readiness.database_ok:
                log.error("notify_database_unready", extra=log_fields(error=repr(error)))
            readiness.database_ok = False
        else:
            metrics.open_escalations.set(int(count))
            readiness.database_ok = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
