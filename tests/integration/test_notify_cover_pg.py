"""Regional cover through notify's escalation service on real PostgreSQL and a real SMTP server,
with a clock moved by hand: a small team's patient's fever at 02:00 (Paris) pages the covering
team's on-call, who acknowledges it; the same at 10:00 pages the home team; once the agreement
is revoked, or on an exception date, the home team again; at 08:00 an alert still open is
handed back to the home team."""

from __future__ import annotations

import email
import email.policy
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import Message
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from services.ingest.adapters.registry_admin import upsert_care_team, upsert_patient
from services.notify.adapters.metrics import NotifyMetrics, observed_unit_of_work
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.adapters.postgres.cover_summaries import PostgresCoverSummaries
from services.notify.adapters.smtp import SmtpSender
from services.notify.service_layer.channels import provider_channels
from services.notify.service_layer.cover_summary import CoverSummaries, CoverSummaryConfig
from services.notify.service_layer.escalation import (
    AckOutcome,
    EscalationConfig,
    EscalationService,
)
from tests.factories import make_alert
from tests.support.notify import ManualClock, SmtpSink
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

PARIS = ZoneInfo("Europe/Paris")
FALLBACK = "cover-fallback@vigil.test"
NIGHT = date(2026, 2, 10)  # a Tuesday
EXCEPTION = date(2026, 2, 11)


def paris(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=PARIS).astimezone(UTC)


@dataclass
class Rig:
    pool: Any
    clock: ManualClock
    service: EscalationService
    smtp: SmtpSink
    big: str
    small: str
    patient: str
    agreement: uuid.UUID


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
async def rig(pg_dsn: str, smtp: SmtpSink) -> AsyncIterator[Rig]:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    tag = uuid.uuid4().hex[:8]
    big, small, patient = f"CT-big-{tag}", f"CT-small-{tag}", f"P-cov-{tag}"
    agreement = uuid.uuid4()
    async with pool.acquire() as conn:
        await upsert_care_team(conn, big, "Regional centre", f"oncall@{big}.test")
        await upsert_care_team(conn, small, "Partner centre", f"oncall@{small}.test")
        await upsert_patient(conn, patient, small, 18.0)
        # Signed off by a manager of each side (as the care-team API records it).
        await conn.execute(
            """
            INSERT INTO cover_agreements (agreement_id, version, covering_team_id,
                covered_team_id, timezone, days, starts, ends, exceptions, proposed_by,
                proposed_side, proposed_at, decision, decided_by, decided_at)
            VALUES ($1, 1, $2, $3, 'Europe/Paris', '{0,1,2,3,4,5,6}', '20:00', '08:00', $4,
                    'big-nurse', $2, $5, 'approved', 'small-nurse', $5)
            """,
            agreement,
            big,
            small,
            [EXCEPTION],
            paris(NIGHT, 9) - timedelta(days=3),
        )
    clock = ManualClock(paris(NIGHT, 12))
    service = cover_service(pool, clock, smtp)
    try:
        yield Rig(pool, clock, service, smtp, big, small, patient, agreement)
    finally:
        await pool.execute(
            "UPDATE escalations SET status = 'resolved', due_at = NULL "
            "WHERE care_team_id = ANY($1::text[])",
            [big, small],
        )
        await pool.close()


def cover_service(pool: Any, clock: ManualClock, smtp: SmtpSink) -> EscalationService:
    """Notify's escalation service over ``pool``; another one is notify restarted."""
    email = SmtpSender(host="127.0.0.1", port=smtp.port, envelope_from="vigil@localhost")
    return EscalationService(
        unit_of_work=observed_unit_of_work(pool, NotifyMetrics(), now=clock),
        alerts=PostgresNotifyRepository(pool),
        email=email,
        sms=None,
        webhook=None,
        config=EscalationConfig(
            sender_address="vigil@localhost",
            public_base_url="http://notify.test",
            ack_secret=b"integration-test-ack-secret-0123456789",
        ),
        clock=clock,
        cover_summaries=CoverSummaries(
            store=PostgresCoverSummaries(pool),
            channels=provider_channels(email=email, sms=None, webhook=None),
            config=CoverSummaryConfig(sender_address="vigil@localhost", fallback_email=FALLBACK),
            clock=clock,
        ),
    )


