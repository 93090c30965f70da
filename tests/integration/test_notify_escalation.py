"""Escalation end to end inside notify: real PostgreSQL, a real SMTP server (aiosmtpd), local
Twilio- and PagerDuty-shaped HTTP servers, notify's API in-process (acknowledgement links,
Twilio's webhooks), and an injected clock. Care teams are set up, and alerts acknowledged,
snoozed and read back, through notify's service layer (``tests/support/notify_desk.py``).

Every test registers its own care team, people and patient (unique ids per run) and asserts only
on its own rows, so tests share the stack's database with everything else.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from email.message import EmailMessage, Message
from typing import Any

import asyncpg
import httpx
import pytest

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
)
from services.notify.adapters.pagerduty import PagerDutyEvents
from services.notify.adapters.postgres.outbox import PostgresOutbox
from services.notify.adapters.postgres.unit_of_work import (
    PostgresUnitOfWork,
)
from services.notify.api import create_app
from services.notify.domain.bundling import DEFAULT_GROUP_WAIT_S
from services.notify.domain.escalation import DEFAULT_FALLBACK_EMAIL
from services.notify.domain.message import clock_time
from services.notify.service_layer.escalation import (
    HEARTBEAT_CODE,
    AckOutcome,
    EscalationService,
)
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from services.notify.settings import NotifySettings
from tests.factories import make_alert
from tests.polling import eventually
from tests.support.escalation import escalation_service, smtp_sender, twilio_sms
from tests.support.notify import ManualClock, PagerDutyLikeServer, SmtpSink, TwilioLikeServer
from tests.support.notify_desk import NotifyDesk
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
FALLBACK = "vigil-oncall-fallback@localhost"
SECRET = b"integration-test-ack-secret-0123456789"


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    await apply_migrations(pg_dsn)
    connections = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=8)
    try:
        yield connections
    finally:
        await connections.close()


@pytest.fixture
def pagerduty() -> Iterator[PagerDutyLikeServer]:
    with PagerDutyLikeServer() as server:
        yield server


@dataclass
class Rig:
    """One notify instance (service + API) over the shared database and the local providers."""

    pool: Any
    clock: ManualClock
    service: EscalationService
    api: httpx.AsyncClient
    smtp: SmtpSink
    twilio: TwilioLikeServer
    pagerduty: PagerDutyLikeServer
    tag: str
    closers: list[Any]

    @property
    def desk(self) -> NotifyDesk:
        """The team's registry and the alerts' actions, through notify's service layer."""
        return NotifyDesk(self.pool, self.service, clock=self.clock)

    def new_instance(
        self,
        unit_of_work: UnitOfWorkFactory | None = None,
        group_wait_s: float = 0.0,
        fallback_email: str = FALLBACK,
        technical_hold_s: float = 0.0,
        silence_hold_s: float = 0.0,
    ) -> EscalationService:
        """Another notify process over the same database (a restart)."""
        return _service(
            self.pool,
            self.clock,
            self.smtp,
            self.twilio,
            self.pagerduty,
            unit_of_work,
            group_wait_s,
            fallback_email,
            technical_hold_s,
            silence_hold_s,
        )


def _service(
    pool: Any,
    clock: ManualClock,
    smtp: SmtpSink,
    twilio: TwilioLikeServer,
    pagerduty: PagerDutyLikeServer,
    unit_of_work: UnitOfWorkFactory | None = None,
    group_wait_s: float = 0.0,
    fallback_email: str = "vigil-oncall-fallback@localhost",
    technical_hold_s: float = 0.0,
    silence_hold_s: float = 0.0,
) -> EscalationService:
    return escalation_service(
        pool,
        clock,
        email=smtp_sender(smtp.port),
        sms=twilio_sms(twilio),
        webhook=PagerDutyEvents(base_url=pagerduty.url),
        ack_secret=SECRET,
        unit_of_work=unit_of_work,
        fallback_email=fallback_email,
        max_tries_per_channel=2,
        retry_base_s=1,
        retry_cap_s=4,
        send_lease_s=30,
        heartbeat_timeout_s=60,
        group_wait_s=group_wait_s,
        technical_hold_s=technical_hold_s,
        silence_hold_s=silence_hold_s,
    )


def _killed_before_recording(
    pool: Any, error: Exception, *, fallback_email: str = DEFAULT_FALLBACK_EMAIL
) -> UnitOfWorkFactory:
    """Units of work over ``pool`` whose outbox raises ``error`` when asked to record what the
    providers answered: notify killed after a provider accepted a page, before the write."""

    class KilledOutbox(PostgresOutbox):
        async def record_outcomes(self, *args: Any, **kwargs: Any) -> None:
            raise error

    class KilledUnitOfWork(PostgresUnitOfWork):
        async def __aenter__(self) -> KilledUnitOfWork:
            await super().__aenter__()
            self.outbox = KilledOutbox(self._conn, fallback_email=self._fallback_email)
            return self

    def unit_of_work(*, transaction: bool = True) -> PostgresUnitOfWork:
        return KilledUnitOfWork(pool, fallback_email=fallback_email, transaction=transaction)

    return unit_of_work


@pytest.fixture
async def rig(
    pool: Any, smtp: SmtpSink, twilio: TwilioLikeServer, pagerduty: PagerDutyLikeServer
) -> AsyncIterator[Rig]:
    clock = ManualClock(T0)
    service = _service(pool, clock, smtp, twilio, pagerduty)
    app = create_app(NotifySettings(), service=service, pool=pool)
    tag = uuid.uuid4().hex[:8]
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://notify.test"
        ) as api:
            yield Rig(pool, clock, service, api, smtp, twilio, pagerduty, tag, [])
    finally:
        await _close_escalations(pool, f"CT-{tag}")


async def _close_escalations(pool: Any, care_team_id: str) -> None:
    """Stop this test's chains: tickers of later tests and of the e2e notify share the table."""
    await pool.execute(
        """
        WITH closed AS (
            UPDATE escalations SET status = 'resolved', due_at = NULL
            WHERE care_team_id = $1 RETURNING escalation_id
        )
        UPDATE pages SET status = 'cancelled', next_attempt_at = NULL
        WHERE escalation_id IN (SELECT escalation_id FROM closed)
          AND status IN ('queued', 'failed', 'sending')
        """,
        care_team_id,
    )
    # A bundle still waiting would otherwise be paged by the next ticker that sees it due.
    await pool.execute(
        "UPDATE notify_bundles SET status = 'flushed' WHERE care_team_id = $1 "
        "AND status = 'pending'",
        care_team_id,
    )
    await pool.execute(
        "DELETE FROM notify_bundle_windows WHERE patient_id IN "
        "(SELECT patient_id FROM patients WHERE care_team_id = $1)",
        care_team_id,
    )


async def _team(
    rig: Rig,
    *,
    people: dict[str, list[dict[str, str]]],
    steps: Any,
    repeat: int = 0,
    timezone: str = "UTC",
) -> tuple[str, str]:
    """A care team with a nurse rotation, the given people and policy; returns (team, patient)."""
    team, patient = f"CT-{rig.tag}", f"P-{rig.tag}"
    await rig.desk.care_team(team, oncall_email=f"fallback-{rig.tag}@h.test", timezone=timezone)
    for person, methods in people.items():
        await rig.desk.person(
            f"{person}-{rig.tag}", name=person, care_team_id=team, contact_methods=methods
        )
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
    )
    await rig.desk.policy(
        team,
        {"policy_id": f"pol-{rig.tag}", "name": "onc", "steps": steps, "repeat_count": repeat},
    )
    return team, patient


def _alert(patient: str, phase: AlertPhase = AlertPhase.START, code: str = "FEVER") -> Alert:
    return make_alert(patient_id=patient, phase=phase, code=code, at=T0)


def _mail(raw: bytes) -> Message:
    return email.message_from_bytes(raw)


def _three_step_policy(tag: str) -> list[dict[str, Any]]:
    return [
        {"targets": [{"kind": "person", "ref": f"primary-{tag}"}], "wait_minutes": 5},
        {"targets": [{"kind": "person", "ref": f"secondary-{tag}"}], "wait_minutes": 5},
        {"targets": [{"kind": "person", "ref": f"attending-{tag}"}], "wait_minutes": 10},
    ]


def _email_people(tag: str) -> dict[str, list[dict[str, str]]]:
    return {
        role: [{"channel": "email", "address": f"{role}-{tag}@h.test"}]
        for role in ("primary", "secondary", "attending")
    }


async def test_each_step_fires_at_its_configured_delay(rig: Rig) -> None:
    """primary at once, nothing at 4:59, secondary at 5:00, attending at 10:00 (e-mail)."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient = f"P-{rig.tag}"
    assert await rig.service.handle_alert(_alert(patient))
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1

    rig.clock.advance(minutes=4, seconds=59)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []

    rig.clock.advance(seconds=1)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert len(rig.smtp.to(f"secondary-{rig.tag}@h.test")) == 1
    assert rig.smtp.to(f"attending-{rig.tag}@h.test") == []

    rig.clock.advance(minutes=5)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert len(rig.smtp.to(f"attending-{rig.tag}@h.test")) == 1
    page = _mail(rig.smtp.to(f"primary-{rig.tag}@h.test")[0])
    assert "http://notify.test/ack/" in page.get_payload(decode=True).decode()  # type: ignore[union-attr]


async def test_ack_link_stops_the_chain_and_works_once(rig: Rig) -> None:
    """The signed link in the first e-mail acks; later ticks page nobody; a reuse is refused."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    body = _mail(rig.smtp.to(f"primary-{rig.tag}@h.test")[0]).get_payload(decode=True)
    link = re.search(r"http://notify\.test(/ack/\S+)", body.decode())  # type: ignore[union-attr]
    assert link is not None

    shown = await rig.api.get(link.group(1))
    assert shown.status_code == 200 and "<form" in shown.text
    assert (await rig.api.post(link.group(1))).status_code == 200
    assert (await rig.api.post(link.group(1))).status_code == 410

    for _ in range(4):
        rig.clock.advance(minutes=10)
        await rig.service.tick()
        await rig.service.deliver_due()
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []
    timeline = await rig.desk.timeline(alert.dedup_key)
    assert timeline["acknowledged_by"] == f"person:primary-{rig.tag}"
    assert [e["kind"] for e in timeline["events"]][:2] == ["opened", "step_fired"]


