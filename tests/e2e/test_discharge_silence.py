"""End to end on the real stack: a discharged patient's home going quiet pages nobody, while a
patient still monitored whose home goes quiet in the same run is paged (the positive control);
then discharging that patient resolves the open escalation with the reason `discharged`.

Two children of one care team, each with a pump; the team's protocol lowers the pump's silence
limit to 1 min. Both pumps report once and stop. Right after the reports are stored, the first
child is discharged through the care-team API's use case (``DischargeService`` over PostgreSQL
and notify, as the route runs it). The second child's pump silence must be paged; the first's
silence timer must fall due and page nothing (counted by the rules service's
``vigil_rules_not_paged{what="silent",why="discharged"}``, read from its /metrics), with no alert
for that child. Rules runs as its own process, as ``vigil rules``; ingest, notify and the
heartbeat publisher run in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import decode_header, make_header
from email.message import Message
from pathlib import Path

import aiomqtt
import asyncpg
import pytest

from services.api.adapters.audit import AuditTrail
from services.api.adapters.discharge import PostgresDischargeStore
from services.api.service_layer.discharge import DischargeService
from services.api.service_layer.enrolment import Actor
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.notify.public import PatientEscalations
from tests.e2e.conftest import (
    MailCollector,
    home_pipeline,
)
from tests.polling import eventually
from vigil.runtime import utcnow

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
PUMP_SILENT_MINUTES = 1.0
# A wait limit after the deadline, not a performance bound.
WAIT_AFTER_DEADLINE_S = 120.0


@dataclass
class Homes:
    env: dict[str, str]
    mail: MailCollector
    run_id: str
    team: str
    gone: str
    kept: str
    rules_env: dict[str, str]
    ops_port: int
    logs: Path

    def pump(self, patient: str) -> str:
        return f"pump-{patient}"

    def start_rules(self) -> subprocess.Popen[bytes]:
        log = (self.logs / "rules.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "vigil_tools.cli", "rules"],
            cwd=ROOT,
            env=self.rules_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    def silent_pages(self, patient: str) -> list[Message]:
        prefix = f"{patient}:device_silent:{self.pump(patient)}:"
        return [
            m
            for m in self.mail.messages
            if header(m, "X-Vigil-Dedup-Key").startswith(prefix)
            and header(m, "X-Vigil-Phase") == "start"
        ]

    def not_paged(self) -> float:
        """The rules service's count of silences not paged because of a discharge."""
        url = f"http://127.0.0.1:{self.ops_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                text = answer.read().decode()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if (
                line.startswith("vigil_rules_not_paged_total{")
                and 'what="silent"' in line
                and 'why="discharged"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rules_log(self) -> str:
        path = self.logs / "rules.log"
        return path.read_text()[-2500:] if path.exists() else ""


def header(message: Message, name: str) -> str:
    """A header's value decoded and unfolded (a dedup key longer than a header line is sent
    as encoded words, folded onto lines of their own)."""
    value = str(make_header(decode_header(str(message.get(name) or ""))))
    return "".join(value.split())


async def register(dsn: str, run_id: str) -> tuple[str, str, str, str, str]:
    team = f"team-dis-{run_id}"
    tech = f"team-dis-tech-{run_id}"
    gone, kept = f"P-dis-gone-{run_id}", f"P-dis-kept-{run_id}"
    beat = f"heartbeat-dis-{run_id}"
    since = datetime.now(UTC) - timedelta(days=1)
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "Discharge team", f"oncall-{run_id}@hospital.test")
        await upsert_care_team(conn, tech, "Technical on-call", f"tech-{run_id}@hospital.test")
        await upsert_patient(conn, f"pipeline-{tech}", tech)
        for patient in (gone, kept):
            await upsert_patient(conn, patient, team, weight_kg=24.0)
            await upsert_device(conn, f"pump-{patient}", "pump", "test-pump")
            await bind_device(conn, f"pump-{patient}", patient, since)
        await upsert_device(conn, beat, "thermometer", "vigil-heartbeat")
        await bind_device(conn, beat, f"pipeline-{tech}", since)
        await conn.execute(
            "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
            "signed_off_at) VALUES ($1, 1, $2::jsonb, 'charge-nurse', now())",
            team,
            json.dumps({"pump_silent_minutes": PUMP_SILENT_MINUTES}),
        )
    finally:
        await conn.close()
    return team, tech, gone, kept, beat


