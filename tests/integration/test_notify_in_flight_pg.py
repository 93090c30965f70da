"""The delivery log never contradicts the mailbox: a page in flight when notify stops.

Real PostgreSQL, a real SMTP server (aiosmtpd), a Twilio-shaped server, and the care team set up
and the timeline read through notify's service layer. notify is "killed" right after the
provider accepted a page and before the outcome was written (its outbox's ``record_outcomes``
raises, as in test_notify_escalation.py); a new instance over the same database takes the page
when the lease runs out.

The clock starts at the wall clock's now, so a page's lease also runs out on the wall clock only
after 30 s: another notify sharing the test database (an end-to-end test's) does not take these
pages while a test runs.
"""

from __future__ import annotations

import email
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import asyncpg
import pytest

from schemas.events import Alert, AlertPhase
from services.notify.adapters.postgres.outbox import PostgresOutbox
from services.notify.adapters.postgres.unit_of_work import (
    PostgresUnitOfWork,
)
from services.notify.adapters.smtp import SmtpSender
from services.notify.service_layer.escalation import EscalationService
from services.notify.service_layer.ports import SendOutcome
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from tests.factories import fever_evidence, make_alert
from tests.support.escalation import escalation_service, smtp_sender, twilio_sms
from tests.support.notify import ManualClock, SmtpSink, TwilioLikeServer
from tests.support.notify_desk import NotifyDesk
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

LEASE_S = 30


class Killed(Exception):
    """notify dies: after the provider accepted, before the outcome is written."""


class KilledOutbox(PostgresOutbox):
    async def record_outcomes(self, *args: Any, **kwargs: Any) -> None:
        raise Killed("killed after the provider accepted, before the write")


class KilledUnitOfWork(PostgresUnitOfWork):
    """A unit of work whose outbox dies before it records what the provider answered."""

    async def __aenter__(self) -> KilledUnitOfWork:
        await super().__aenter__()
        self.outbox = KilledOutbox(self._conn, fallback_email=self._fallback_email)
        return self


def killed_unit_of_work(pool: Any) -> UnitOfWorkFactory:
    def unit_of_work(*, transaction: bool = True) -> PostgresUnitOfWork:
        return KilledUnitOfWork(pool, transaction=transaction)

    return unit_of_work


class WatchedSender:
    """The real SMTP sender, noting the page's delivery attempts as the database holds them at
    the moment of the hand-over (read on another connection: only what was committed)."""

    def __init__(self, inner: SmtpSender, pool: Any) -> None:
        self._inner = inner
        self._pool = pool
        self.seen_at_handover: list[list[tuple[int, str]]] = []

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        rows = await self._pool.fetch(
            "SELECT d.attempt, d.status FROM delivery_attempts d JOIN pages p USING (page_id) "
            "WHERE p.recipient = $1 AND p.purpose = 'alert' ORDER BY d.attempt",
            recipient,
        )
        self.seen_at_handover.append([(r["attempt"], r["status"]) for r in rows])
        return await self._inner.send(message, recipient=recipient)


@dataclass
class World:
    pool: Any
    clock: ManualClock
    smtp: SmtpSink
    twilio: TwilioLikeServer
    tag: str
    # The e-mail provider each instance was given, by the instance's id.
    senders: dict[int, WatchedSender] = field(default_factory=dict)

    @property
    def desk(self) -> NotifyDesk:
        """The care team's registry and alert timelines, through notify's service layer."""
        return NotifyDesk(self.pool, clock=self.clock)

    @property
    def team(self) -> str:
        return f"CT-{self.tag}"

    @property
    def patient(self) -> str:
        return f"P-{self.tag}"

    @property
    def nurse_email(self) -> str:
        return f"nurse-{self.tag}@h.test"

    def instance(self, unit_of_work: UnitOfWorkFactory | None = None) -> EscalationService:
        """One notify process over the shared database (a new one is a restart)."""
        sender = WatchedSender(smtp_sender(self.smtp.port), self.pool)
        service = escalation_service(
            self.pool,
            self.clock,
            email=sender,
            sms=twilio_sms(self.twilio),
            ack_secret=b"in-flight-test-ack-secret-0123456789",
            unit_of_work=unit_of_work,
            max_tries_per_channel=2,
            retry_base_s=1,
            retry_cap_s=4,
            send_lease_s=LEASE_S,
        )
        self.senders[id(service)] = sender
        return service

    def sender_of(self, service: EscalationService) -> WatchedSender:
        return self.senders[id(service)]