async def test_sms_reply_one_acknowledges_and_status_callback_records_delivery(rig: Rig) -> None:
    """Paged by SMS through the Twilio-shaped server; a "1" reply acks; "delivered" is logged."""
    phone = f"+1555{int(rig.tag, 16) % 10_000_000:07d}"
    people = {
        "primary": [{"channel": "sms", "address": phone}],
        **{k: v for k, v in _email_people(rig.tag).items() if k != "primary"},
    }
    await _team(rig, people=people, steps=_three_step_policy(rig.tag))
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    [sms] = rig.twilio.sent_to(phone)
    assert "Reply 1" in sms["body"]

    receipt = await rig.api.post(
        "/twilio/status", data={"MessageSid": sms["sid"], "MessageStatus": "delivered"}
    )
    assert receipt.status_code == 204
    reply = await rig.api.post(
        "/twilio/sms", data={"From": phone, "Body": " 1 ", "MessageSid": "SMreply"}
    )
    assert "Acknowledged" in reply.text

    rig.clock.advance(minutes=30)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []
    timeline = await rig.desk.timeline(alert.dedup_key)
    assert [a["status"] for a in timeline["attempts"]] == ["sent", "delivered"]
    assert timeline["acknowledged_by"] == f"person:primary-{rig.tag}"


async def test_failing_channel_moves_to_the_next(rig: Rig) -> None:
    """SMS refused for good (invalid number) -> the person's e-mail gets the page at once."""
    phone = "+15559999999"
    rig.twilio.respond = lambda form: (400, "The 'To' number is not a valid phone number.")
    people = {
        "primary": [
            {"channel": "sms", "address": phone},
            {"channel": "email", "address": f"primary-{rig.tag}@h.test"},
        ]
    }
    steps = [{"targets": [{"kind": "person", "ref": f"primary-{rig.tag}"}], "wait_minutes": 5}]
    await _team(rig, people=people, steps=steps)
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    timeline = await rig.desk.timeline(alert.dedup_key)
    kinds = [e["kind"] for e in timeline["events"]]
    assert "channel_failover" in kinds
    assert [(a["channel"], a["status"]) for a in timeline["attempts"]] == [
        ("sms", "failed"),
        ("email", "sent"),
    ]
    assert "not a valid phone number" in timeline["attempts"][0]["detail"]


async def test_transient_failure_is_retried_with_backoff_before_failover(rig: Rig) -> None:
    """PagerDuty answers 500 once: the retry is due after the backoff, and then it is accepted."""
    calls = {"n": 0}

    def flaky(event: dict[str, Any]) -> int:
        calls["n"] += 1
        return 500 if calls["n"] == 1 else 202

    rig.pagerduty.respond = flaky
    people = {"primary": [{"channel": "webhook", "address": f"rk-{rig.tag}"}]}
    steps = [{"targets": [{"kind": "person", "ref": f"primary-{rig.tag}"}], "wait_minutes": 5}]
    await _team(rig, people=people, steps=steps)
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    assert rig.pagerduty.incidents == {}
    rig.clock.advance(seconds=0.5)
    await rig.service.deliver_due()
    assert rig.pagerduty.incidents == {}, "retried before the backoff (1 s) was over"
    rig.clock.advance(seconds=0.5)
    await rig.service.deliver_due()
    assert rig.pagerduty.incidents == {alert.dedup_key: "trigger"}


async def test_ack_and_tick_race_never_fires_a_step_after_the_ack(rig: Rig) -> None:
    """Ack and tick run concurrently against the real database, 40 times: a step_fired entry
    never follows the acknowledged entry, and no page is sent for a step after the ack."""
    steps = [
        {"targets": [{"kind": "email", "ref": f"a-{rig.tag}@h.test"}], "wait_minutes": 1},
        {"targets": [{"kind": "email", "ref": f"b-{rig.tag}@h.test"}], "wait_minutes": 1},
    ]
    team, _ = await _team(rig, people={}, steps=steps, repeat=10)
    fired_after_ack = 0
    for i in range(40):
        patient = f"P-{rig.tag}-{i}"
        await rig.pool.execute(
            "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
        )
        alert = _alert(patient)
        await rig.service.handle_alert(alert)
        escalation_id = await rig.service.escalation_id_for(alert.dedup_key)
        assert escalation_id is not None
        rig.clock.advance(minutes=1)  # the next step is due exactly now: the race is real
        other = rig.new_instance()
        await asyncio.gather(
            rig.service.acknowledge(escalation_id, by="person:x", via="api"), other.tick()
        )
        rows = await rig.pool.fetch(
            "SELECT kind FROM escalation_events WHERE escalation_id = $1 ORDER BY event_id",
            escalation_id,
        )
        kinds = [r["kind"] for r in rows]
        ack_at = kinds.index("acknowledged")
        fired_after_ack += kinds[ack_at:].count("step_fired")
        await other.tick()
        await rig.service.deliver_due()
        after = [
            r["kind"]
            for r in await rig.pool.fetch(
                "SELECT kind FROM escalation_events WHERE escalation_id = $1 ORDER BY event_id",
                escalation_id,
            )
        ]
        assert after[ack_at:].count("step_fired") == 0
    assert fired_after_ack == 0


async def test_crash_between_provider_accept_and_record_neither_loses_nor_duplicates(
    rig: Rig,
) -> None:
    """Twilio accepts the SMS, then the process dies before recording it. After the restart
    the page is reconciled with Twilio (found by its reference): exactly one SMS, recorded sent.
    The same crash on PagerDuty resends with the same dedup_key: two events, one incident."""
    phone = "+15558888888"
    people = {
        "primary": [{"channel": "sms", "address": phone}],
        "secondary": [{"channel": "webhook", "address": f"rk-{rig.tag}"}],
    }
    steps = [
        {
            "targets": [
                {"kind": "person", "ref": f"primary-{rig.tag}"},
                {"kind": "person", "ref": f"secondary-{rig.tag}"},
            ],
            "wait_minutes": 5,
        },
    ]
    await _team(rig, people=people, steps=steps)

    class Crash(Exception):
        pass

    crashing = rig.new_instance(
        unit_of_work=_killed_before_recording(
            rig.pool, Crash("killed after the provider accepted, before the write")
        )
    )
    alert = _alert(f"P-{rig.tag}")
    with pytest.raises(Crash):
        await crashing.handle_alert(alert)
    # The concurrent send of the other page (gathered) reaches its provider too.
    await eventually(
        lambda: rig.twilio.sent_to(phone),
        timeout_s=10,
        what="the SMS page to reach its provider",
    )
    assert len(rig.twilio.sent_to(phone)) == 1
    pages = await rig.pool.fetch("SELECT status FROM pages WHERE dedup_key = $1", alert.dedup_key)
    assert {p["status"] for p in pages} == {"sending"}

    rig.clock.advance(seconds=31)  # the lease of the dead process runs out
    restarted = rig.new_instance()
    await restarted.deliver_due()
    assert len(rig.twilio.sent_to(phone)) == 1, "the SMS was sent twice"
    assert rig.twilio.create_calls == 1
    events = [e for e in rig.pagerduty.events if e["routing_key"] == f"rk-{rig.tag}"]
    assert 1 <= len(events) <= 2 and {e["dedup_key"] for e in events} == {alert.dedup_key}
    statuses = await rig.pool.fetch(
        "SELECT channel, status FROM pages WHERE dedup_key = $1 ORDER BY channel", alert.dedup_key
    )
    assert [(r["channel"], r["status"]) for r in statuses] == [("sms", "sent"), ("webhook", "sent")]


async def test_all_clear_reaches_everyone_paged_when_the_alert_ends(rig: Rig) -> None:
    """END phase: primary and secondary (both paged) get an all-clear e-mail; attending not."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient = f"P-{rig.tag}"
    await rig.service.handle_alert(_alert(patient))
    rig.clock.advance(minutes=5)
    await rig.service.tick()
    await rig.service.deliver_due()
    await rig.service.handle_alert(_alert(patient, AlertPhase.END))
    for role, expected in (("primary", 2), ("secondary", 2), ("attending", 0)):
        mails = rig.smtp.to(f"{role}-{rig.tag}@h.test")
        assert len(mails) == expected, role
    assert (
        _mail(rig.smtp.to(f"primary-{rig.tag}@h.test")[-1])["Subject"].find("[VIGIL ALL CLEAR]")
        >= 0
    )
    rig.clock.advance(minutes=30)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert rig.smtp.to(f"attending-{rig.tag}@h.test") == []


async def test_pages_speak_in_the_team_zone_number_repeats_and_carry_the_all_clear(
    rig: Rig,
) -> None:
    """A Berlin team: the first page's times are in Berlin time, named; the repeat 5 min later
    says "Repeat 1 of 2" and since when the episode is open; the all clear is marked as one
    (end / info) and says what cleared it, from the stored end alert."""
    steps = [{"targets": [{"kind": "person", "ref": f"primary-{rig.tag}"}], "wait_minutes": 5}]
    await _team(rig, people=_email_people(rig.tag), steps=steps, repeat=2, timezone="Europe/Berlin")
    patient = f"P-{rig.tag}"
    opened = rig.clock.now
    await rig.service.handle_alert(_alert(patient))
    first = _modern(rig.smtp.to(f"primary-{rig.tag}@h.test")[0])
    assert first["Subject"] == f"[VIGIL HIGH] Fever 38.6 °C — patient {patient}"
    assert first["X-Vigil-Repeat"] is None
    body = first.get_content()
    assert f"Device time:  {clock_time(T0, 'Europe/Berlin')} by the device's clock" in body
    assert "(Europe/Berlin)" in body and "REPEAT" not in body

    rig.clock.advance(minutes=5)
    await rig.service.tick()
    await rig.service.deliver_due()
    second = _modern(rig.smtp.to(f"primary-{rig.tag}@h.test")[1])
    assert second["Subject"] == f"[VIGIL HIGH] Repeat 1 of 2: Fever 38.6 °C — patient {patient}"
    assert second["X-Vigil-Repeat"] == "1"
    assert f"Open since {clock_time(opened, 'Europe/Berlin')} (first paged)" in second.get_content()

    ended = _alert(patient, AlertPhase.END).model_copy(
        update={"title": "All clear: temperature 37.5 °C", "priority": AlertPriority.INFO}
    )
    await rig.service.handle_alert(ended)
    clear = _modern(rig.smtp.to(f"primary-{rig.tag}@h.test")[-1])
    assert clear["Subject"] == f"[VIGIL ALL CLEAR] Fever 38.6 °C — patient {patient}"
    assert clear["X-Vigil-Phase"] == "end" and clear["X-Vigil-Priority"] == "info"
    assert "Cleared:      All clear: temperature 37.5 °C" in clear.get_content()


async def test_repeated_start_updates_one_escalation(rig: Rig) -> None:
    """The same dedup key arriving again (redelivery or repeat) does not open a second chain."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient = f"P-{rig.tag}"
    for _ in range(3):
        await rig.service.handle_alert(_alert(patient))
    await rig.service.handle_alert(_alert(patient, AlertPhase.CONTINUE))
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1


