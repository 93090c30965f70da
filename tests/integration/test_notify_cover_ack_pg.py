"""Regional cover and the acknowledgements that answer a page, through notify's HTTP app on real
PostgreSQL, an SMTP sink and a Twilio-like server, with notify's clock moved by hand: a covering
nurse who acknowledges a night page by its signed link or by an SMS reply is audited
(``alert.acknowledged``) with the agreement that allowed it, as the care-team API audits its own
requests under cover; the home team's nurse acknowledging a day page is audited with none."""

from __future__ import annotations

import email
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from services.notify.api import create_app
from services.notify.service_layer.escalation import EscalationService
from services.notify.settings import NotifySettings
from tests.factories import make_alert
from tests.support.escalation import escalation_service, smtp_sender, twilio_sms
from tests.support.notify import ManualClock, SmtpSink, TwilioLikeServer
from tests.support.notify_desk import NotifyDesk
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

PARIS = ZoneInfo("Europe/Paris")
DAY = date(2026, 3, 4)  # a Wednesday
SECRET = b"integration-test-ack-secret-cover-0123456789"


def paris(hour: int, minute: int = 0) -> datetime:
    return datetime(DAY.year, DAY.month, DAY.day, hour, minute, tzinfo=PARIS).astimezone(UTC)


@dataclass
class Rig:
    pool: Any
    clock: ManualClock
    service: EscalationService
    api: httpx.AsyncClient
    smtp: SmtpSink
    twilio: TwilioLikeServer
    tag: str
    big: str
    small: str
    patient: str
    agreement: uuid.UUID

    def phone(self, team: str) -> str:
        return phone_of(self.tag, team)

    def mailbox(self, team: str) -> str:
        return mailbox_of(team)


def phone_of(tag: str, team: str) -> str:
    digits = int(uuid.uuid5(uuid.NAMESPACE_URL, f"{tag}:{team}").hex[:12], 16)
    return f"+1555{digits % 10_000_000:07d}"


def mailbox_of(team: str) -> str:
    return f"nurse@{team}.test"


@pytest.fixture
async def rig(pg_dsn: str, smtp: SmtpSink, twilio: TwilioLikeServer) -> AsyncIterator[Rig]:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    tag = uuid.uuid4().hex[:8]
    big, small, patient = f"CT-cbig-{tag}", f"CT-csmall-{tag}", f"P-cack-{tag}"
    agreement = uuid.uuid4()
    desk = NotifyDesk(pool)
    for team in (big, small):
        # Each team's first step pages one nurse by e-mail and one by SMS.
        await desk.care_team(team, oncall_email=f"oncall@{team}.test", timezone="Europe/Paris")
        await desk.person(
            f"mail-{team}",
            care_team_id=team,
            contact_methods=[{"channel": "email", "address": mailbox_of(team)}],
        )
        await desk.person(
            f"sms-{team}",
            care_team_id=team,
            contact_methods=[{"channel": "sms", "address": phone_of(tag, team)}],
        )
        await desk.policy(
            team,
            {
                "policy_id": f"pol-{team}",
                "name": "on call",
                "steps": [
                    {
                        "targets": [
                            {"kind": "person", "ref": f"mail-{team}"},
                            {"kind": "person", "ref": f"sms-{team}"},
                        ],
                        "wait_minutes": 10,
                    }
                ],
                "repeat_count": 0,
            },
        )
    await pool.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, small
    )
    # Version 2 of the agreement, signed off by a manager of each side.
    await pool.execute(
        """
        INSERT INTO cover_agreements (agreement_id, version, covering_team_id, covered_team_id,
            timezone, days, starts, ends, proposed_by, proposed_side, proposed_at, decision,
            decided_by, decided_at)
        VALUES ($1, 2, $2, $3, 'Europe/Paris', '{0,1,2,3,4,5,6}', '20:00', '08:00',
                'big-nurse', $2, $4, 'approved', 'small-nurse', $4)
        """,
        agreement,
        big,
        small,
        paris(9) - timedelta(days=3),
    )
    clock = ManualClock(paris(12))
    service = escalation_service(
        pool, clock, email=smtp_sender(smtp.port), sms=twilio_sms(twilio), ack_secret=SECRET
    )
    app = create_app(NotifySettings(), service=service, pool=pool)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://notify.test"
        ) as api:
            yield Rig(pool, clock, service, api, smtp, twilio, tag, big, small, patient, agreement)
    finally:
        await pool.execute(
            "UPDATE escalations SET status = 'resolved', due_at = NULL "
            "WHERE care_team_id = ANY($1::text[])",
            [big, small],
        )
        await pool.close()


