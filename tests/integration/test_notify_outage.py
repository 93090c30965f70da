"""After a pipeline outage, inside notify: real PostgreSQL, a real SMTP server (aiosmtpd), an
injected clock. The heartbeat stops, alerts of the outage arrive once it is back, and each care
team gets one summary; an episode that began and ended inside the outage is not paged as a
start and an all clear; a HIGH alert still open is paged at once, saying since when; an
escalation left open across a restart resumes as a numbered repeat.

Every test uses its own care teams, patients and heartbeat source and cleans up its rows.
"""

from __future__ import annotations

import email
import email.policy
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from functools import partial
from typing import Any

import asyncpg
import pytest

from schemas.events import Alert, AlertPhase, AlertPriority, Evidence
from services.notify.adapters.outage_store import PostgresOutageStore
from services.notify.adapters.postgres.unit_of_work import unit_of_work_factory
from services.notify.domain.message import clock_time
from services.notify.service_layer.escalation import (
    HEARTBEAT_CODE,
    EscalationService,
    load_policy,
)
from services.notify.service_layer.outage import OutageConfig, OutageWatch
from tests.factories import make_alert
from tests.support.escalation import escalation_service, smtp_sender
from tests.support.notify import ManualClock, SmtpSink
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
SECRET = b"integration-test-ack-secret-0123456789"
HOLD_S = 5.0
SETTLE_S = 150.0


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    await apply_migrations(pg_dsn)
    connections = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=8)
    try:
        yield connections
    finally:
        await connections.close()


def _service(pool: Any, clock: ManualClock, smtp: SmtpSink, tag: str) -> EscalationService:
    fallback = f"fallback-{tag}@h.test"
    unit_of_work = unit_of_work_factory(pool, fallback_email=fallback)
    sender = smtp_sender(smtp.port)
    outages = OutageWatch(
        store=PostgresOutageStore(pool),
        load_policy=partial(load_policy, unit_of_work),
        email=sender,
        sms=None,
        webhook=None,
        config=OutageConfig(
            sender_address="vigil@localhost",
            fallback_email=fallback,
            hold_s=HOLD_S,
            settle_s=SETTLE_S,
            care_team_ids=frozenset({f"CT-A-{tag}", f"CT-B-{tag}"}),
        ),
        clock=clock,
    )
    return escalation_service(
        pool,
        clock,
        email=sender,
        ack_secret=SECRET,
        unit_of_work=unit_of_work,
        fallback_email=fallback,
        outages=outages,
        heartbeat_timeout_s=60,
        technical_care_team_id=None,
    )