async def test_team_without_policy_pages_its_oncall_address_until_acknowledged(rig: Rig) -> None:
    """No policy: the team's on-call address is paged at once, again after five minutes (not at
    4:59); an acknowledgement (audited once, whatever the channel) stops the repeats."""
    team, patient = f"CT-{rig.tag}", f"P-{rig.tag}"
    oncall = f"oncall-{rig.tag}@h.test"
    await rig.pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, 'x', $2)",
        team,
        oncall,
    )
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
    )
    alert = _alert(patient)
    assert await rig.service.handle_alert(alert)
    assert len(rig.smtp.to(oncall)) == 1

    rig.clock.advance(minutes=4, seconds=59)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert len(rig.smtp.to(oncall)) == 1
    rig.clock.advance(seconds=1)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert len(rig.smtp.to(oncall)) == 2

    escalation_id = await rig.pool.fetchval(
        "SELECT escalation_id FROM escalations WHERE dedup_key = $1", alert.dedup_key
    )
    await rig.service.acknowledge(escalation_id, by=f"nurse-{rig.tag}", via="sms")
    audited = await rig.pool.fetch(
        "SELECT action, details::text AS details FROM audit_log WHERE actor = $1",
        f"nurse-{rig.tag}",
    )
    assert [r["action"] for r in audited] == ["alert.acknowledged"]
    assert alert.dedup_key in audited[0]["details"] and '"sms"' in audited[0]["details"]
    await rig.service.acknowledge(escalation_id, by=f"nurse-{rig.tag}", via="sms")
    assert (
        len(await rig.pool.fetch("SELECT 1 FROM audit_log WHERE actor = $1", f"nurse-{rig.tag}"))
        == 1
    )
    rig.clock.advance(minutes=30)
    await rig.service.tick()
    await rig.service.deliver_due()
    assert len(rig.smtp.to(oncall)) == 2


async def test_a_stored_policy_without_steps_pages_the_team_oncall_address(rig: Rig) -> None:
    """A policy row naming no step (written around the API, which refuses one) would page
    nobody: the team's on-call address is paged instead, as for a team without a policy. The
    positive control: the same team's alert is paged by its own policy once that has a step."""
    team, patient = f"CT-nostep-{rig.tag}", f"P-nostep-{rig.tag}"
    oncall = f"oncall-nostep-{rig.tag}@h.test"
    await rig.pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, 'x', $2)",
        team,
        oncall,
    )
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
    )
    await rig.pool.execute(
        "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps) "
        "VALUES ($1, $2, 'empty', '[]')",
        f"policy-nostep-{rig.tag}",
        team,
    )
    assert await rig.service.handle_alert(_alert(patient))
    assert len(rig.smtp.to(oncall)) == 1

    own = f"own-nostep-{rig.tag}@h.test"
    await rig.pool.execute(
        "UPDATE escalation_policies SET steps = $2::jsonb WHERE policy_id = $1",
        f"policy-nostep-{rig.tag}",
        json.dumps([{"wait_s": 300, "targets": [{"kind": "email", "ref": own}]}]),
    )
    later = f"P-nostep-2-{rig.tag}"
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", later, team
    )
    assert await rig.service.handle_alert(_alert(later))
    assert len(rig.smtp.to(own)) == 1
    assert len(rig.smtp.to(oncall)) == 1


async def test_stopped_heartbeat_pages_the_technical_oncall(
    pool: Any, smtp: SmtpSink, twilio: TwilioLikeServer, pagerduty: PagerDutyLikeServer
) -> None:
    """Heartbeats arrive, then stop: past the timeout the technical team is paged once; when
    they come back the same address gets the all-clear."""
    tag = uuid.uuid4().hex[:8]
    team, source = f"CT-tech-{tag}", f"heartbeat-{tag}"
    await pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, 'ops', $2)",
        team,
        f"tech-{tag}@h.test",
    )
    clock = ManualClock(T0)
    service = escalation_service(
        pool,
        clock,
        email=smtp_sender(smtp.port),
        ack_secret=SECRET,
        heartbeat_timeout_s=60,
        technical_care_team_id=team,
    )
    try:
        await _heartbeat_scenario(service, clock, smtp, tag, source)
    finally:
        await _close_escalations(pool, team)
        await pool.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", source)


async def test_pipeline_silence_without_a_technical_team_pages_the_fallback_again(
    pool: Any, smtp: SmtpSink
) -> None:
    """No technical care team configured: the silence goes to the fallback address, and is
    paged again after five minutes (not at 4:59) while nobody acknowledges, never only once."""
    tag = uuid.uuid4().hex[:8]
    source, fallback = f"heartbeat-{tag}", f"fallback-{tag}@h.test"
    clock = ManualClock(T0)
    service = escalation_service(
        pool,
        clock,
        email=smtp_sender(smtp.port),
        ack_secret=SECRET,
        fallback_email=fallback,
        heartbeat_timeout_s=60,
        technical_care_team_id=None,
    )
    beat = _alert("pipeline", code=HEARTBEAT_CODE).model_copy(
        update={"device_id": source, "device_time": T0}
    )
    try:
        assert await service.handle_alert(beat)
        clock.advance(seconds=61)
        await service.check_heartbeat()
        await service.deliver_due()
        assert len(smtp.to(fallback)) == 1
        clock.advance(seconds=299)
        await service.tick()
        await service.deliver_due()
        assert len(smtp.to(fallback)) == 1
        clock.advance(seconds=1)
        await service.tick()
        await service.deliver_due()
        pages = smtp.to(fallback)
        assert len(pages) == 2
        assert all("Pipeline silent" in _mail(page)["Subject"] for page in pages)
    finally:
        await service.handle_alert(beat.model_copy(update={"device_time": clock.now}))
        await service.check_heartbeat()
        await pool.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", source)


async def _heartbeat_scenario(
    service: EscalationService, clock: ManualClock, smtp: SmtpSink, tag: str, source: str
) -> None:
    beat = _alert("pipeline", code=HEARTBEAT_CODE).model_copy(
        update={"device_id": source, "device_time": T0}
    )
    assert await service.handle_alert(beat)
    clock.advance(seconds=60)
    await service.check_heartbeat()
    assert smtp.to(f"tech-{tag}@h.test") == []
    clock.advance(seconds=1)
    await service.check_heartbeat()
    await service.check_heartbeat()
    pages = smtp.to(f"tech-{tag}@h.test")
    assert len(pages) == 1
    assert "Pipeline silent" in _mail(pages[0])["Subject"]

    clock.advance(seconds=30)
    await service.handle_alert(beat.model_copy(update={"device_time": clock.now}))
    await service.check_heartbeat()
    pages = smtp.to(f"tech-{tag}@h.test")
    assert len(pages) == 2 and "[VIGIL ALL CLEAR]" in _mail(pages[1])["Subject"]


# -- burst bundling ---------------------------------------------------------------------------

# The service's own default, so these tests exercise the window the service runs with.
GROUP_WAIT_S = DEFAULT_GROUP_WAIT_S


def _modern(raw: bytes) -> EmailMessage:
    """The message with its headers decoded and unfolded (a bundle's subject is long and
    carries non-ASCII, so it is folded and encoded on the wire)."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _subjects(rig: Rig, role: str) -> list[str]:
    return [_modern(p)["Subject"] for p in rig.smtp.to(f"{role}-{rig.tag}@h.test")]


_BURST = (
    ("PUMP_OCCLUSION", "Downstream occlusion", AlertPriority.HIGH),
    ("INFUSION_STOPPED", "Infusion stopped", AlertPriority.HIGH),
    ("BATTERY_LOW", "Battery low", AlertPriority.MEDIUM),
)


def _burst_alert(patient: str, code: str, title: str, priority: AlertPriority) -> Alert:
    return _alert(patient, code=code).model_copy(update={"title": title, "priority": priority})


def _bundling(rig: Rig) -> EscalationService:
    """A notify instance with the default bundling window."""
    return rig.new_instance(group_wait_s=GROUP_WAIT_S)


async def _round(service: EscalationService) -> None:
    await service.tick()
    await service.deliver_due()


async def test_first_alert_of_a_patient_is_paged_at_once_with_bundling_on(rig: Rig) -> None:
    """With the window on, a patient's first alarm is paged inside handle_alert itself, at the
    instant it arrived: no tick, no clock movement, the attempt recorded at T0, and its
    escalation in no bundle (its own page, its own ack)."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    occlusion = _burst_alert(patient, *_BURST[0])
    assert await service.handle_alert(occlusion)
    assert _subjects(rig, "primary") == [f"[VIGIL HIGH] {occlusion.title} — patient {patient}"]
    attempt = await rig.pool.fetchrow(
        """
        SELECT d.at, d.status, e.bundle_id FROM delivery_attempts d
        JOIN pages p ON p.page_id = d.page_id
        JOIN escalations e ON e.escalation_id = p.escalation_id
        WHERE p.dedup_key = $1
        """,
        occlusion.dedup_key,
    )
    assert (attempt["at"], attempt["status"], attempt["bundle_id"]) == (T0, "sent", None)
    window = await rig.pool.fetchrow(
        "SELECT opened_at, closes_at, opened_by FROM notify_bundle_windows WHERE patient_id = $1",
        patient,
    )
    assert (window["opened_at"], window["closes_at"], window["opened_by"]) == (
        T0,
        T0 + timedelta(seconds=GROUP_WAIT_S),
        occlusion.dedup_key,
    )