def paged_since(rig: Rig, before: int) -> list[str]:
    """The rig's addresses that mails sent since the ``before``-th were addressed to, in order.

    The rounds are notify's own (tick, deliver_due, hand_back_round) and cover the whole shared
    database: with the rig's clock they also move rows other tests left open (an end-to-end run's
    cover agreement and its unacknowledged escalations), and their mails reach this sink. Only
    the rig's teams and the fallback address are this test's."""
    ours = {f"oncall@{rig.big}.test", f"oncall@{rig.small}.test", FALLBACK}
    return [to for tos, _ in rig.smtp.received[before:] for to in tos if to in ours]


async def fever_at(rig: Rig, at: datetime, code: str) -> tuple[list[str], Any]:
    """A fever opened at ``at``: to whom its first page went, and its escalation row."""
    rig.clock.now = at
    before = len(rig.smtp.received)
    alert = make_alert(patient_id=rig.patient, code=code, at=at)
    assert await rig.service.handle_alert(alert)
    await rig.service.tick()
    await rig.service.deliver_due()
    row = await rig.pool.fetchrow(
        "SELECT escalation_id, care_team_id FROM escalations WHERE dedup_key = $1",
        alert.dedup_key,
    )
    return paged_since(rig, before), row


async def test_the_covering_on_call_is_paged_at_night_and_the_home_team_by_day(rig: Rig) -> None:
    night_to, night = await fever_at(rig, paris(NIGHT + timedelta(days=1), 2), "FEVER-NIGHT")
    assert night_to == [f"oncall@{rig.big}.test"]
    assert night["care_team_id"] == rig.big
    ack = await rig.service.acknowledge(night["escalation_id"], by="big-nurse", via="dashboard")
    assert ack.outcome is AckOutcome.ACKNOWLEDGED

    day_to, day = await fever_at(rig, paris(NIGHT + timedelta(days=1), 10), "FEVER-DAY")
    assert day_to == [f"oncall@{rig.small}.test"]
    assert day["care_team_id"] == rig.small
    # The night's timeline names the agreement it was paged under; the day's names none.
    under = dict(await timeline_kinds(rig, night["escalation_id"]))["paged_under_cover"]
    assert under == {
        "care_team_id": rig.big,
        "covered_team_id": rig.small,
        "agreement_id": str(rig.agreement),
        "agreement_version": 1,
        "window_ends": paris(NIGHT + timedelta(days=1), 8).isoformat(),
    }
    assert "paged_under_cover" not in dict(await timeline_kinds(rig, day["escalation_id"]))

    # 19:59 is before the window, 20:00 inside it.
    before_to, _ = await fever_at(rig, paris(NIGHT, 20) - timedelta(minutes=1), "FEVER-BEFORE")
    assert before_to == [f"oncall@{rig.small}.test"]
    start_to, _ = await fever_at(rig, paris(NIGHT, 20), "FEVER-START")
    assert start_to == [f"oncall@{rig.big}.test"]


async def test_an_exception_date_or_a_revoked_agreement_leaves_the_home_team_paged(
    rig: Rig,
) -> None:
    exception_to, _ = await fever_at(
        rig, paris(EXCEPTION + timedelta(days=1), 2), "FEVER-EXCEPTION"
    )
    assert exception_to == [f"oncall@{rig.small}.test"]
    await rig.pool.execute(
        """
        INSERT INTO cover_agreements (agreement_id, version, covering_team_id, covered_team_id,
            timezone, days, starts, ends, revoked, proposed_by, proposed_side, proposed_at,
            decision, decided_by, decided_at)
        SELECT agreement_id, 2, covering_team_id, covered_team_id, timezone, days, starts,
               ends, true, 'small-nurse', covered_team_id, $2, 'approved', 'small-nurse', $2
        FROM cover_agreements WHERE agreement_id = $1 AND version = 1
        """,
        rig.agreement,
        paris(NIGHT, 9),
    )
    revoked_to, _ = await fever_at(rig, paris(NIGHT + timedelta(days=1), 2), "FEVER-REVOKED")
    assert revoked_to == [f"oncall@{rig.small}.test"]