async def page_at(rig: Rig, at: datetime, code: str) -> str:
    """A fever of the small team's patient opened at ``at``, paged; its escalation id."""
    rig.clock.now = at
    alert = make_alert(patient_id=rig.patient, code=code, at=at)
    assert await rig.service.handle_alert(alert)
    await rig.service.tick()
    await rig.service.deliver_due()
    escalation_id = await rig.pool.fetchval(
        "SELECT escalation_id FROM escalations WHERE dedup_key = $1", alert.dedup_key
    )
    return str(escalation_id)


async def ack_by_link(rig: Rig, team: str) -> None:
    """The newest page in ``team``'s nurse's mailbox, acknowledged through its signed link."""
    page = email.message_from_bytes(rig.smtp.to(rig.mailbox(team))[-1])
    body = page.get_payload(decode=True)
    assert isinstance(body, bytes)
    link = re.search(r"http://notify\.test(/ack/\S+)", body.decode())
    assert link is not None
    answer = await rig.api.post(link.group(1))
    assert answer.status_code == 200 and "Acknowledged" in answer.text


async def ack_by_sms(rig: Rig, team: str) -> None:
    assert rig.twilio.sent_to(rig.phone(team)), "the nurse was paged by SMS"
    answer = await rig.api.post(
        "/twilio/sms", data={"From": rig.phone(team), "Body": "1", "MessageSid": "SMx"}
    )
    assert "Acknowledged. Escalation stopped." in answer.text


async def ack_entry(rig: Rig, escalation_id: str) -> tuple[str, dict[str, Any]]:
    row = await rig.pool.fetchrow(
        "SELECT actor, details FROM audit_log WHERE action = 'alert.acknowledged' "
        "AND details ->> 'escalation_id' = $1",
        escalation_id,
    )
    assert row is not None, "the acknowledgement is audited"
    details = row["details"]
    return row["actor"], json.loads(details) if isinstance(details, str) else details


@pytest.mark.parametrize("how", ["link", "sms"])
async def test_a_covering_nurses_reply_to_a_night_page_is_audited_with_the_agreement(
    rig: Rig, how: str
) -> None:
    escalation_id = await page_at(rig, paris(2) + timedelta(days=1), f"FEVER-NIGHT-{how}")
    assert rig.smtp.to(rig.mailbox(rig.small)) == []
    await (ack_by_link if how == "link" else ack_by_sms)(rig, rig.big)
    actor, details = await ack_entry(rig, escalation_id)
    assert actor == f"person:{'mail' if how == 'link' else 'sms'}-{rig.big}"
    assert details["via"] == how
    assert details["cover"] == [
        {"covered_team": rig.small, "agreement": str(rig.agreement), "version": 2}
    ]


@pytest.mark.parametrize("how", ["link", "sms"])
async def test_the_home_teams_reply_to_a_day_page_carries_no_cover(rig: Rig, how: str) -> None:
    # Negative control: the same patient, the same agreement in force, but 10:00 is outside the
    # window, so the home team is paged and its nurse acts as herself.
    escalation_id = await page_at(rig, paris(10), f"FEVER-DAY-{how}")
    assert rig.smtp.to(rig.mailbox(rig.big)) == []
    await (ack_by_link if how == "link" else ack_by_sms)(rig, rig.small)
    _, details = await ack_entry(rig, escalation_id)
    assert details["via"] == how
    assert "cover" not in details


async def test_a_reply_after_the_hand_back_carries_no_cover(rig: Rig) -> None:
    # Unacknowledged at 08:00, the night's alert is handed back and the home team paged again:
    # its nurse's reply is the home team's own.
    escalation_id = await page_at(rig, paris(7, 30) + timedelta(days=1), "FEVER-HANDED")
    rig.clock.now = paris(8) + timedelta(days=1)
    assert await rig.service.hand_back_round() >= 1
    await rig.service.tick()
    await rig.service.deliver_due()
    await ack_by_sms(rig, rig.small)
    actor, details = await ack_entry(rig, escalation_id)
    assert actor == f"person:sms-{rig.small}"
    assert "cover" not in details