@pytest.fixture
async def world(pg_dsn: str) -> AsyncIterator[World]:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=8)
    tag = uuid.uuid4().hex[:8]
    try:
        with SmtpSink() as smtp, TwilioLikeServer() as twilio:
            clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
            yield World(pool, clock, smtp, twilio, tag)
    finally:
        # Stop this test's chains: tickers of other tests share the table.
        await pool.execute(
            """
            WITH closed AS (
                UPDATE escalations SET status = 'resolved', due_at = NULL
                WHERE care_team_id = $1 RETURNING escalation_id
            )
            UPDATE pages SET status = 'cancelled', next_attempt_at = NULL
            WHERE escalation_id IN (SELECT escalation_id FROM closed)
              AND status IN ('queued', 'failed')
            """,
            f"CT-{tag}",
        )
        await pool.close()


async def _team(world: World, methods: list[dict[str, str]]) -> None:
    """A care team whose one-step policy pages the nurse (``methods``) every 5 min."""
    await world.desk.care_team(world.team, oncall_email=f"oncall-{world.tag}@h.test")
    await world.desk.person(
        f"nurse-{world.tag}", name="nurse", care_team_id=world.team, contact_methods=methods
    )
    await world.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)",
        world.patient,
        world.team,
    )
    await world.desk.policy(
        world.team,
        {
            "policy_id": f"pol-{world.tag}",
            "name": "onc",
            "steps": [
                {"targets": [{"kind": "person", "ref": f"nurse-{world.tag}"}], "wait_minutes": 5}
            ],
            "repeat_count": 3,
        },
    )


def _alert(world: World, phase: AlertPhase = AlertPhase.START) -> Alert:
    at = world.clock()
    ended = phase is AlertPhase.END
    return make_alert(
        patient_id=world.patient,
        phase=phase,
        at=at,
        device_id=f"thermo-{world.tag}",
        evidence=(
            fever_evidence(at, value=37.2, limit=37.8, comparator="<")
            if ended
            else fever_evidence(at),
        ),
    )


async def _alert_page(world: World, channel: str) -> Any:
    return await world.pool.fetchrow(
        "SELECT page_id, status, tries FROM pages WHERE dedup_key = $1 AND purpose = 'alert' "
        "AND channel = $2",
        f"{world.patient}:FEVER",
        channel,
    )


async def _attempts(world: World, page_id: Any) -> list[tuple[int, str]]:
    rows = await world.pool.fetch(
        "SELECT attempt, status, started_at, at FROM delivery_attempts WHERE page_id = $1 "
        "ORDER BY attempt",
        page_id,
    )
    for row in rows:
        assert row["at"].tzinfo is not None
    return [(r["attempt"], r["status"]) for r in rows]


async def _killed_after_the_mail_server_accepted(world: World) -> Alert:
    """The alert's first page goes to the nurse's e-mail; the SMTP server accepts it; notify
    dies before writing the outcome. Returns the alert."""
    alert = _alert(world)
    killed = world.instance(unit_of_work=killed_unit_of_work(world.pool))
    with pytest.raises(Killed):
        await killed.handle_alert(alert)
    assert len(world.smtp.to(world.nurse_email)) == 1
    page = await _alert_page(world, "email")
    # Written before the hand-over and still there after the kill: the attempt is in flight.
    assert page["status"] == "sending"
    assert await _attempts(world, page["page_id"]) == [(1, "in_flight")]
    assert world.sender_of(killed).seen_at_handover == [[(1, "in_flight")]]
    return alert


async def test_email_accepted_then_killed_then_acknowledged_is_unknown_never_cancelled(
    world: World,
) -> None:
    """The reported case: the mail server took the page, notify was killed, the alert was
    acknowledged, notify restarted. The log says unknown with its attempt (tries 1), not
    cancelled with tries 0; nothing is sent again (the alert is acknowledged); the timeline
    shows the attempt as the log does."""
    await _team(world, [{"channel": "email", "address": world.nurse_email}])
    alert = await _killed_after_the_mail_server_accepted(world)

    restarted = world.instance()
    escalation_id = await restarted.escalation_id_for(alert.dedup_key)
    assert escalation_id is not None
    acked = await restarted.acknowledge(escalation_id, by=f"person:nurse-{world.tag}", via="api")
    assert acked.outcome.value == "acknowledged"
    # Before the lease runs out the page is still the dead run's: the record keeps it in flight.
    # (What deliver_due returns is not asserted: it counts every due page of the shared
    # database, other tests' included; this page's own record is what is checked.)
    await restarted.deliver_due()
    page = await _alert_page(world, "email")
    assert await _attempts(world, page["page_id"]) == [(1, "in_flight")]

    world.clock.advance(seconds=LEASE_S + 1)
    await restarted.deliver_due()

    page = await _alert_page(world, "email")
    assert (page["status"], page["tries"]) == ("unknown", 1)
    assert await _attempts(world, page["page_id"]) == [(1, "unknown")]
    assert len(world.smtp.to(world.nurse_email)) == 1, "an acknowledged alert was paged again"

    timeline = await world.desk.timeline(alert.dedup_key)
    [attempt] = [a for a in timeline["attempts"] if a["page_id"] == str(page["page_id"])]
    assert attempt["status"] == "unknown" and attempt["attempt"] == 1
    assert attempt["started_at"] is not None and attempt["started_at"] <= attempt["at"]
    assert "not sent again" in attempt["detail"]
    entries = [
        e["detail"]["status"]
        for e in timeline["events"]
        if e["kind"] == "attempt" and e["detail"]["page_id"] == str(page["page_id"])
    ]
    assert entries == ["unknown", "unknown"]  # found cut short, then left unknown
    assert "cancelled" not in {a["status"] for a in timeline["attempts"]}

    # Nothing more happens to it: a later round neither sends nor rewrites it.
    world.clock.advance(minutes=10)
    await restarted.tick()
    await restarted.deliver_due()
    assert len(world.smtp.to(world.nurse_email)) == 1
    assert await _attempts(world, page["page_id"]) == [(1, "unknown")]