async def test_a_held_alert_that_worsens_in_the_window_is_followed_up_as_it_is_now(
    rig: Rig,
) -> None:
    """An occlusion is paged at once; a low battery 1 s later is held for the follow-up and,
    before the window ends, worsens to HIGH "Battery critical": the follow-up pages it as HIGH
    with that title, not as the MEDIUM "Battery low" it was held as."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    occlusion = _burst_alert(patient, *_BURST[0])
    battery = _burst_alert(patient, *_BURST[2])
    assert await service.handle_alert(occlusion)
    rig.clock.advance(seconds=1)
    assert await service.handle_alert(battery)
    rig.clock.advance(seconds=1)
    worse = _alert(patient, AlertPhase.ESCALATE, code=battery.code).model_copy(
        update={"title": "Battery critical", "priority": AlertPriority.HIGH}
    )
    assert await service.handle_alert(worse)
    assert _subjects(rig, "primary") == [f"[VIGIL HIGH] {occlusion.title} — patient {patient}"]
    rig.clock.now = T0 + timedelta(seconds=GROUP_WAIT_S)
    await _round(service)
    assert _subjects(rig, "primary")[1:] == [f"[VIGIL HIGH] Battery critical — patient {patient}"]


async def test_burst_of_three_is_an_immediate_page_then_one_follow_up_naming_the_other_two(
    rig: Rig,
) -> None:
    """Three different alarms 1 s apart: the first is paged at once; the other two go out in one
    page at the window's end (nothing at 4.999 s, one page at 5 s). The follow-up's link
    acknowledges both its alarms and only them: the first alarm's chain goes on to the
    secondary alone."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    alerts = [_burst_alert(patient, *spec) for spec in _BURST]
    for alert in alerts:
        assert await service.handle_alert(alert)
        await service.deliver_due()
        rig.clock.advance(seconds=1)
    assert _subjects(rig, "primary") == [f"[VIGIL HIGH] {alerts[0].title} — patient {patient}"]
    rig.clock.now = T0 + timedelta(seconds=GROUP_WAIT_S - 0.001)
    await _round(service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1

    rig.clock.now = T0 + timedelta(seconds=GROUP_WAIT_S)
    await _round(service)
    pages = rig.smtp.to(f"primary-{rig.tag}@h.test")
    assert len(pages) == 2
    follow_up = _modern(pages[1])
    body = follow_up.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert follow_up["Subject"].startswith("[VIGIL HIGH] 2 alerts")
    for alert in alerts[1:]:
        assert alert.title in follow_up["Subject"] and alert.dedup_key in body
    assert alerts[0].title not in follow_up["Subject"]
    rows = await rig.pool.fetch(
        "SELECT dedup_key, bundle_id FROM escalations WHERE patient_id = $1", patient
    )
    bundle_of = {r["dedup_key"]: r["bundle_id"] for r in rows}
    assert bundle_of[alerts[0].dedup_key] is None
    assert bundle_of[alerts[1].dedup_key] == bundle_of[alerts[2].dedup_key] is not None

    link = re.search(r"http://notify\.test(/ack/\S+)", body)
    assert link is not None
    assert (await rig.api.post(link.group(1))).status_code == 200
    statuses = await rig.pool.fetch(
        "SELECT dedup_key, status, acknowledged_by FROM escalations WHERE patient_id = $1",
        patient,
    )
    assert {s["dedup_key"]: (s["status"], s["acknowledged_by"]) for s in statuses} == {
        alerts[0].dedup_key: ("open", None),
        alerts[1].dedup_key: ("acknowledged", f"person:primary-{rig.tag}"),
        alerts[2].dedup_key: ("acknowledged", f"person:primary-{rig.tag}"),
    }
    rig.clock.now = T0 + timedelta(minutes=5, seconds=GROUP_WAIT_S)
    await _round(service)
    assert _subjects(rig, "secondary") == [f"[VIGIL HIGH] {alerts[0].title} — patient {patient}"]


async def test_bursts_for_two_patients_are_paged_separately(rig: Rig) -> None:
    """Two alarms each for two patients in the same second: each patient's first alarm is paged
    at once, and each follow-up (of one alarm: a plain page) names only its own patient."""
    team, first = await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    second = f"{first}-b"
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", second, team
    )
    service = _bundling(rig)
    for patient in (first, second):
        for spec in _BURST[:2]:
            await service.handle_alert(_burst_alert(patient, *spec))
    immediate = _subjects(rig, "primary")
    assert sorted(immediate) == sorted(
        f"[VIGIL HIGH] {_BURST[0][1]} — patient {p}" for p in (first, second)
    )
    rig.clock.advance(seconds=GROUP_WAIT_S)
    await _round(service)
    follow_ups = _subjects(rig, "primary")[2:]
    assert sorted(follow_ups) == sorted(
        f"[VIGIL HIGH] {_BURST[1][1]} — patient {p}" for p in (first, second)
    )


async def test_alarm_at_or_after_the_window_end_starts_afresh(rig: Rig) -> None:
    """The window is half-open and only an alarm paged at once opens one: an alarm exactly at
    the window's end is paged at once (new window); an alarm after a follow-up was paged is
    paged at once too (the follow-up opened no window); one inside the new window waits for
    its end."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    occlusion, stopped, battery = (_burst_alert(patient, *spec) for spec in _BURST)
    fever = _alert(patient)
    await service.handle_alert(occlusion)  # at 0: paged at once, window [0, 5)
    rig.clock.advance(seconds=GROUP_WAIT_S)
    await service.handle_alert(stopped)  # exactly at 5, before the ticker ran: at once
    assert _subjects(rig, "primary") == [
        f"[VIGIL HIGH] {a.title} — patient {patient}" for a in (occlusion, stopped)
    ]
    rig.clock.advance(seconds=1)
    await service.handle_alert(battery)  # at 6: inside [5, 10), follow-up due at 10
    rig.clock.now = T0 + timedelta(seconds=2 * GROUP_WAIT_S - 0.001)
    await _round(service)
    assert len(_subjects(rig, "primary")) == 2
    rig.clock.now = T0 + timedelta(seconds=2 * GROUP_WAIT_S)
    await _round(service)
    assert _subjects(rig, "primary")[2] == f"[VIGIL MEDIUM] {battery.title} — patient {patient}"

    rig.clock.advance(seconds=0.5)
    await service.handle_alert(fever)  # after the follow-up: at once, not held to 15 s
    assert _subjects(rig, "primary")[3] == f"[VIGIL HIGH] {fever.title} — patient {patient}"


async def test_pending_follow_up_survives_a_restart_mid_window(rig: Rig) -> None:
    """The first alarm is paged at once, two more are held, and the instance dies before the
    window ends; the restarted instance pages the follow-up when it falls due (nothing is
    lost). A redelivery of a held alarm to the new instance (its Kafka offset may not have
    been committed) and of the first alarm are folded by their dedup keys: one follow-up page
    naming both held alarms, and no second page for the first."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient = f"P-{rig.tag}"
    occlusion, stopped, battery = (_burst_alert(patient, *spec) for spec in _BURST)
    crashed = _bundling(rig)
    await crashed.handle_alert(occlusion)
    rig.clock.advance(seconds=1)
    await crashed.handle_alert(stopped)
    rig.clock.advance(seconds=1)
    await crashed.handle_alert(battery)
    del crashed  # the process is gone; only PostgreSQL remembers the window and the follow-up

    restarted = _bundling(rig)
    rig.clock.advance(seconds=1)
    assert await restarted.handle_alert(stopped)  # redelivered
    assert await restarted.handle_alert(occlusion)  # redelivered
    await _round(restarted)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    rig.clock.now = T0 + timedelta(seconds=GROUP_WAIT_S)
    await _round(restarted)
    subjects = _subjects(rig, "primary")
    assert len(subjects) == 2
    assert "2 alerts" in subjects[1] and stopped.title in subjects[1]
    assert battery.title in subjects[1] and occlusion.title not in subjects[1]


async def test_api_ack_of_one_follow_up_alarm_leaves_the_others_paging(rig: Rig) -> None:
    """Acknowledging one alarm of the follow-up by its dedup key (the API) acknowledges only
    that alarm: at the next step the secondary gets the first alarm's page and the follow-up's
    page, which now names only the alarm not acknowledged."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    alerts = [_burst_alert(patient, *spec) for spec in _BURST]
    for alert in alerts:
        await service.handle_alert(alert)
    rig.clock.advance(seconds=GROUP_WAIT_S)
    await _round(service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 2
    answer = await rig.desk.acknowledge(alerts[1].dedup_key, f"person:x-{rig.tag}")
    assert answer.outcome is AckOutcome.ACKNOWLEDGED
    rig.clock.advance(minutes=5)
    await _round(service)
    assert sorted(_subjects(rig, "secondary")) == sorted(
        f"[VIGIL {a.priority.value.upper()}] {a.title} — patient {patient}"
        for a in (alerts[0], alerts[2])
    )


async def test_end_of_an_alarm_still_held_pages_the_follow_up_at_once(rig: Rig) -> None:
    """An alarm that ends while it waits for the follow-up: the follow-up is paged at once
    (nobody has been told of it yet; a duplicate beats a miss) and its all-clear follows."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    occlusion, stopped, _ = (_burst_alert(patient, *spec) for spec in _BURST)
    await service.handle_alert(occlusion)
    await service.handle_alert(stopped)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    rig.clock.advance(seconds=1)
    ended = stopped.model_copy(
        update={
            "alert_id": uuid.uuid4(),
            "phase": AlertPhase.END,
            "state": AlertState.INACTIVE,
        }
    )
    assert await service.handle_alert(ended)
    assert _subjects(rig, "primary")[1:] == [
        f"[VIGIL HIGH] {stopped.title} — patient {patient}",
        f"[VIGIL ALL CLEAR] {stopped.title} — patient {patient}",
    ]
    all_clear = _modern(rig.smtp.to(f"primary-{rig.tag}@h.test")[-1])
    # The all clear's own phase and priority, not the start's HIGH.
    assert all_clear["X-Vigil-Phase"] == "end" and all_clear["X-Vigil-Priority"] == "info"
    assert all_clear["X-Vigil-All-Clear"] == "yes" and all_clear["Importance"] is None


# -- PagerDuty acknowledge and resolve upstream ------------------------------------------------


def _pd_events(rig: Rig, routing_key: str) -> list[tuple[str, str]]:
    return [
        (e["event_action"], e["dedup_key"])
        for e in rig.pagerduty.events
        if e["routing_key"] == routing_key
    ]


async def test_ack_in_vigil_acknowledges_the_pagerduty_incident_then_resolve_resolves_it(
    rig: Rig,
) -> None:
    """Paged through PagerDuty; acknowledged through the API: an acknowledge event with the
    trigger's dedup_key goes to the same routing key and is recorded as an attempt; when the
    alarm ends, one resolve follows (not a second one from the all-clear)."""
    key = f"rk-{rig.tag}"
    people = {"primary": [{"channel": "webhook", "address": key}]}
    steps = [{"targets": [{"kind": "person", "ref": f"primary-{rig.tag}"}], "wait_minutes": 5}]
    await _team(rig, people=people, steps=steps)
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    assert _pd_events(rig, key) == [("trigger", alert.dedup_key)]

    rig.clock.advance(seconds=30)
    answer = await rig.desk.acknowledge(alert.dedup_key, f"person:primary-{rig.tag}")
    assert answer.outcome is AckOutcome.ACKNOWLEDGED
    await rig.service.deliver_due()
    assert _pd_events(rig, key) == [("trigger", alert.dedup_key), ("acknowledge", alert.dedup_key)]

    rig.clock.advance(seconds=30)
    await rig.service.handle_alert(_alert(f"P-{rig.tag}", AlertPhase.END))
    await rig.service.deliver_due()
    assert _pd_events(rig, key) == [
        ("trigger", alert.dedup_key),
        ("acknowledge", alert.dedup_key),
        ("resolve", alert.dedup_key),
    ]
    assert rig.pagerduty.incidents[alert.dedup_key] == "resolve"
    timeline = await rig.desk.timeline(alert.dedup_key)
    assert [(a["purpose"], a["status"]) for a in timeline["attempts"]] == [
        ("alert", "sent"),
        ("upstream_acknowledge", "sent"),
        ("upstream_resolve", "sent"),
    ]