async def _teams(pool: Any, tag: str) -> None:
    """Team A (Berlin): nurse paged by e-mail, policy of one step repeated twice; patients A1,
    A2. Team B (UTC): no policy, its on-call address; patient B1."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO care_teams (care_team_id, name, oncall_email, timezone) VALUES "
            "($1, 'Onc A', $2, 'Europe/Berlin'), ($3, 'Onc B', $4, 'UTC')",
            f"CT-A-{tag}",
            f"oncall-a-{tag}@h.test",
            f"CT-B-{tag}",
            f"oncall-b-{tag}@h.test",
        )
        await conn.execute(
            "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, 'Nurse', $2)",
            f"nurse-{tag}",
            f"CT-A-{tag}",
        )
        await conn.execute(
            "INSERT INTO contact_methods (person_id, rank, channel, address) "
            "VALUES ($1, 0, 'email', $2)",
            f"nurse-{tag}",
            f"nurse-{tag}@h.test",
        )
        await conn.execute(
            "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, repeat_count) "
            "VALUES ($1, $2, 'onc', $3::jsonb, 2)",
            f"pol-{tag}",
            f"CT-A-{tag}",
            json.dumps([{"wait_s": 300, "targets": [{"kind": "person", "ref": f"nurse-{tag}"}]}]),
        )
        await conn.execute(
            "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $3), ($2, $3), ($4, $5)",
            f"A1-{tag}",
            f"A2-{tag}",
            f"CT-A-{tag}",
            f"B1-{tag}",
            f"CT-B-{tag}",
        )


async def _cleanup(pool: Any, tag: str, source: str) -> None:
    for team in (f"CT-A-{tag}", f"CT-B-{tag}"):
        await pool.execute(
            """
            WITH closed AS (
                UPDATE escalations SET status = 'resolved', due_at = NULL
                WHERE care_team_id = $1 OR dedup_key LIKE 'pipeline:silent:' || $2 || ':%'
                RETURNING escalation_id
            )
            UPDATE pages SET status = 'cancelled', next_attempt_at = NULL
            WHERE escalation_id IN (SELECT escalation_id FROM closed)
              AND status IN ('queued', 'failed', 'sending')
            """,
            team,
            source,
        )
    await pool.execute(
        "UPDATE pipeline_outages SET summarised_at = coalesce(summarised_at, now()), "
        "ended_at = coalesce(ended_at, started_at) WHERE source = $1",
        source,
    )
    await pool.execute(
        "UPDATE pipeline_outage_held SET released_at = now() WHERE released_at IS NULL "
        "AND outage_id IN (SELECT outage_id FROM pipeline_outages WHERE source = $1)",
        source,
    )
    await pool.execute(
        "UPDATE pipeline_outage_pages SET status = 'failed' WHERE status = 'queued' "
        "AND outage_id IN (SELECT outage_id FROM pipeline_outages WHERE source = $1)",
        source,
    )
    await pool.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", source)


def _alert(
    patient: str,
    code: str,
    title: str,
    priority: AlertPriority,
    at: datetime,
    phase: AlertPhase = AlertPhase.START,
) -> Alert:
    ended = phase is AlertPhase.END
    return make_alert(
        patient_id=patient,
        code=code,
        phase=phase,
        at=at,
        device_id=f"dev-{patient}",
        priority=AlertPriority.INFO if ended else priority,
        title=f"All clear: {title}" if ended else title,
        evidence=(
            Evidence(name="value", value=1.0, unit="", limit=0.0, comparator=">", device_time=at),
        ),
        rule_id=code.lower(),
    )


def _beat(source: str, at: datetime) -> Alert:
    return _alert("pipeline", HEARTBEAT_CODE, "heartbeat", AlertPriority.INFO, at).model_copy(
        update={"device_id": source, "code": HEARTBEAT_CODE}
    )


def _modern(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _mails(smtp: SmtpSink, address: str) -> list[EmailMessage]:
    return [_modern(raw) for raw in smtp.to(address)]


async def _round(service: EscalationService) -> None:
    await service.tick()
    await service.check_heartbeat()
    await service.outage_round()
    await service.deliver_due()


async def test_outage_gives_one_summary_per_team_and_no_start_all_clear_pairs(
    pool: Any, smtp: SmtpSink
) -> None:
    tag = uuid.uuid4().hex[:8]
    source = f"heartbeat-outage-{tag}"
    await _teams(pool, tag)
    clock = ManualClock(T0)
    service = _service(pool, clock, smtp, tag)
    nurse, oncall_b = f"nurse-{tag}@h.test", f"oncall-b-{tag}@h.test"
    a1, a2 = f"A1-{tag}", f"A2-{tag}"
    try:
        assert await service.handle_alert(_beat(source, T0))
        # The heartbeat stops; past the timeout the self-watch notices (technical page).
        clock.advance(seconds=61)
        await _round(service)
        outage = await pool.fetchrow("SELECT * FROM pipeline_outages WHERE source = $1", source)
        assert outage is not None and outage["started_at"] == T0 and outage["ended_at"] is None

        # 40 min later the heartbeat is back.
        clock.now = T0 + timedelta(minutes=40)
        back = clock.now
        assert await service.handle_alert(_beat(source, back))
        await _round(service)
        outage = await pool.fetchrow("SELECT * FROM pipeline_outages WHERE source = $1", source)
        assert outage["ended_at"] == back and outage["recovered_at"] == back
        audited = await pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'notify.pipeline_outage_recorded' "
            "AND subject = $1",
            f"pipeline:{source}",
        )
        assert audited == 1

        # The devices' queued data reach the rules: a MEDIUM interruption of A1 that began and
        # ended inside the outage (start, then its end a second later) ...
        began, ended = T0 + timedelta(minutes=10), T0 + timedelta(minutes=25)
        interruption = _alert(
            a1, "INTERRUPTION", "Infusion interrupted", AlertPriority.MEDIUM, began
        )
        await service.handle_alert(interruption)
        assert _mails(smtp, nurse) == []  # held for its end, at most HOLD_S
        clock.advance(seconds=1)
        await service.handle_alert(
            _alert(
                a1,
                "INTERRUPTION",
                "Infusion interrupted",
                AlertPriority.MEDIUM,
                ended,
                AlertPhase.END,
            )
        )
        # ... and a HIGH fever of A2 that began inside it and is still open: paged at once.
        fever_at = T0 + timedelta(minutes=30)
        await service.handle_alert(
            _alert(a2, "FEVER", "Fever 38.9 °C", AlertPriority.HIGH, fever_at)
        )
        pages = _mails(smtp, nurse)
        assert [p["Subject"] for p in pages] == [f"[VIGIL HIGH] Fever 38.9 °C — patient {a2}"]
        assert clock_time(fever_at, "Europe/Berlin") in pages[0].get_content()

        # A MEDIUM alert of A1 still open when its wait is over is paged then (positive
        # control: holding delays, never drops).
        low_battery = _alert(
            a1, "BATTERY", "Pump battery low", AlertPriority.MEDIUM, T0 + timedelta(minutes=35)
        )
        await service.handle_alert(low_battery)
        clock.advance(seconds=HOLD_S)
        await _round(service)
        subjects = [p["Subject"] for p in _mails(smtp, nurse)]
        assert subjects[-1] == f"[VIGIL MEDIUM] Pump battery low — patient {a1}"
        assert not any("Infusion interrupted" in s for s in subjects)  # no start, no all clear

        # No summary before the settle time; exactly one per team after it, also on a second
        # round and from a second instance.
        assert not any(s.startswith("[VIGIL] Not watching") for s in subjects)
        assert _mails(smtp, oncall_b) == []
        clock.now = back + timedelta(seconds=SETTLE_S)
        await _round(service)
        await _round(_service(pool, clock, smtp, tag))
        await _round(service)
        summaries = [p for p in _mails(smtp, nurse) if p["Subject"].startswith("[VIGIL] Not")]
        assert len(summaries) == 1
        b_mail = _mails(smtp, oncall_b)
        assert len(b_mail) == 1 and "no alarms" in b_mail[0]["Subject"]
        assert "No alarms for any patient of this team." in b_mail[0].get_content()

        text = summaries[0].get_content()
        start, end = clock_time(T0, "Europe/Berlin"), clock_time(back, "Europe/Berlin")
        assert f"Vigil was not watching from {start} to {end}" in text
        assert "(Europe/Berlin)" in text
        assert (
            f"Infusion interrupted: began {clock_time(began, 'Europe/Berlin')}, ended "
            f"{clock_time(ended, 'Europe/Berlin')} (not paged: reported here only)" in text
        )
        assert f"Fever 38.9 °C: STILL OPEN since {clock_time(fever_at, 'Europe/Berlin')}" in text
        needs = text.split("Needs action now:")[1]
        assert f"Patient {a2}: Fever 38.9 °C" in needs and "Infusion interrupted" not in needs
        assert f"Patient {a1}: Pump battery low" in needs

        # Exactly what reached the nurse: the fever, the battery, one summary.
        assert len(_mails(smtp, nurse)) == 3
        held = await pool.fetch(
            "SELECT dedup_key, outcome FROM pipeline_outage_held h JOIN pipeline_outages o "
            "USING (outage_id) WHERE o.source = $1 ORDER BY dedup_key",
            source,
        )
        assert [(r["dedup_key"], r["outcome"]) for r in held] == [
            (f"{a1}:BATTERY", "paged"),
            (f"{a1}:INTERRUPTION", "folded"),
        ]
    finally:
        await _cleanup(pool, tag, source)


async def test_alert_outside_any_outage_is_not_held(pool: Any, smtp: SmtpSink) -> None:
    """Positive control for the hold: a MEDIUM start with no outage behind it pages at once."""
    tag = uuid.uuid4().hex[:8]
    source = f"heartbeat-outage-{tag}"
    await _teams(pool, tag)
    clock = ManualClock(T0 + timedelta(days=400))
    service = _service(pool, clock, smtp, tag)
    try:
        await service.handle_alert(
            _alert(f"A1-{tag}", "BATTERY", "Pump battery low", AlertPriority.MEDIUM, clock.now)
        )
        assert len(smtp.to(f"nurse-{tag}@h.test")) == 1
    finally:
        await _cleanup(pool, tag, source)


async def test_escalation_open_across_a_restart_resumes_as_a_numbered_repeat(
    pool: Any, smtp: SmtpSink
) -> None:
    """Paged, then notify stops for an hour (an outage): the restarted instance's next page is
    "Repeat 1 of 2" and says since when the episode is open, in the team's zone."""
    tag = uuid.uuid4().hex[:8]
    source = f"heartbeat-outage-{tag}"
    await _teams(pool, tag)
    clock = ManualClock(T0 + timedelta(days=401))
    opened = clock.now
    nurse = f"nurse-{tag}@h.test"
    patient = f"A2-{tag}"
    try:
        first = _service(pool, clock, smtp, tag)
        await first.handle_alert(
            _alert(patient, "FEVER", "Fever 38.9 °C", AlertPriority.HIGH, opened)
        )
        assert len(smtp.to(nurse)) == 1
        clock.advance(hours=1)
        restarted = _service(pool, clock, smtp, tag)
        await _round(restarted)
        await _round(restarted)
        pages = _mails(smtp, nurse)
        assert len(pages) == 2
        assert (
            pages[1]["Subject"] == f"[VIGIL HIGH] Repeat 1 of 2: Fever 38.9 °C — patient {patient}"
        )
        assert pages[1]["X-Vigil-Repeat"] == "1"
        assert (
            f"Open since {clock_time(opened, 'Europe/Berlin')} (first paged)"
            in pages[1].get_content()
        )
    finally:
        await _cleanup(pool, tag, source)