async def test_email_accepted_then_killed_while_the_chain_runs_is_sent_again_same_message_id(
    world: World,
) -> None:
    """Not acknowledged: after the lease the page is sent again on attempt 2 (opened in flight
    before the hand-over), attempt 1 stays unknown; both e-mails carry one Message-ID."""
    await _team(world, [{"channel": "email", "address": world.nurse_email}])
    await _killed_after_the_mail_server_accepted(world)

    world.clock.advance(seconds=LEASE_S + 1)
    restarted = world.instance()
    assert await restarted.deliver_due() == 1

    page = await _alert_page(world, "email")
    assert (page["status"], page["tries"]) == ("sent", 2)
    assert await _attempts(world, page["page_id"]) == [(1, "unknown"), (2, "sent")]
    assert world.sender_of(restarted).seen_at_handover == [[(1, "unknown"), (2, "in_flight")]]
    mails = [email.message_from_bytes(raw) for raw in world.smtp.to(world.nurse_email)]
    assert len(mails) == 2
    assert mails[0]["Message-ID"] == mails[1]["Message-ID"] is not None


async def test_all_clear_while_in_flight_goes_where_the_page_may_have_reached(
    world: World,
) -> None:
    """The alert ends while its e-mail page is in flight (notify killed after the accept): the
    all clear goes to that e-mail, and the page in flight ends unknown, not cancelled."""
    await _team(world, [{"channel": "email", "address": world.nurse_email}])
    await _killed_after_the_mail_server_accepted(world)

    restarted = world.instance()
    assert await restarted.handle_alert(_alert(world, AlertPhase.END))
    mails = [email.message_from_bytes(raw) for raw in world.smtp.to(world.nurse_email)]
    assert len(mails) == 2
    assert "[VIGIL ALL CLEAR]" in str(mails[1]["Subject"])

    world.clock.advance(seconds=LEASE_S + 1)
    await restarted.deliver_due()
    page = await _alert_page(world, "email")
    assert (page["status"], page["tries"]) == ("unknown", 1)
    assert await _attempts(world, page["page_id"]) == [(1, "unknown")]
    assert len(world.smtp.to(world.nurse_email)) == 2


async def test_sms_accepted_then_killed_then_acknowledged_is_found_at_twilio_and_recorded_sent(
    world: World,
) -> None:
    """SMS has a lookup: after the kill and the acknowledgement the restarted run finds the
    message by its reference, and records attempt 1 sent (one SMS, tries 1)."""
    phone = f"+1555{int(world.tag, 16) % 10**7:07d}"
    await _team(world, [{"channel": "sms", "address": phone}])
    alert = _alert(world)
    killed = world.instance(unit_of_work=killed_unit_of_work(world.pool))
    with pytest.raises(Killed):
        await killed.handle_alert(alert)
    assert len(world.twilio.sent_to(phone)) == 1
    page = await _alert_page(world, "sms")
    assert await _attempts(world, page["page_id"]) == [(1, "in_flight")]

    restarted = world.instance()
    escalation_id = await restarted.escalation_id_for(alert.dedup_key)
    assert escalation_id is not None
    await restarted.acknowledge(escalation_id, by="person:x", via="api")
    world.clock.advance(seconds=LEASE_S + 1)
    await restarted.deliver_due()

    page = await _alert_page(world, "sms")
    assert (page["status"], page["tries"]) == ("sent", 1)
    assert await _attempts(world, page["page_id"]) == [(1, "sent")]
    assert len(world.twilio.sent_to(phone)) == 1
    detail = await world.pool.fetchval(
        "SELECT detail FROM delivery_attempts WHERE page_id = $1", page["page_id"]
    )
    assert detail.startswith("reconciled")