async def test_sms_ack_acknowledges_the_pagerduty_incident_of_another_person(rig: Rig) -> None:
    """One step pages a nurse by SMS and a fellow through PagerDuty; the nurse replies "1": the
    fellow's PagerDuty incident is acknowledged too (the ack happened in Vigil, on any channel).
    An upstream event PagerDuty answers with a 500 is retried after the backoff, and the
    fellow is not paged on another channel for it."""
    phone = f"+1556{int(rig.tag, 16) % 10_000_000:07d}"
    key = f"rk-{rig.tag}"
    people = {
        "nurse": [{"channel": "sms", "address": phone}],
        "fellow": [
            {"channel": "webhook", "address": key},
            {"channel": "email", "address": f"fellow-{rig.tag}@h.test"},
        ],
    }
    steps = [
        {
            "targets": [
                {"kind": "person", "ref": f"nurse-{rig.tag}"},
                {"kind": "person", "ref": f"fellow-{rig.tag}"},
            ],
            "wait_minutes": 5,
        }
    ]
    await _team(rig, people=people, steps=steps)
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    calls = {"n": 0}

    def flaky(event: dict[str, Any]) -> int:
        calls["n"] += 1
        return 500 if calls["n"] == 1 else 202

    rig.pagerduty.respond = flaky
    reply = await rig.api.post("/twilio/sms", data={"From": phone, "Body": "1", "MessageSid": "x"})
    assert "Acknowledged" in reply.text
    await rig.service.deliver_due()
    assert _pd_events(rig, key) == [("trigger", alert.dedup_key)]  # the 500
    rig.clock.advance(seconds=1)
    await rig.service.deliver_due()
    assert _pd_events(rig, key) == [("trigger", alert.dedup_key), ("acknowledge", alert.dedup_key)]
    assert rig.smtp.to(f"fellow-{rig.tag}@h.test") == []


async def test_bundle_incident_is_acknowledged_upstream_only_when_every_alarm_is(rig: Rig) -> None:
    """Through PagerDuty a burst of three is two incidents: the first alarm's, triggered at
    once, and the follow-up's, one incident listing the other two. Acknowledging the follow-up's
    alarms one by one through the API leaves its incident triggered until the last, which
    sends one acknowledge with the dedup_key its trigger used; the first incident is untouched."""
    key = f"rk-{rig.tag}"
    people = {"primary": [{"channel": "webhook", "address": key}]}
    steps = [{"targets": [{"kind": "person", "ref": f"primary-{rig.tag}"}], "wait_minutes": 5}]
    await _team(rig, people=people, steps=steps)
    patient, service = f"P-{rig.tag}", _bundling(rig)
    alerts = [_burst_alert(patient, *spec) for spec in _BURST]
    for alert in alerts:
        await service.handle_alert(alert)
    assert _pd_events(rig, key) == [("trigger", alerts[0].dedup_key)]
    rig.clock.advance(seconds=GROUP_WAIT_S)
    await _round(service)
    first, trigger = [e for e in rig.pagerduty.events if e["routing_key"] == key]
    assert first["payload"]["custom_details"].get("dedup_keys") is None
    assert trigger["payload"]["custom_details"]["dedup_keys"] == [a.dedup_key for a in alerts[1:]]
    for alert in alerts[1:]:
        answer = await rig.desk.acknowledge(alert.dedup_key, f"person:x-{rig.tag}")
        assert answer.outcome is AckOutcome.ACKNOWLEDGED
        await service.deliver_due()
        if alert is not alerts[-1]:
            assert [a for a, _ in _pd_events(rig, key)] == ["trigger", "trigger"]
    assert _pd_events(rig, key) == [
        ("trigger", alerts[0].dedup_key),
        ("trigger", trigger["dedup_key"]),
        ("acknowledge", trigger["dedup_key"]),
    ]


async def test_snooze_holds_for_exactly_its_duration_then_pages_again(rig: Rig) -> None:
    """Snoozed through the API for 10 minutes (measured on the service's clock) right after the
    first page: nobody is paged at 9:59 (the
    secondary's step is held too), and at 10:00 the chain starts again from the first step, so
    the primary gets a second page (the repeat is not folded into the first by its key)."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    await rig.desk.snooze(alert.dedup_key, by=f"person:primary-{rig.tag}", minutes=10)
    rig.clock.advance(minutes=9, seconds=59)
    await _round(rig.service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []
    rig.clock.advance(seconds=1)
    await _round(rig.service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 2


async def test_alarm_acknowledged_while_held_is_left_out_of_the_follow_up_page(
    rig: Rig,
) -> None:
    """Each held alarm has its escalation from the moment it arrives: acknowledging one during
    the window (e.g. from the dashboard) keeps it off the follow-up, which is then a plain page
    for the other; a follow-up whose alarms were all acknowledged within the window pages
    nobody."""
    team, patient = await _team(
        rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag)
    )
    service = _bundling(rig)
    alerts = [_burst_alert(patient, *spec) for spec in _BURST]
    for alert in alerts:
        await service.handle_alert(alert)
    answer = await rig.desk.acknowledge(alerts[1].dedup_key, f"person:x-{rig.tag}")
    assert answer.outcome is AckOutcome.ACKNOWLEDGED
    rig.clock.advance(seconds=GROUP_WAIT_S)
    await _round(service)
    assert _subjects(rig, "primary") == [
        f"[VIGIL {a.priority.value.upper()}] {a.title} — patient {patient}"
        for a in (alerts[0], alerts[2])
    ]

    quiet = f"{patient}-q"
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", quiet, team
    )
    first, held = (_burst_alert(quiet, *spec) for spec in _BURST[:2])
    await service.handle_alert(first)  # paged at once
    await service.handle_alert(held)
    answer = await rig.desk.acknowledge(held.dedup_key, f"person:x-{rig.tag}")
    assert answer.outcome is AckOutcome.ACKNOWLEDGED
    rig.clock.advance(seconds=GROUP_WAIT_S)
    await _round(service)
    assert _subjects(rig, "primary")[2:] == [f"[VIGIL HIGH] {first.title} — patient {quiet}"]


# -- quiet hours ------------------------------------------------------------------------------

# T0 is 03:00 in Berlin (CET): inside 22:00-07:00, which ends at 06:00 UTC that morning.
QUIET_END = datetime(2025, 3, 1, 6, 0, tzinfo=UTC)


async def _quiet_team(rig: Rig) -> tuple[str, str]:
    team, patient = await _team(
        rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag)
    )
    assert await rig.desk.quiet_hours(
        team, timezone="Europe/Berlin", start="22:00", end="07:00", by=f"person:lead-{rig.tag}"
    )
    return team, patient


def _prioritised(
    patient: str, code: str, priority: AlertPriority, phase: AlertPhase = AlertPhase.START
) -> Alert:
    return _alert(patient, phase, code=code).model_copy(
        update={"priority": priority, "title": f"{code} ({priority.value})"}
    )


async def test_high_and_medium_page_at_once_inside_quiet_hours(rig: Rig) -> None:
    """Safety: with quiet hours on and the clock inside them, a HIGH and a MEDIUM alert are each
    paged at once (inside handle_alert, no tick); a LOW one arriving at the same instant is
    held, not paged, and its timeline says so."""
    _, patient = await _quiet_team(rig)
    high = _prioritised(patient, "OCCLUSION", AlertPriority.HIGH)
    medium = _prioritised(patient, "INTERRUPTED", AlertPriority.MEDIUM)
    low = _prioritised(patient, "BATTERY", AlertPriority.LOW)
    for alert in (high, medium, low):
        assert await rig.service.handle_alert(alert)
    assert sorted(_subjects(rig, "primary")) == sorted(
        f"[VIGIL {a.priority.value.upper()}] {a.title} — patient {patient}" for a in (high, medium)
    )
    timeline = await rig.desk.timeline(low.dedup_key)
    assert timeline["status"] == "open" and timeline["next_step_due_at"] is None
    held = [e for e in timeline["events"] if e["kind"] == "held_for_quiet_hours"]
    assert [e["detail"]["due_at"] for e in held] == [QUIET_END.isoformat()]


async def test_low_alerts_are_paged_as_one_digest_when_quiet_hours_end(rig: Rig) -> None:
    """Four LOW/INFO alerts of two patients held overnight: one acknowledged (left out), one
    resolved (listed as resolved, no all-clear of its own). Nothing is paged before 06:00 UTC;
    at 06:00 the primary gets exactly one page listing the other three; the chain goes on (the
    secondary gets one digest page 5 min later); the digest's link acknowledges all of them."""
    team, patient = await _quiet_team(rig)
    other = f"{patient}-b"
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", other, team
    )
    battery = _prioritised(patient, "BATTERY", AlertPriority.LOW)
    acked = _prioritised(patient, "RESERVOIR", AlertPriority.LOW)
    info = _prioritised(other, "REMINDER", AlertPriority.INFO)
    gone = _prioritised(other, "SIGNAL", AlertPriority.LOW)
    for alert in (battery, acked, info, gone):
        await rig.service.handle_alert(alert)
        rig.clock.advance(seconds=1)
    answer = await rig.desk.acknowledge(acked.dedup_key, f"person:primary-{rig.tag}")
    assert answer.outcome is AckOutcome.ACKNOWLEDGED
    rig.clock.advance(minutes=30)
    resolved_at = rig.clock.now
    await rig.service.handle_alert(
        _prioritised(other, "SIGNAL", AlertPriority.INFO, AlertPhase.END)
    )
    rig.clock.now = QUIET_END - timedelta(seconds=1)
    await _round(rig.service)
    assert rig.smtp.to(f"primary-{rig.tag}@h.test") == []

    rig.clock.now = QUIET_END
    await _round(rig.service)
    [digest] = [_modern(raw) for raw in rig.smtp.to(f"primary-{rig.tag}@h.test")]
    assert digest["Subject"].startswith("[VIGIL LOW] Quiet hours: 3 alerts (1 resolved)")
    body = digest.get_content()
    for alert in (battery, info, gone):
        assert alert.dedup_key in body
    assert acked.dedup_key not in body
    # In the team's zone (UTC by default), on Vigil's clock.
    assert f"RESOLVED at {clock_time(resolved_at, 'UTC')} by Vigil's clock" in body
    assert rig.smtp.to(f"secondary-{rig.tag}@h.test") == []

    rig.clock.advance(minutes=5)
    await _round(rig.service)
    assert len(rig.smtp.to(f"secondary-{rig.tag}@h.test")) == 1
    link = re.search(r"http://notify\.test(/ack/\S+)", body)
    assert link is not None
    assert (await rig.api.post(link.group(1))).status_code == 200
    for alert in (battery, info):
        timeline = await rig.desk.timeline(alert.dedup_key)
        assert timeline["status"] == "acknowledged"
    rig.clock.advance(minutes=30)
    await _round(rig.service)
    assert len(rig.smtp.to(f"attending-{rig.tag}@h.test")) == 0
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1