async def test_notify_down_through_the_outage_records_it_without_a_silence_page(
    pool: Any, smtp: SmtpSink
) -> None:
    """Notify stops with the rest of the pipeline and starts again 40 min later; the first
    alert it consumes is a current heartbeat. The silence it was down through is still an
    outage (recorded, summarised for each team), and nobody is paged about a silence that was
    over before anyone could be told (no start, no all clear)."""
    tag = uuid.uuid4().hex[:8]
    source = f"heartbeat-outage-{tag}"
    await _teams(pool, tag)
    clock = ManualClock(T0 + timedelta(days=402))
    nurse, oncall_b, fallback = (
        f"nurse-{tag}@h.test",
        f"oncall-b-{tag}@h.test",
        f"fallback-{tag}@h.test",
    )
    try:
        await _service(pool, clock, smtp, tag).handle_alert(_beat(source, clock.now))
        last = clock.now
        clock.advance(minutes=40)
        restarted = _service(pool, clock, smtp, tag)
        assert source in await restarted.resume_watch()  # before the consumer starts
        outage = await pool.fetchrow("SELECT * FROM pipeline_outages WHERE source = $1", source)
        assert outage is not None and outage["started_at"] == last and outage["ended_at"] is None

        # The consumer's first record is a current heartbeat, handled before any round.
        clock.advance(seconds=2)
        back = clock.now
        assert await restarted.handle_alert(_beat(source, back))
        await _round(restarted)
        outage = await pool.fetchrow("SELECT * FROM pipeline_outages WHERE source = $1", source)
        assert outage["ended_at"] == back
        assert [m["Subject"] for m in _mails(smtp, fallback)] == []  # no silence page/all clear

        clock.now = back + timedelta(seconds=SETTLE_S)
        assert await restarted.handle_alert(_beat(source, clock.now))  # beating all along
        await _round(restarted)
        summaries = [p for p in _mails(smtp, nurse) if p["Subject"].startswith("[VIGIL] Not")]
        assert len(summaries) == 1
        text = summaries[0].get_content()
        start, end = clock_time(last, "Europe/Berlin"), clock_time(back, "Europe/Berlin")
        assert f"Vigil was not watching from {start} to {end}" in text
        assert len(_mails(smtp, oncall_b)) == 1
        assert _mails(smtp, fallback) == []
    finally:
        await _cleanup(pool, tag, source)