async def timeline_kinds(rig: Rig, escalation_id: Any) -> list[tuple[str, dict[str, Any]]]:
    rows = await rig.pool.fetch(
        "SELECT kind, detail FROM escalation_events WHERE escalation_id = $1 ORDER BY event_id",
        escalation_id,
    )
    return [
        (r["kind"], json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"])
        for r in rows
    ]


async def test_an_alert_still_open_at_the_end_of_the_window_is_handed_back(rig: Rig) -> None:
    """Unacknowledged at 08:00, the night's alert goes back to the home team, whose on-call is
    paged from its policy's first step; one acknowledged overnight stays with who acknowledged
    it; both timelines say so. Before 08:00 nothing moves."""
    morning = NIGHT + timedelta(days=1)
    open_to, still_open = await fever_at(rig, paris(morning, 5) + timedelta(minutes=50), "F-OPEN")
    acked_to, acked = await fever_at(rig, paris(morning, 5) + timedelta(minutes=51), "F-ACKED")
    assert open_to == acked_to == [f"oncall@{rig.big}.test"]
    ack = await rig.service.acknowledge(acked["escalation_id"], by="big-nurse", via="dashboard")
    assert ack.outcome is AckOutcome.ACKNOWLEDGED
    # One that cannot be loaded (its frozen policy unreadable) holds none of the others back.
    _, broken = await fever_at(rig, paris(morning, 5) + timedelta(minutes=52), "F-BROKEN")
    await rig.pool.execute(
        "UPDATE escalations SET snapshot = '{}', due_at = NULL WHERE escalation_id = $1",
        broken["escalation_id"],
    )

    rig.clock.now = paris(morning, 7)
    await rig.service.hand_back_round()
    for row in (still_open, acked):
        kinds = [k for k, _ in await timeline_kinds(rig, row["escalation_id"])]
        assert "handed_back" not in kinds

    rig.clock.now = paris(morning, 8)
    before = len(rig.smtp.received)
    assert await rig.service.hand_back_round() >= 2
    assert "handed_back" not in dict(await timeline_kinds(rig, broken["escalation_id"]))
    await rig.service.tick()
    await rig.service.deliver_due()
    paged = paged_since(rig, before)
    assert paged == [f"oncall@{rig.small}.test"]
    team = await rig.pool.fetchval(
        "SELECT care_team_id FROM escalations WHERE escalation_id = $1",
        still_open["escalation_id"],
    )
    assert team == rig.small
    handed = dict(await timeline_kinds(rig, still_open["escalation_id"]))["handed_back"]
    assert handed == {"from_team": rig.big, "to_team": rig.small, "repaged": True}
    kept = dict(await timeline_kinds(rig, acked["escalation_id"]))["handed_back"]
    assert kept == {
        "from_team": rig.big,
        "to_team": rig.small,
        "repaged": False,
        "acknowledged_by": "big-nurse",
    }
    # Handed back once: the next round leaves them be.
    again = len(rig.smtp.received)
    await rig.service.hand_back_round()
    await rig.service.deliver_due()
    assert paged_since(rig, again) == []


def summaries_to(rig: Rig, address: str) -> list[Message]:
    mails = [
        email.message_from_bytes(raw, policy=email.policy.default) for raw in rig.smtp.to(address)
    ]
    return [m for m in mails if m["X-Vigil-Purpose"] == "cover_summary"]


def text_of(message: Message) -> str:
    body = message.get_payload(decode=True)
    assert isinstance(body, bytes)
    return body.decode()


async def test_the_covered_team_is_emailed_each_night_once(rig: Rig) -> None:
    """At 12:00 the night before ended at 08:00: a quiet night, e-mailed once. The next night a
    fever acknowledged by the covering nurse and one left open; at 08:00 the open one is handed
    back and the covered team e-mailed the night; another round, or notify restarted, sends
    nothing more."""
    home = f"oncall@{rig.small}.test"
    await rig.pool.execute(
        "UPDATE care_teams SET name = 'Partner ward' WHERE care_team_id = $1", rig.small
    )
    rig.clock.now = paris(NIGHT, 12)
    await rig.service.cover_summary_round()
    (quiet,) = summaries_to(rig, home)
    assert quiet["Subject"] == (
        f"[VIGIL] Overnight cover by Regional centre, {NIGHT - timedelta(days=1)} 20:00 CET "
        f"(Europe/Paris) to {NIGHT} 08:00 CET (Europe/Paris): a quiet night"
    )
    assert "A quiet night: no alert was opened" in text_of(quiet)
    await rig.service.cover_summary_round()
    assert len(summaries_to(rig, home)) == 1

    morning = NIGHT + timedelta(days=1)
    _, acked = await fever_at(rig, paris(morning, 2), "F-SUM-ACKED")
    ack = await rig.service.acknowledge(acked["escalation_id"], by="big-nurse", via="dashboard")
    assert ack.outcome is AckOutcome.ACKNOWLEDGED
    _, still_open = await fever_at(rig, paris(morning, 6), "F-SUM-OPEN")
    rig.clock.now = paris(morning, 8) - timedelta(seconds=1)
    await rig.service.hand_back_round()
    await rig.service.cover_summary_round()
    assert len(summaries_to(rig, home)) == 1  # the window has not ended

    rig.clock.now = paris(morning, 8)
    await rig.service.hand_back_round()
    # The open alert's repage is sent now, not left queued for a later test's delivery round.
    await rig.service.tick()
    await rig.service.deliver_due()
    assert await rig.service.cover_summary_round() >= 1
    night = summaries_to(rig, home)[1]
    assert night["Subject"] == (
        f"[VIGIL] Overnight cover by Regional centre, {NIGHT} 20:00 CET (Europe/Paris) to "
        f"{morning} 08:00 CET (Europe/Paris): 2 alerts, 2 still open at the end"
    )
    body = text_of(night)
    assert f"Care team: Partner ward ({rig.small})" in body
    assert f"under cover agreement {rig.agreement} version 1" in body
    assert f"Patient {rig.patient}:" in body
    assert f"paged: Regional centre ({rig.big})'s on-call" in body
    assert f"Acknowledged by big-nurse at {morning} 02:00 CET (Europe/Paris)." in body
    assert "acknowledged before the hand-back, it stays with who acknowledged it" in body
    assert (
        f"handed back to Partner ward ({rig.small}) at {morning} 08:00 CET (Europe/Paris), "
        "whose on-call was paged again." in body
    )
    assert "The same summary is on the dashboard: /roster" in body

    # Recorded as delivered, and audited.
    row = await rig.pool.fetchrow(
        "SELECT status, tries, sent_at, page_id FROM cover_summary_pages "
        "WHERE agreement_id = $1 AND window_ends = $2",
        rig.agreement,
        paris(morning, 8),
    )
    assert (row["status"], row["tries"], row["sent_at"]) == ("sent", 1, paris(morning, 8))
    audited = await rig.pool.fetchval(
        "SELECT details FROM audit_log WHERE action = 'notify.cover_summary_sent' "
        "AND details ->> 'page_id' = $1",
        str(row["page_id"]),
    )
    assert audited is not None
    details = json.loads(audited) if isinstance(audited, str) else audited
    assert details["agreement"] == str(rig.agreement) and details["alerts"] == 2

    # Once: another round, and notify restarted, send nothing more.
    await rig.service.cover_summary_round()
    rig.clock.now = paris(morning, 9)
    await cover_service(rig.pool, rig.clock, rig.smtp).cover_summary_round()
    assert len(summaries_to(rig, home)) == 2
    assert still_open is not None


async def test_a_summary_the_mail_server_refuses_is_recorded_failed_and_not_audited(
    rig: Rig,
) -> None:
    """A permanent refusal (550) is the delivery's record: failed after one try, with the
    server's answer, never retried, and not audited as sent."""
    home = f"oncall@{rig.small}.test"
    rig.smtp.refuse.add(home)
    rig.clock.now = paris(NIGHT, 12)
    await rig.service.cover_summary_round()
    row = await rig.pool.fetchrow(
        "SELECT page_id, status, tries, detail, sent_at FROM cover_summary_pages "
        "WHERE agreement_id = $1 AND window_ends = $2",
        rig.agreement,
        paris(NIGHT, 8),
    )
    assert (row["status"], row["tries"], row["sent_at"]) == ("failed", 1, None)
    assert "550" in row["detail"]
    rig.clock.now = paris(NIGHT, 13)
    await rig.service.cover_summary_round()
    assert (
        await rig.pool.fetchval(
            "SELECT tries FROM cover_summary_pages WHERE page_id = $1", row["page_id"]
        )
        == 1
    )
    assert summaries_to(rig, home) == []
    assert (
        await rig.pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'notify.cover_summary_sent' "
            "AND details ->> 'page_id' = $1",
            str(row["page_id"]),
        )
        == 0
    )