async def test_resolved_only_digest_is_still_paged(rig: Rig) -> None:
    """A held alert that came and went during the night is the whole digest: it is still paged
    at the end of quiet hours (resolved), never silently dropped; an alert acknowledged
    while held is not paged at all."""
    _, patient = await _quiet_team(rig)
    gone = _prioritised(patient, "SIGNAL", AlertPriority.LOW)
    await rig.service.handle_alert(gone)
    rig.clock.advance(minutes=10)
    await rig.service.handle_alert(
        _prioritised(patient, "SIGNAL", AlertPriority.INFO, AlertPhase.END)
    )
    rig.clock.now = QUIET_END
    await _round(rig.service)
    [digest] = [_modern(raw) for raw in rig.smtp.to(f"primary-{rig.tag}@h.test")]
    assert "1 alert (1 resolved)" in digest["Subject"]
    assert "RESOLVED at" in digest.get_content()


async def test_digest_survives_a_restart_during_quiet_hours(rig: Rig) -> None:
    """The instance that held a LOW alert dies; another instance over the same database pages
    the digest at the end of quiet hours, once (the first instance's later tick finds it paged)."""
    _, patient = await _quiet_team(rig)
    low = _prioritised(patient, "BATTERY", AlertPriority.LOW)
    await rig.service.handle_alert(low)
    restarted = rig.new_instance()
    rig.clock.now = QUIET_END
    await _round(restarted)
    await _round(rig.service)
    mails = rig.smtp.to(f"primary-{rig.tag}@h.test")
    assert len(mails) == 1 and low.dedup_key in _modern(mails[0]).get_content()


async def test_removing_quiet_hours_pages_what_they_held_at_once(rig: Rig) -> None:
    """Quiet hours moved to end earlier page the held alert at the new end (not the old one);
    removed altogether, the next held alert is paged on the next round, not at 06:00 UTC."""
    team, patient = await _quiet_team(rig)
    first = _prioritised(patient, "BATTERY", AlertPriority.LOW)
    await rig.service.handle_alert(first)
    shorter = {"timezone": "Europe/Berlin", "start": "22:00", "end": "05:00", "by": "p:a"}
    assert await rig.desk.quiet_hours(team, **shorter)
    rig.clock.now = datetime(2025, 3, 1, 3, 59, 59, tzinfo=UTC)
    await _round(rig.service)
    assert rig.smtp.to(f"primary-{rig.tag}@h.test") == []
    rig.clock.now = datetime(2025, 3, 1, 4, 0, tzinfo=UTC)  # 05:00 CET
    await _round(rig.service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1

    assert await rig.desk.quiet_hours(team, **{**shorter, "end": "07:00"})
    second = _prioritised(patient, "RESERVOIR", AlertPriority.LOW)
    await rig.service.handle_alert(second)
    await _round(rig.service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 1
    assert await rig.desk.registry.remove_quiet_hours(team, by="p:a")
    await _round(rig.service)
    mails = rig.smtp.to(f"primary-{rig.tag}@h.test")
    assert len(mails) == 2 and second.dedup_key in _modern(mails[1]).get_content()


async def test_held_alert_that_escalates_to_high_is_paged_at_once(rig: Rig) -> None:
    """A LOW alert held for the digest escalates to HIGH during quiet hours: it leaves the
    digest and is paged at once (its page and the escalation notice), and the digest at the end
    of quiet hours, now empty, pages nobody again."""
    _, patient = await _quiet_team(rig)
    low = _prioritised(patient, "INTERRUPTED", AlertPriority.LOW)
    await rig.service.handle_alert(low)
    assert rig.smtp.to(f"primary-{rig.tag}@h.test") == []
    rig.clock.advance(minutes=20)
    worse = _prioritised(patient, "INTERRUPTED", AlertPriority.HIGH, AlertPhase.ESCALATE)
    await rig.service.handle_alert(worse)
    subjects = _subjects(rig, "primary")
    # Sent concurrently, so in either order: the alert page and the escalation notice, both
    # about the alert as it is now (HIGH), not as it was held (LOW).
    assert len(subjects) == 2 and sum("Escalated" in s for s in subjects) == 1
    assert all(s.startswith("[VIGIL HIGH] ") and worse.title in s for s in subjects), subjects
    timeline = await rig.desk.timeline(low.dedup_key)
    assert "released_from_quiet_hours" in [e["kind"] for e in timeline["events"]]
    await rig.desk.acknowledge(low.dedup_key, "person:x")
    rig.clock.now = QUIET_END
    await _round(rig.service)
    assert len(rig.smtp.to(f"primary-{rig.tag}@h.test")) == 2


async def test_an_escalated_alert_is_paged_with_its_new_priority_from_then_on(rig: Rig) -> None:
    """A MEDIUM alert paged at once worsens to HIGH: the escalation notice carries HIGH and the
    worsened title, and so does the next step's page when nobody acknowledges. The first page
    stays what it was (MEDIUM): it was sent before."""
    _, patient = await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    start = _prioritised(patient, "INTERRUPTED", AlertPriority.MEDIUM)
    await rig.service.handle_alert(start)
    assert _subjects(rig, "primary") == [f"[VIGIL MEDIUM] {start.title} — patient {patient}"]
    rig.clock.advance(minutes=1)
    worse = _prioritised(patient, "INTERRUPTED", AlertPriority.HIGH, AlertPhase.ESCALATE)
    await rig.service.handle_alert(worse)
    notices = _subjects(rig, "primary")[1:]
    assert notices == [f"[VIGIL HIGH] Escalated: {worse.title} — patient {patient}"], notices
    rig.clock.advance(minutes=10)  # past the first step's wait: the second step pages
    await _round(rig.service)
    later = _subjects(rig, "secondary")
    assert later and all(s.startswith("[VIGIL HIGH] ") and worse.title in s for s in later), later


async def test_quiet_hours_api_validates_audits_and_defaults_to_none(rig: Rig) -> None:
    """No quiet hours until set; an unknown team's are refused; set ones are read back and
    written to the audit log with who set them and the values before and after; removing them
    is audited too. (The care-team API's validation of a request: tests/api/test_api_oncall.)"""
    team, _ = await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    registry = rig.desk.registry
    assert await registry.quiet_hours(team) is None
    good = {"timezone": "Europe/Berlin", "start": "22:00", "end": "07:00", "by": "p:a"}
    assert not await rig.desk.quiet_hours(f"{team}-none", **good)
    assert await rig.desk.quiet_hours(team, **good)
    read = await registry.quiet_hours(team)
    assert read is not None
    assert (read["timezone"], read["start"], read["end"], read["updated_by"]) == (
        "Europe/Berlin",
        time(22, 0),
        time(7, 0),
        "p:a",
    )
    assert await rig.desk.quiet_hours(team, **{**good, "start": "23:30", "by": "p:b"})
    assert await registry.remove_quiet_hours(team, by="p:c")
    assert await registry.quiet_hours(team) is None
    rows = await rig.pool.fetch(
        "SELECT actor, details FROM audit_log WHERE action = 'notify.quiet_hours_changed' "
        "AND subject = $1 ORDER BY seq",
        f"care_team:{team}",
    )
    changes = [(r["actor"], json.loads(r["details"])) for r in rows]
    assert [actor for actor, _ in changes] == ["p:a", "p:b", "p:c"]
    assert changes[0][1]["before"] is None and changes[0][1]["after"]["start"] == "22:00:00"
    assert changes[1][1]["before"]["start"] == "22:00:00"
    assert changes[1][1]["after"]["start"] == "23:30:00"
    assert changes[2][1]["after"] is None


# -- all clear after a failover ---------------------------------------------------------------


async def test_all_clear_goes_where_each_person_was_actually_reached(rig: Rig) -> None:
    """One step pages three people. The fellow's PagerDuty trigger is refused for good (400) and
    fails over to e-mail; the nurse's SMS is refused and fails over to e-mail; the attending's
    PagerDuty trigger is accepted. When the alert ends: the fellow and the nurse get the
    all-clear by e-mail (the channel that reached them), no SMS is attempted again, and
    PagerDuty gets exactly one event more: the resolve of the attending's incident."""
    fellow_key, attending_key = f"rk-f-{rig.tag}", f"rk-a-{rig.tag}"
    phone = f"+1557{int(rig.tag, 16) % 10_000_000:07d}"
    people = {
        "fellow": [
            {"channel": "webhook", "address": fellow_key},
            {"channel": "email", "address": f"fellow-{rig.tag}@h.test"},
        ],
        "nurse": [
            {"channel": "sms", "address": phone},
            {"channel": "email", "address": f"nurse-{rig.tag}@h.test"},
        ],
        "attending": [
            {"channel": "webhook", "address": attending_key},
            {"channel": "email", "address": f"attending-{rig.tag}@h.test"},
        ],
    }
    steps = [
        {
            "targets": [{"kind": "person", "ref": f"{p}-{rig.tag}"} for p in people],
            "wait_minutes": 5,
        }
    ]
    await _team(rig, people=people, steps=steps)
    rig.pagerduty.respond = lambda event: 400 if event["routing_key"] == fellow_key else 202
    rig.twilio.respond = lambda form: (400, "The 'To' number is not a valid phone number.")
    alert = _alert(f"P-{rig.tag}")
    await rig.service.handle_alert(alert)
    await rig.service.deliver_due()
    assert len(rig.smtp.to(f"fellow-{rig.tag}@h.test")) == 1
    assert len(rig.smtp.to(f"nurse-{rig.tag}@h.test")) == 1
    assert rig.smtp.to(f"attending-{rig.tag}@h.test") == []
    assert _pd_events(rig, attending_key) == [("trigger", alert.dedup_key)]
    sms_tries = rig.twilio.create_calls

    rig.clock.advance(minutes=1)
    await rig.service.handle_alert(_alert(f"P-{rig.tag}", AlertPhase.END))
    await rig.service.deliver_due()
    for role in ("fellow", "nurse"):
        mails = rig.smtp.to(f"{role}-{rig.tag}@h.test")
        assert len(mails) == 2, role
        assert "[VIGIL ALL CLEAR]" in _mail(mails[1])["Subject"], role
    assert rig.smtp.to(f"attending-{rig.tag}@h.test") == []
    assert rig.twilio.create_calls == sms_tries
    assert _pd_events(rig, attending_key) == [
        ("trigger", alert.dedup_key),
        ("resolve", alert.dedup_key),
    ]
    assert _pd_events(rig, fellow_key) == []


# -- alerts no policy covers: the fallback chain ----------------------------------------------


async def _close_by_dedup_key(pool: Any, dedup_key: str) -> None:
    """Stop one unroutable alert's chain (filed under the shared unassigned team, so it is
    closed by its own key, never by team)."""
    await pool.execute(
        """
        WITH closed AS (
            UPDATE escalations SET status = 'resolved', due_at = NULL
            WHERE dedup_key = $1 RETURNING escalation_id
        )
        UPDATE pages SET status = 'cancelled', next_attempt_at = NULL
        WHERE escalation_id IN (SELECT escalation_id FROM closed)
          AND status IN ('queued', 'failed', 'sending')
        """,
        dedup_key,
    )


def _text(raw: bytes) -> str:
    """Every text part of the message, decoded."""
    return "\n".join(
        str(part.get_content())
        for part in _modern(raw).walk()
        if part.get_content_maintype() == "text"
    )


async def _round_at(service: EscalationService) -> None:
    await service.tick()
    await service.deliver_due()


async def test_unknown_patient_pages_the_fallback_until_acknowledged_then_all_clear(
    rig: Rig,
) -> None:
    """An alert for a patient nobody registered is escalated, not paged once: the configured
    fallback address is paged at once (saying why), again after five minutes (not at 4:59),
    stops when acknowledged through the API, and gets the all clear when the alert ends. The
    chain is frozen on the alert like any policy and shows in its timeline."""
    fallback = f"fallback-{rig.tag}@h.test"
    service = rig.new_instance(fallback_email=fallback)
    alert = _alert(f"P-unregistered-{rig.tag}")
    try:
        assert await service.handle_alert(alert)
        mails = rig.smtp.to(fallback)
        assert len(mails) == 1
        body = _text(mails[0])
        assert f"patient {alert.patient_id} is not registered" in body
        assert "http://notify.test/ack/" in body

        rig.clock.advance(minutes=4, seconds=59)
        await _round_at(service)
        assert len(rig.smtp.to(fallback)) == 1
        rig.clock.advance(seconds=1)
        await _round_at(service)
        assert len(rig.smtp.to(fallback)) == 2

        timeline = await rig.desk.timeline(alert.dedup_key)
        assert timeline["status"] == "open"
        frozen = await rig.pool.fetchval(
            "SELECT care_team_id FROM escalations WHERE dedup_key = $1", alert.dedup_key
        )
        assert frozen == "unassigned"

        acked = await rig.desk.acknowledge(alert.dedup_key, f"desk-{rig.tag}")
        assert acked.outcome is AckOutcome.ACKNOWLEDGED
        rig.clock.advance(minutes=30)
        await _round_at(service)
        assert len(rig.smtp.to(fallback)) == 2

        await service.handle_alert(_alert(alert.patient_id, AlertPhase.END))
        mails = rig.smtp.to(fallback)
        assert len(mails) == 3
        assert "[VIGIL ALL CLEAR]" in _mail(mails[-1])["Subject"]
    finally:
        await _close_by_dedup_key(rig.pool, alert.dedup_key)


async def test_unacknowledged_fallback_chain_pages_four_times_then_stops(rig: Rig) -> None:
    """Nobody answers: the fallback address is paged at 0, 5, 10 and 15 minutes (the default
    policy's four rounds) and not a fifth time; the escalation is then exhausted."""
    fallback = f"fallback-{rig.tag}@h.test"
    service = rig.new_instance(fallback_email=fallback)
    alert = _alert(f"P-unregistered-{rig.tag}")
    try:
        await service.handle_alert(alert)
        for expected in (2, 3, 4, 4):
            rig.clock.advance(minutes=5)
            await _round_at(service)
            assert len(rig.smtp.to(fallback)) == expected
        status = await rig.pool.fetchval(
            "SELECT status FROM escalations WHERE dedup_key = $1", alert.dedup_key
        )
        assert status == "exhausted"
    finally:
        await _close_by_dedup_key(rig.pool, alert.dedup_key)


async def test_unknown_patient_alert_survives_a_crash_before_it_is_recorded_sent(
    rig: Rig,
) -> None:
    """The process dies after the mail server took the first fallback page but before it was
    recorded (the Kafka offset is then not committed). After the restart the redelivered alert
    opens no second chain, the page is sent again once its lease runs out (a duplicate, never a
    miss), and the chain goes on repeating until acknowledged."""
    fallback = f"fallback-{rig.tag}@h.test"

    class Crash(Exception):
        pass

    crashing = rig.new_instance(
        unit_of_work=_killed_before_recording(
            rig.pool, Crash("killed after the provider accepted, before the write")
        ),
        fallback_email=fallback,
    )
    alert = _alert(f"P-unregistered-{rig.tag}")
    try:
        with pytest.raises(Crash):
            await crashing.handle_alert(alert)
        assert len(rig.smtp.to(fallback)) == 1

        restarted = rig.new_instance(fallback_email=fallback)
        assert await restarted.handle_alert(alert)  # redelivered: the offset was not committed
        assert (
            await rig.pool.fetchval(
                "SELECT count(*) FROM escalations WHERE dedup_key = $1", alert.dedup_key
            )
            == 1
        )
        rig.clock.advance(seconds=31)  # the dead process's lease runs out
        await restarted.deliver_due()
        assert len(rig.smtp.to(fallback)) == 2
        statuses = await rig.pool.fetch(
            "SELECT status FROM pages WHERE dedup_key = $1", alert.dedup_key
        )
        assert [r["status"] for r in statuses] == ["sent"]
        rig.clock.advance(minutes=5)
        await _round_at(restarted)
        assert len(rig.smtp.to(fallback)) == 3
    finally:
        await _close_by_dedup_key(rig.pool, alert.dedup_key)


async def test_team_without_policy_or_address_is_never_held_by_its_quiet_hours(rig: Rig) -> None:
    """A team with quiet hours but neither a policy nor an on-call address: its LOW alert inside
    the quiet hours is not held for a digest (the fallback chain pages no team) but paged to
    the fallback address at once, filed under the team; a LOW alert of an unregistered patient
    is paged at once too."""
    fallback = f"fallback-{rig.tag}@h.test"
    service = rig.new_instance(fallback_email=fallback)
    team, patient = f"CT-{rig.tag}", f"P-{rig.tag}"
    await rig.pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, 'x', '')", team
    )
    await rig.pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
    )
    assert await rig.desk.quiet_hours(
        team, timezone="Europe/Berlin", start="22:00", end="07:00", by=f"person:lead-{rig.tag}"
    )
    low = _prioritised(patient, "BATTERY", AlertPriority.LOW)
    stranger = _prioritised(f"P-unregistered-{rig.tag}", "BATTERY", AlertPriority.LOW)
    try:
        assert await service.handle_alert(low)
        assert len(rig.smtp.to(fallback)) == 1
        assert (
            await rig.pool.fetchval(
                "SELECT care_team_id FROM escalations WHERE dedup_key = $1", low.dedup_key
            )
            == team
        )
        assert await service.handle_alert(stranger)
        assert len(rig.smtp.to(fallback)) == 2
    finally:
        await _close_by_dedup_key(rig.pool, stranger.dedup_key)