async def test_silence_found_at_start_pages_once_its_wait_is_over(
    pool: Any, smtp: SmtpSink
) -> None:
    """Notify starts into a silence that goes on: the technical page waits one heartbeat
    timeout from the start (not paged a second before it, paged once at it), a restart inside
    the wait starts the wait again, and once paged the silence gets its all clear."""
    tag = uuid.uuid4().hex[:8]
    source = f"heartbeat-outage-{tag}"
    await _teams(pool, tag)
    clock = ManualClock(T0 + timedelta(days=403))
    fallback = f"fallback-{tag}@h.test"
    timeout = timedelta(seconds=60)  # the services' heartbeat_timeout_s
    try:
        await _service(pool, clock, smtp, tag).handle_alert(_beat(source, clock.now))
        last = clock.now
        clock.advance(minutes=30)
        assert source in await _service(pool, clock, smtp, tag).resume_watch()
        clock.advance(seconds=30)  # restarted again inside the wait: the wait starts again
        restarted = _service(pool, clock, smtp, tag)
        assert source in await restarted.resume_watch()
        started = clock.now
        clock.now = started + timeout - timedelta(seconds=1)
        await _round(restarted)
        assert _mails(smtp, fallback) == []
        clock.now = started + timeout
        await _round(restarted)
        await _round(restarted)
        pages = _mails(smtp, fallback)
        assert [p["Subject"] for p in pages] == [
            f"[VIGIL HIGH] Pipeline silent: no heartbeat from {source} for over 60 s"
            " — patient pipeline (no care team on record)"
        ]
        assert clock_time(last, "UTC") in pages[0].get_content()
        # Paged already: a restart now does not wait again (its escalation goes on).
        assert source not in await _service(pool, clock, smtp, tag).resume_watch()

        clock.advance(seconds=5)
        assert await restarted.handle_alert(_beat(source, clock.now))
        await _round(restarted)
        subjects = [p["Subject"] for p in _mails(smtp, fallback)]
        assert len(subjects) == 2 and subjects[1].startswith("[VIGIL ALL CLEAR] Pipeline silent")
        outage = await pool.fetchrow("SELECT * FROM pipeline_outages WHERE source = $1", source)
        assert outage["started_at"] == last and outage["ended_at"] == clock.now
    finally:
        await _cleanup(pool, tag, source)
