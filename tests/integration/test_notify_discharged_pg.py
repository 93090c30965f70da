"""An alert of a discharged patient reaching notify before the rules reload their
configuration, through notify's escalation service on real PostgreSQL and a real SMTP server,
with a clock moved by hand: an alert decided before the discharge is paged; one of a device
time at or after it pages nobody and is recorded (the alert row, its escalation closed at once
with a ``not_paged`` timeline entry, the audit entry ``notify.alert_not_paged``, the counter
``vigil_notify_alerts_not_paged_total``); a pump's alarm after the end of infusion likewise,
while the same child's fever is still paged."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from schemas.events import AlertKind
from services.ingest.adapters.registry_admin import (
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.notify.adapters.metrics import NotifyMetrics, observed_unit_of_work
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.adapters.smtp import SmtpSender
from services.notify.service_layer.escalation import EscalationConfig, EscalationService
from tests.factories import make_alert
from tests.support.notify import ManualClock, SmtpSink
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

T0 = datetime(2026, 2, 10, 9, 0, tzinfo=UTC)
INFUSION_END = T0 - timedelta(hours=2)
DISCHARGE = T0 - timedelta(seconds=2)


@dataclass
class Rig:
    pool: Any
    clock: ManualClock
    service: EscalationService
    metrics: NotifyMetrics
    smtp: SmtpSink
    patient: str
    oncall: str


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
async def rig(pg_dsn: str, smtp: SmtpSink) -> AsyncIterator[Rig]:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    tag = uuid.uuid4().hex[:8]
    team, patient, oncall = f"CT-dis-{tag}", f"P-dis-{tag}", f"oncall-{tag}@h.test"
    async with pool.acquire() as conn:
        await upsert_care_team(conn, team, "Onc", oncall)
        await upsert_patient(conn, patient, team, 18.0)
        await upsert_device(conn, f"pump-{tag}", "pump")
    clock = ManualClock(T0)
    metrics = NotifyMetrics()
    service = EscalationService(
        unit_of_work=observed_unit_of_work(pool, metrics, now=clock),
        alerts=PostgresNotifyRepository(pool),
        email=SmtpSender(host="127.0.0.1", port=smtp.port, envelope_from="vigil@localhost"),
        sms=None,
        webhook=None,
        config=EscalationConfig(
            sender_address="vigil@localhost",
            public_base_url="http://notify.test",
            ack_secret=b"integration-test-ack-secret-0123456789",
        ),
        clock=clock,
    )
    try:
        yield Rig(pool, clock, service, metrics, smtp, patient, oncall)
    finally:
        await pool.execute(
            "UPDATE escalations SET status = 'resolved', due_at = NULL WHERE care_team_id = $1",
            team,
        )
        await pool.close()


async def end_course(rig: Rig, *, discharged: bool) -> None:
    await rig.pool.execute(
        """
        UPDATE patients SET infusion_ended_at = $2, discharged_at = $3,
            discharge_reason = CASE WHEN $3::timestamptz IS NULL THEN NULL ELSE 'home' END,
            discharged_by = CASE WHEN $3::timestamptz IS NULL THEN NULL ELSE 'nurse' END
        WHERE patient_id = $1
        """,
        rig.patient,
        INFUSION_END,
        DISCHARGE if discharged else None,
    )


def paged_to(rig: Rig) -> list[str]:
    return [to for tos, _ in rig.smtp.received for to in tos]


def not_paged(rig: Rig, why: str) -> float:
    value = rig.metrics.registry.get_sample_value(
        "vigil_notify_alerts_not_paged_total", {"why": why}
    )
    return 0.0 if value is None else value


async def test_a_fever_after_the_discharge_pages_nobody_and_is_recorded(rig: Rig) -> None:
    await end_course(rig, discharged=True)
    before = make_alert(
        patient_id=rig.patient,
        code="FEVER-A",
        at=T0,
        device_time=DISCHARGE - timedelta(seconds=1),
    )
    at_discharge = make_alert(patient_id=rig.patient, code="FEVER-B", at=T0, device_time=DISCHARGE)

    assert await rig.service.handle_alert(before)
    assert await rig.service.handle_alert(at_discharge)
    await rig.service.tick()
    await rig.service.deliver_due()

    assert paged_to(rig) == [rig.oncall]
    key = at_discharge.dedup_key
    row = await rig.pool.fetchrow(
        "SELECT escalation_id, status, paged, due_at FROM escalations WHERE dedup_key = $1", key
    )
    assert (row["status"], list(row["paged"]), row["due_at"]) == ("resolved", [], None)
    assert (
        await rig.pool.fetchval(
            "SELECT count(*) FROM pages WHERE escalation_id = $1", row["escalation_id"]
        )
        == 0
    )
    assert (
        await rig.pool.fetchval(
            "SELECT count(*) FROM alerts WHERE alert_id = $1", at_discharge.alert_id
        )
        == 1
    )
    events = await rig.pool.fetch(
        "SELECT kind, detail->>'reason' AS reason FROM escalation_events WHERE escalation_id = $1",
        row["escalation_id"],
    )
    assert [(e["kind"], e["reason"]) for e in events] == [("not_paged", "discharged")]
    audit = await rig.pool.fetch(
        "SELECT actor, details->>'dedup_key' AS key, details->>'reason' AS reason "
        "FROM audit_log WHERE action = 'notify.alert_not_paged' AND subject = $1",
        f"patient:{rig.patient}",
    )
    assert [(a["actor"], a["key"], a["reason"]) for a in audit] == [("notify", key, "discharged")]
    assert not_paged(rig, "discharged") == 1.0

    # The same alert again (a redelivery) records nothing twice.
    assert await rig.service.handle_alert(at_discharge)
    assert not_paged(rig, "discharged") == 1.0


async def test_a_pump_alarm_after_the_end_of_infusion_pages_nobody(rig: Rig) -> None:
    await end_course(rig, discharged=False)
    pump = await rig.pool.fetchval(
        "SELECT device_id FROM devices WHERE device_id = $1",
        f"pump-{rig.patient.removeprefix('P-dis-')}",
    )
    alarm = make_alert(
        patient_id=rig.patient,
        code="OCCLUSION",
        at=T0,
        device_id=pump,
        kind=AlertKind.TECHNICAL,
        rule_id="pump.alarm",
    )
    fever = make_alert(patient_id=rig.patient, at=T0)

    assert await rig.service.handle_alert(alarm)
    assert await rig.service.handle_alert(fever)
    await rig.service.deliver_due()

    assert paged_to(rig) == [rig.oncall]
    status = await rig.pool.fetchval(
        "SELECT status FROM escalations WHERE dedup_key = $1", alarm.dedup_key
    )
    assert status == "resolved"
    assert not_paged(rig, "infusion_ended") == 1.0
