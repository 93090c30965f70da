"""What the family is told, through notify's escalation service on real PostgreSQL, a real SMTP
server and the Twilio-shaped server, with a clock moved by hand: the chain exhausted tells them
to call the unit's number; an all clear outside their preferred hours waits for them; a second
alarm while the first is still open is not told (and the timeline says why); an SMS the provider
refuses for good ends failed and visible, never sent to the care team instead."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

import asyncpg
import pytest

from schemas.events import AlertKind, AlertPhase
from services.ingest.adapters.registry_admin import upsert_care_team, upsert_patient
from services.notify.service_layer.escalation import EscalationService
from tests.factories import make_alert
from tests.support.escalation import escalation_service, smtp_sender, twilio_sms
from tests.support.notify import ManualClock, SmtpSink, TwilioLikeServer
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

# 02:00 UTC = 03:00 in Paris, inside nobody's preferred hours of 08:00-21:00.
T0 = datetime(2026, 1, 15, 2, 0, tzinfo=UTC)
UNIT = "+33140000000"


@dataclass
class Rig:
    pool: Any
    clock: ManualClock
    service: EscalationService
    smtp: SmtpSink
    twilio: TwilioLikeServer
    team: str
    patient: str
    sms: str


@pytest.fixture
async def rig(pg_dsn: str, smtp: SmtpSink, twilio: TwilioLikeServer) -> AsyncIterator[Rig]:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    tag = uuid.uuid4().hex[:8]
    team, patient = f"CT-care-{tag}", f"P-care-{tag}"
    sms = f"+3361{int(tag, 16) % 10**7:07d}"
    async with pool.acquire() as conn:
        await upsert_care_team(conn, team, "Onc", f"oncall-{tag}@h.test")
        await conn.execute(
            "UPDATE care_teams SET timezone = 'Europe/Paris' WHERE care_team_id = $1", team
        )
        await upsert_patient(conn, patient, team, 18.0)
        await conn.execute(
            """
            INSERT INTO caregiver_contacts (contact_id, patient_id, care_team_id, sms, language,
                consent_by, consent_at, preferred_from, preferred_until, created_at, updated_by,
                updated_at)
            VALUES ($1, $2, $3, $4, 'en', 'nurse', $5, $6, $7, $5, 'nurse', $5)
            """,
            uuid.uuid4(),
            patient,
            team,
            sms,
            T0,
            time(8),
            time(21),
        )
        await conn.execute(
            "INSERT INTO caregiver_team_settings VALUES ($1, $2, 'nurse', $3)", team, UNIT, T0
        )
    clock = ManualClock(T0)
    service = escalation_service(
        pool,
        clock,
        email=smtp_sender(smtp.port),
        sms=twilio_sms(twilio),
        ack_secret=b"integration-test-ack-secret-0123456789",
        max_tries_per_channel=2,
        retry_base_s=1,
        retry_cap_s=4,
    )
    try:
        yield Rig(pool, clock, service, smtp, twilio, team, patient, sms)
    finally:
        await pool.execute(
            "UPDATE escalations SET status = 'resolved', due_at = NULL WHERE care_team_id = $1",
            team,
        )
        await pool.execute(
            "UPDATE pages SET status = 'cancelled', next_attempt_at = NULL "
            "WHERE care_team_id = $1 AND status IN ('queued', 'failed', 'sending')",
            team,
        )
        await pool.close()


def pump_alarm(rig: Rig, code: str, **overrides: Any) -> Any:
    return make_alert(
        patient_id=rig.patient,
        code=code,
        at=rig.clock.now,
        rule_id="pump_alarm",
        kind=AlertKind.TECHNICAL,
        title="Pump alarm: occlusion",
        evidence=(),
        **overrides,
    )


async def events(rig: Rig, kind: str) -> list[dict[str, Any]]:
    rows = await rig.pool.fetch(
        "SELECT v.detail FROM escalation_events v JOIN escalations e USING (escalation_id) "
        "WHERE e.patient_id = $1 AND v.kind = $2 ORDER BY v.event_id",
        rig.patient,
        kind,
    )
    return [json.loads(r["detail"]) for r in rows]


async def test_exhausted_chain_tells_the_family_to_call_the_unit(rig: Rig) -> None:
    await rig.service.handle_alert(pump_alarm(rig, "pump_occlusion"))
    (told,) = rig.twilio.sent_to(rig.sms)
    assert told["body"].startswith(
        "Vigil noticed an alarm from the infusion pump at 03:00 CET. Your care team is being "
        "alerted."
    )
    # The default chain pages at 0, 5, 10 and 15 min; the fourth page exhausts it.
    for _ in range(3):
        rig.clock.advance(minutes=5)
        await rig.service.tick()
        await rig.service.deliver_due()
    bodies = [m["body"] for m in rig.twilio.sent_to(rig.sms)]
    assert len(bodies) == 2, bodies  # repeats tell the family nothing
    assert bodies[1].startswith(
        "Your care team has not yet answered the alert of 03:00 CET (an alarm from the infusion "
        f"pump). Please call the unit's 24-hour number now: {UNIT}."
    )


async def test_all_clear_waits_for_preferred_hours(rig: Rig) -> None:
    alarm = pump_alarm(rig, "pump_occlusion")
    await rig.service.handle_alert(alarm)
    rig.clock.advance(minutes=2)
    await rig.service.handle_alert(pump_alarm(rig, "pump_occlusion", phase=AlertPhase.END))
    assert len(rig.twilio.sent_to(rig.sms)) == 1  # the all clear is not sent at 03:02
    due = await rig.pool.fetchval(
        "SELECT p.next_attempt_at FROM pages p JOIN caregiver_messages m USING (page_id) "
        "WHERE p.patient_id = $1 AND m.kind = 'all_clear'",
        rig.patient,
    )
    assert due == datetime(2026, 1, 15, 7, 0, tzinfo=UTC)  # 08:00 in Paris
    rig.clock.now = due
    await rig.service.deliver_due()
    bodies = [m["body"] for m in rig.twilio.sent_to(rig.sms)]
    assert bodies[1].startswith("The alert of 03:00 CET (an alarm from the infusion pump) is over.")


async def test_second_open_alarm_is_not_told_and_the_timeline_says_why(rig: Rig) -> None:
    await rig.service.handle_alert(pump_alarm(rig, "pump_occlusion"))
    rig.clock.advance(minutes=1)
    await rig.service.handle_alert(pump_alarm(rig, "pump_infusion_stopped"))
    assert len(rig.twilio.sent_to(rig.sms)) == 1
    (not_told,) = await events(rig, "caregiver_not_told")
    assert not_told["reason"] == "told of an open alarm of this patient 1 min ago"
    assert len(await events(rig, "caregiver_told")) == 1
    # The care team was paged about both.
    assert len(rig.smtp.received) == 2


async def test_refused_sms_ends_failed_and_visible(rig: Rig) -> None:
    rig.twilio.respond = lambda form: (400, "invalid number")
    await rig.service.handle_alert(pump_alarm(rig, "pump_occlusion"))
    await rig.service.deliver_due()
    page = await rig.pool.fetchrow(
        "SELECT status, tries FROM pages WHERE patient_id = $1 AND route = 'caregiver'",
        rig.patient,
    )
    assert page["status"] == "failed" and page["tries"] == 1
    (failed,) = await events(rig, "delivery_failed")
    assert failed["recipient_ref"].startswith("caregiver:")
    # Nothing was sent to the care team in the family's place: one page, the alarm's own.
    assert len(rig.smtp.received) == 1
    assert await events(rig, "fallback") == []