async def test_end_of_an_episode_never_escalated_is_only_recorded(rig: Rig) -> None:
    """The edge: a continue or end phase whose episode has no escalation pages nobody (nobody
    holds it) and is recorded; an escalate phase without one opens the fallback chain, because
    a worsened alert must reach someone."""
    fallback = f"fallback-{rig.tag}@h.test"
    service = rig.new_instance(fallback_email=fallback)
    patient = f"P-unregistered-{rig.tag}"
    ended = _alert(patient, AlertPhase.END)
    worsened = _alert(patient, AlertPhase.ESCALATE, code="OCCLUSION")
    try:
        assert await service.handle_alert(ended) is False
        assert await service.handle_alert(_alert(patient, AlertPhase.CONTINUE)) is False
        assert rig.smtp.to(fallback) == []
        assert await rig.pool.fetchval("SELECT 1 FROM alerts WHERE alert_id = $1", ended.alert_id)
        assert await service.handle_alert(worsened) is True
        assert len(rig.smtp.to(fallback)) == 1
    finally:
        await _close_by_dedup_key(rig.pool, worsened.dedup_key)


# -- alarm burden: the technical hold, a held alarm never dropped, all clears at night ----------

HOLD_S = 300.0


def _technical(
    patient: str,
    code: str,
    priority: AlertPriority = AlertPriority.MEDIUM,
    phase: AlertPhase = AlertPhase.START,
) -> Alert:
    return _alert(patient, phase, code=code).model_copy(
        update={
            "kind": AlertKind.TECHNICAL,
            "priority": priority,
            "title": f"{code} ({priority.value})",
            "state": AlertState.INACTIVE if phase is AlertPhase.END else AlertState.ACTIVE,
        }
    )


def _events(timeline: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["detail"] for e in timeline["events"] if e["kind"] == kind]