async def test_a_window_cut_short_by_a_revocation_is_emailed_once_with_the_revocation(
    rig: Rig,
) -> None:
    """The night before is e-mailed as usual (the control). The next night a fever at 02:00
    pages the covering team; at 03:00 the covered team's manager revokes the agreement: on the
    next round the alert is handed back and the covered team is e-mailed the window from 20:00
    to 03:00 with the episode and the revocation, once (another round, the window's natural end
    and notify restarted send nothing more)."""
    home = f"oncall@{rig.small}.test"
    rig.clock.now = paris(NIGHT, 12)
    await rig.service.cover_summary_round()
    assert len(summaries_to(rig, home)) == 1  # the night before: the normal path still runs

    morning = NIGHT + timedelta(days=1)
    paged_to, fever = await fever_at(rig, paris(morning, 2), "F-CUT")
    assert paged_to == [f"oncall@{rig.big}.test"]
    revoked_at = paris(morning, 3)
    await rig.pool.execute(
        """
        INSERT INTO cover_agreements (agreement_id, version, covering_team_id, covered_team_id,
            timezone, days, starts, ends, exceptions, revoked, reason, proposed_by,
            proposed_side, proposed_at, decision, decided_by, decided_at)
        SELECT agreement_id, 2, covering_team_id, covered_team_id, timezone, days, starts,
               ends, exceptions, true, 'Partner staffed tonight', 'small-nurse',
               covered_team_id, $2, 'approved', 'small-nurse', $2
        FROM cover_agreements WHERE agreement_id = $1 AND version = 1
        """,
        rig.agreement,
        revoked_at,
    )
    rig.clock.now = revoked_at - timedelta(seconds=1)
    await rig.service.cover_summary_round()
    assert len(summaries_to(rig, home)) == 1  # not revoked yet at the round's time

    rig.clock.now = revoked_at + timedelta(seconds=1)
    before = len(rig.smtp.received)
    assert await rig.service.hand_back_round() >= 1
    await rig.service.tick()
    await rig.service.deliver_due()
    assert paged_since(rig, before) == [home]  # repaged
    assert await rig.service.cover_summary_round() == 1
    cut = summaries_to(rig, home)[1]
    assert cut["Subject"] == (
        f"[VIGIL] Overnight cover by Regional centre, {NIGHT} 20:00 CET (Europe/Paris) to "
        f"{morning} 03:00 CET (Europe/Paris) (revoked): 1 alert, 1 still open at the end"
    )
    body = text_of(cut)
    assert f"under cover agreement {rig.agreement} version 1" in body
    assert (
        f"The cover was revoked at {morning} 03:00 CET (Europe/Paris) by small-nurse of "
        f"Partner centre ({rig.small}), cutting the window short" in body
    )
    assert "Reason given: Partner staffed tonight." in body
    assert f"Patient {rig.patient}:" in body
    assert f"opened {morning} 02:00 CET (Europe/Paris); paged: Regional centre" in body
    assert (
        f"handed back to Partner centre ({rig.small}) at {morning} 03:00 CET (Europe/Paris), "
        "whose on-call was paged again." in body
    )
    row = await rig.pool.fetchrow(
        "SELECT status, version, window_starts, alerts, page_id FROM cover_summary_pages "
        "WHERE agreement_id = $1 AND window_ends = $2",
        rig.agreement,
        revoked_at,
    )
    assert (row["status"], row["version"], row["window_starts"], row["alerts"]) == (
        "sent",
        1,
        paris(NIGHT, 20),
        1,
    )
    assert (
        await rig.pool.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'notify.cover_summary_sent' "
            "AND details ->> 'page_id' = $1",
            str(row["page_id"]),
        )
        == 1
    )

    # Once: another round, the window's natural end, and notify restarted send nothing more.
    await rig.service.cover_summary_round()
    rig.clock.now = paris(morning, 9)
    await rig.service.cover_summary_round()
    await cover_service(rig.pool, rig.clock, rig.smtp).cover_summary_round()
    assert len(summaries_to(rig, home)) == 2
    assert fever is not None