@pytest.fixture
async def homes(stack_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Homes]:
    run_id = uuid.uuid4().hex[:8]
    team, tech, gone, kept, beat = await register(stack_env["VIGIL_PG_DSN"], run_id)
    async with home_pipeline(
        stack_env,
        run_id,
        label="dis",
        tech=tech,
        beat=beat,
        rules_env={"VIGIL_RULES_CONFIG_RELOAD_S": "1"},
    ) as pipeline:
        yield Homes(
            stack_env,
            pipeline.mail,
            run_id,
            team,
            gone,
            kept,
            pipeline.rules_env,
            pipeline.rules_ops_port,
            tmp_path,
        )


async def report_once(homes: Homes) -> None:
    """Each pump reports once, as the device (the stack's gateway account), then stops."""
    now = datetime.now(UTC)
    async with aiomqtt.Client(
        "127.0.0.1",
        int(homes.env["VIGIL_MQTT_PORT"]),
        username=homes.env["VIGIL_SIM_MQTT_USERNAME"],
        password=homes.env["VIGIL_SIM_MQTT_PASSWORD"],
        identifier=f"discharge-{homes.run_id}",
    ) as client:
        for patient in (homes.gone, homes.kept):
            pump = homes.pump(patient)
            body = {
                "schema": "vigil.device.pump_status.v1",
                "device_id": pump,
                "message_id": str(uuid.uuid4()),
                "seq": 1,
                "device_time": now.isoformat(),
                "state": "running",
                "rate_ml_h": 10.0,
                "volume_remaining_ml": 200.0,
                "bag_volume_ml": 250.0,
                "battery_pct": 90.0,
            }
            await client.publish(
                f"vigil/v1/dev/{pump}/pump-status", json.dumps(body).encode(), qos=1
            )


async def test_a_discharged_home_going_quiet_is_not_paged_and_a_monitored_one_is(
    homes: Homes,
) -> None:
    dsn = homes.env["VIGIL_PG_DSN"]
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    service = DischargeService(
        PostgresDischargeStore(pool), AuditTrail(pool), utcnow, PatientEscalations(pool)
    )
    nurse = Actor(f"user:charge-nurse-{homes.run_id}", frozenset({homes.team}))
    rules = homes.start_rules()
    try:
        await report_once(homes)
        stored: datetime = await eventually(
            lambda: pool.fetchval(
                "SELECT max(ingest_time) FROM pump_status WHERE patient_id = ANY($1::text[]) "
                "HAVING count(DISTINCT patient_id) = 2",
                [homes.gone, homes.kept],
            ),
            timeout_s=60,
            interval_s=0.2,
            what="both pumps' status to be stored",
        )
        done = await service.discharge(nurse, homes.gone, "course completed")
        assert [b.device_id for b in done.ended] == [homes.pump(homes.gone)]
        deadline = stored + timedelta(minutes=PUMP_SILENT_MINUTES)
        wait_s = (deadline - datetime.now(UTC)).total_seconds() + WAIT_AFTER_DEADLINE_S

        # The positive control: the monitored child's quiet pump is paged.
        await eventually(
            lambda: homes.silent_pages(homes.kept),
            timeout_s=wait_s,
            interval_s=0.2,
            what="the monitored patient's device-silent page",
            detail=lambda: (
                f"mail: {[m.get('Subject') for m in homes.mail.messages]}; "
                f"rules log: {homes.rules_log()}"
            ),
        )
        # The discharged child's silence fell due too, and paged nothing.
        await eventually(
            lambda: homes.not_paged() >= 1,
            timeout_s=WAIT_AFTER_DEADLINE_S,
            interval_s=0.5,
            what="the discharged patient's silence timer to fall due",
            detail=homes.rules_log,
        )
        assert rules.poll() is None, homes.rules_log()
        assert homes.silent_pages(homes.gone) == []
        assert (
            await pool.fetchval("SELECT count(*) FROM alerts WHERE patient_id = $1", homes.gone)
            == 0
        )

        # Discharging the control closes its open escalation, with the reason on its timeline.
        kept = await service.discharge(nurse, homes.kept, "admitted to hospital")
        assert kept.escalations_closed == 1
        row = await pool.fetchrow(
            "SELECT e.status, v.detail FROM escalations e JOIN escalation_events v "
            "USING (escalation_id) WHERE e.patient_id = $1 AND v.kind = 'resolved'",
            homes.kept,
        )
        assert row["status"] == "resolved"
        assert json.loads(row["detail"])["reason"] == "discharged"
    finally:
        if rules.poll() is None:
            rules.terminate()
            try:
                rules.wait(20)
            except subprocess.TimeoutExpired:
                rules.kill()
                rules.wait(5)
        await pool.close()