async def test_technical_alert_that_ends_inside_its_hold_is_recorded_never_paged(rig: Rig) -> None:
    """Must not: a MEDIUM device-silent alarm that ends 299 s after it started (hold 300 s)
    pages nobody, neither the alarm nor an all clear; its timeline says it was held and why it
    was not paged. Positive control in the same run: a second technical alarm still open when
    its hold ends is paged at exactly 300 s, not at 299 s."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", rig.new_instance(technical_hold_s=HOLD_S)
    flapping = _technical(patient, "DEVICE_SILENT")
    lasting = _technical(patient, "SENSOR_FAULT")
    assert await service.handle_alert(flapping)
    assert await service.handle_alert(lasting)
    rig.clock.advance(seconds=299)
    await _round(service)
    end = _technical(patient, "DEVICE_SILENT", phase=AlertPhase.END)
    assert await service.handle_alert(end)
    await _round(service)
    assert _subjects(rig, "primary") == []
    rig.clock.advance(seconds=1)
    await _round(service)
    assert _subjects(rig, "primary") == [f"[VIGIL MEDIUM] {lasting.title} — patient {patient}"]
    quiet = await rig.desk.timeline(flapping.dedup_key)
    assert quiet["status"] == "resolved"
    assert [d["due_at"] for d in _events(quiet, "held_technical")] == [
        (T0 + timedelta(seconds=HOLD_S)).isoformat()
    ]
    [ended] = _events(quiet, "technical_hold_ended")
    assert (ended["paged"], ended["open_s"], ended["hold_s"]) == (False, 299.0, HOLD_S)
    assert (
        await rig.pool.fetchval(
            "SELECT count(*) FROM pages WHERE dedup_key = $1", flapping.dedup_key
        )
        == 0
    )
    paged = await rig.desk.timeline(lasting.dedup_key)
    assert [d["paged"] for d in _events(paged, "technical_hold_ended")] == [True]


async def test_a_device_silence_shorter_than_the_silence_hold_is_never_paged(rig: Rig) -> None:
    """Must not / must / edge: with the technical hold at 300 s and the silence hold at 2700 s,
    a pump silence (rule device_silent) that ends 2699 s after it arrived (a hub dropout whose
    buffer came back) pages nobody, neither the alarm nor an all clear; a second silence still
    open at 2700 s is paged then, not at 2699 s; a sensor fault arriving with them (positive
    control for the shorter hold) is paged at 300 s."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient = f"P-{rig.tag}"
    service = rig.new_instance(technical_hold_s=HOLD_S, silence_hold_s=2700.0)

    def silence(code: str, phase: AlertPhase = AlertPhase.START) -> Alert:
        return _technical(patient, code, phase=phase).model_copy(
            update={"rule_id": "device_silent"}
        )

    dropout, dead_hub = silence("PUMP_SILENT"), silence("THERMO_SILENT")
    fault = _technical(patient, "SENSOR_FAULT")
    for alert in (dropout, dead_hub, fault):
        assert await service.handle_alert(alert)
    rig.clock.advance(seconds=HOLD_S)
    await _round(service)
    assert _subjects(rig, "primary") == [f"[VIGIL MEDIUM] {fault.title} — patient {patient}"]
    rig.clock.advance(seconds=2699 - HOLD_S)
    await _round(service)
    assert await service.handle_alert(silence("PUMP_SILENT", AlertPhase.END))
    await _round(service)
    assert len(_subjects(rig, "primary")) == 1
    rig.clock.advance(seconds=1)
    await _round(service)
    assert _subjects(rig, "primary")[1:] == [f"[VIGIL MEDIUM] {dead_hub.title} — patient {patient}"]
    quiet = await rig.desk.timeline(dropout.dedup_key)
    [ended] = _events(quiet, "technical_hold_ended")
    assert (ended["paged"], ended["open_s"], ended["hold_s"]) == (False, 2699.0, 2700.0)
    assert (
        await rig.pool.fetchval(
            "SELECT count(*) FROM pages WHERE dedup_key = $1", dropout.dedup_key
        )
        == 0
    )


async def test_high_and_physiological_alerts_are_never_held_by_the_technical_hold(
    rig: Rig,
) -> None:
    """Must: with the hold on, a HIGH technical alarm (occlusion) and a MEDIUM physiological
    one (sustained fever) are each paged inside handle_alert, at once."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", rig.new_instance(technical_hold_s=HOLD_S)
    occlusion = _technical(patient, "OCCLUSION", AlertPriority.HIGH)
    fever = _prioritised(patient, "FEVER_SUSTAINED", AlertPriority.MEDIUM)
    assert await service.handle_alert(occlusion)
    assert await service.handle_alert(fever)
    assert sorted(_subjects(rig, "primary")) == sorted(
        [
            f"[VIGIL HIGH] {occlusion.title} — patient {patient}",
            f"[VIGIL MEDIUM] {fever.title} — patient {patient}",
        ]
    )


async def test_technical_hold_survives_a_restart_and_a_worsening_releases_it(rig: Rig) -> None:
    """Nothing held is dropped: a held technical alarm is paged at its hold's end by another
    notify instance (a restart). Edge: a held one that escalates to HIGH is paged at once."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient = f"P-{rig.tag}"
    first = rig.new_instance(technical_hold_s=HOLD_S)
    battery = _technical(patient, "BATTERY_LOW")
    silent = _technical(patient, "DEVICE_SILENT")
    assert await first.handle_alert(battery)
    assert await first.handle_alert(silent)
    rig.clock.advance(seconds=10)
    worse = _technical(patient, "BATTERY_LOW", AlertPriority.HIGH, AlertPhase.ESCALATE)
    assert await first.handle_alert(worse)
    # Sent concurrently, in either order: its page and the escalation notice, both HIGH.
    assert sorted(_subjects(rig, "primary")) == [
        f"[VIGIL HIGH] {worse.title} — patient {patient}",
        f"[VIGIL HIGH] Escalated: {worse.title} — patient {patient}",
    ]
    restarted = rig.new_instance(technical_hold_s=HOLD_S)
    rig.clock.now = T0 + timedelta(seconds=HOLD_S - 1)
    await _round(restarted)
    assert len(_subjects(rig, "primary")) == 2
    rig.clock.now = T0 + timedelta(seconds=HOLD_S)
    await _round(restarted)
    assert _subjects(rig, "primary")[2:] == [f"[VIGIL MEDIUM] {silent.title} — patient {patient}"]


async def test_held_alarm_whose_end_arrives_after_its_follow_up_was_written_is_still_paged(
    rig: Rig,
) -> None:
    """Nothing held is dropped: the follow-up of a held alarm is written at the window's end,
    and the alarm's end arrives before the page was sent (63 ms, as the alarm-burden benchmark
    saw, where only the all clear went out). The alarm's page is sent, then its all clear, in
    that order.
    Positive control: the repeat of a chain that ended is still cancelled."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", _bundling(rig)
    occlusion, stopped, _ = (_burst_alert(patient, *spec) for spec in _BURST)
    await service.handle_alert(occlusion)
    await service.handle_alert(stopped)
    rig.clock.now = T0 + timedelta(seconds=GROUP_WAIT_S)
    await service.tick()  # the follow-up is written, not yet sent
    rig.clock.advance(seconds=0.063)
    ended = stopped.model_copy(
        update={"alert_id": uuid.uuid4(), "phase": AlertPhase.END, "state": AlertState.INACTIVE}
    )
    assert await service.handle_alert(ended)
    await service.deliver_due()
    assert _subjects(rig, "primary")[1:] == [
        f"[VIGIL HIGH] {stopped.title} — patient {patient}",
        f"[VIGIL ALL CLEAR] {stopped.title} — patient {patient}",
    ]
    # The occlusion's second step (secondary, due at 5 min) after its end: cancelled, not sent.
    await service.handle_alert(
        occlusion.model_copy(
            update={"alert_id": uuid.uuid4(), "phase": AlertPhase.END, "state": AlertState.INACTIVE}
        )
    )
    rig.clock.now = T0 + timedelta(minutes=6)
    await _round(service)
    assert _subjects(rig, "secondary") == []


BERLIN_2130 = datetime(2025, 2, 28, 20, 30, tzinfo=UTC)  # 21:30 CET, before quiet hours


async def test_all_clear_at_night_reaches_whoever_the_alarm_woke_and_waits_for_the_others(
    rig: Rig,
) -> None:
    """Quiet hours 22:00-07:00 Europe/Berlin. A MEDIUM alarm paged the primary at 21:30 (before
    them) and, unacknowledged, the secondary at 22:05 (woken by it). It ends at 03:00: the
    secondary gets the all clear at once; the primary's waits for 07:00 (must not wake them),
    recorded as deferred, and is sent then, not a minute before (edge)."""
    _, patient = await _quiet_team(rig)
    alert = _prioritised(patient, "INTERRUPTED", AlertPriority.MEDIUM)
    rig.clock.now = BERLIN_2130
    assert await rig.service.handle_alert(alert)
    rig.clock.now = BERLIN_2130 + timedelta(minutes=35)
    await _round(rig.service)
    assert len(_subjects(rig, "secondary")) == 1
    rig.clock.now = T0
    end = _prioritised(patient, "INTERRUPTED", AlertPriority.MEDIUM, AlertPhase.END)
    assert await rig.service.handle_alert(end)
    await rig.service.deliver_due()
    clear = f"[VIGIL ALL CLEAR] {alert.title} — patient {patient}"
    assert _subjects(rig, "secondary")[1:] == [clear]
    assert _subjects(rig, "primary") == [f"[VIGIL MEDIUM] {alert.title} — patient {patient}"]
    timeline = await rig.desk.timeline(alert.dedup_key)
    assert [(d["recipient"], d["until"]) for d in _events(timeline, "all_clear_deferred")] == [
        (f"person:primary-{rig.tag}", QUIET_END.isoformat())
    ]
    rig.clock.now = QUIET_END - timedelta(minutes=1)
    await _round(rig.service)
    assert _subjects(rig, "primary")[1:] == []
    rig.clock.now = QUIET_END
    await _round(rig.service)
    assert _subjects(rig, "primary")[1:] == [clear]


async def test_all_clear_of_a_high_alarm_is_never_held_by_quiet_hours(rig: Rig) -> None:
    """Must: a HIGH alarm paged at 21:30, ending at 03:00 inside quiet hours: its all clear is
    sent at once (whoever it paged may be acting on it). Positive control: a MEDIUM one paged
    at the same time and ending with it is deferred to 07:00."""
    _, patient = await _quiet_team(rig)
    high = _prioritised(patient, "OCCLUSION", AlertPriority.HIGH)
    medium = _prioritised(patient, "RESERVOIR_LOW", AlertPriority.MEDIUM)
    rig.clock.now = BERLIN_2130
    for alert in (high, medium):
        assert await rig.service.handle_alert(alert)
        await rig.desk.acknowledge(alert.dedup_key, f"person:primary-{rig.tag}")
    rig.clock.now = T0
    for alert in (high, medium):
        assert await rig.service.handle_alert(
            _prioritised(patient, alert.code, alert.priority, AlertPhase.END)
        )
    await rig.service.deliver_due()
    assert _subjects(rig, "primary")[2:] == [f"[VIGIL ALL CLEAR] {high.title} — patient {patient}"]


async def test_technical_alert_whose_start_and_end_arrive_together_after_a_dropout_is_paged(
    rig: Rig,
) -> None:
    """Edge: a low battery that lasted 22 min by the pump's clock, hidden by a dropout, arrives
    with its end in one burst: no flap, so it is paged, then its all clear, in that order."""
    await _team(rig, people=_email_people(rig.tag), steps=_three_step_policy(rig.tag))
    patient, service = f"P-{rig.tag}", rig.new_instance(technical_hold_s=HOLD_S)
    start = _technical(patient, "BATTERY_LOW")
    end = _technical(patient, "BATTERY_LOW", phase=AlertPhase.END).model_copy(
        update={"device_time": T0 + timedelta(minutes=22)}
    )
    rig.clock.now = T0 + timedelta(minutes=30)
    assert await service.handle_alert(start)
    assert await service.handle_alert(end)
    await service.deliver_due()
    assert _subjects(rig, "primary") == [
        f"[VIGIL MEDIUM] {start.title} — patient {patient}",
        f"[VIGIL ALL CLEAR] {start.title} — patient {patient}",
    ]
