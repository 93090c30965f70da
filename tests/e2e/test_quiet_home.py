"""End to end on the real stack: a home that goes quiet with nothing else arriving is paged.

One patient alone (nothing publishes but the pipeline's own components: the heartbeat
publisher at its default interval), devices registered and bound, the care team's protocol
lowering the pump's silence limit to 1 min. The pump and thermometer report once and stop.
The device-silent page must reach the care team's on-call address; the delay after the
deadline is printed as a figure (``quiet_home_page_delay_s``), not asserted against a tight
bound. The same with the rules service SIGKILLed in the middle of the silence and started
again. Then a replay of the recorded telemetry topic (one engine per partition, in partition
order, with the configuration the service loaded) reproduces the paged alert's id.

Rules runs as its own process (``python -m vigil_tools.cli rules``) so it can be killed; ingest,
notify and the heartbeat publisher run in this process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.kafka_topics import TELEMETRY_TOPIC
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.rules.adapters.codec import decode_observation
from services.rules.adapters.config_store import load_rules_config
from services.rules.domain.engine import RulesEngine
from services.rules.settings import RulesSettings
from tests.e2e.conftest import (
    MailCollector,
    end_offsets,
    home_pipeline,
)
from tests.polling import eventually

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
PUMP_SILENT_MINUTES = 1.0
# The deadline is known to the second; a page later than this after it fails the test (a
# wait limit, not a performance assertion: the figure itself is printed).
WAIT_AFTER_DEADLINE_S = 120.0


@dataclass
class QuietHome:
    env: dict[str, str]
    mail: MailCollector
    run_id: str
    patient: str
    pump: str
    thermometer: str
    rules_env: dict[str, str]
    logs: Path
    start_offsets: dict[TopicPartition, int]

    def start_rules(self) -> subprocess.Popen[bytes]:
        log = (self.logs / f"rules-{time.monotonic_ns()}.log").open("wb")
        return subprocess.Popen(
            [sys.executable, "-m", "vigil_tools.cli", "rules"],
            cwd=ROOT,
            env=self.rules_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    def silent_pages(self) -> list[Message]:
        prefix = f"{self.patient}:device_silent:{self.pump}:"
        return [
            m
            for m in self.mail.messages
            if header(m, "X-Vigil-Dedup-Key").startswith(prefix)
            and header(m, "X-Vigil-Phase") == "start"
        ]


def header(message: Message, name: str) -> str:
    """A header's value unfolded (a long dedup key is folded onto its own line)."""
    return "".join(str(message.get(name) or "").split())


async def register(dsn: str, run_id: str) -> tuple[str, str, str, str, str, str]:
    """The care team (silence limit lowered by its signed-off protocol), one child with a pump
    and a thermometer, and the pipeline heartbeat device of a technical team."""
    team = f"team-quiet-{run_id}"
    tech = f"team-quiet-tech-{run_id}"
    patient = f"P-quiet-{run_id}"
    pump = f"pump-quiet-{run_id}"
    thermometer = f"thermo-quiet-{run_id}"
    beat = f"heartbeat-quiet-{run_id}"
    since = datetime.now(UTC) - timedelta(days=1)
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "Quiet-home team", f"oncall-{run_id}@hospital.test")
        await upsert_care_team(conn, tech, "Technical on-call", f"tech-{run_id}@hospital.test")
        await upsert_patient(conn, patient, team, weight_kg=24.0)
        await upsert_patient(conn, f"pipeline-{tech}", tech)
        await upsert_device(conn, pump, "pump", "test-pump")
        await upsert_device(conn, thermometer, "thermometer", "test-thermometer")
        await upsert_device(conn, beat, "thermometer", "vigil-heartbeat")
        await bind_device(conn, pump, patient, since)
        await bind_device(conn, thermometer, patient, since)
        await bind_device(conn, beat, f"pipeline-{tech}", since)
        await conn.execute(
            "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
            "signed_off_at) VALUES ($1, 1, $2::jsonb, 'charge-nurse', now())",
            team,
            json.dumps({"pump_silent_minutes": PUMP_SILENT_MINUTES}),
        )
    finally:
        await conn.close()
    return team, tech, patient, pump, thermometer, beat


@pytest.fixture
async def quiet_home(stack_env: dict[str, str], tmp_path: Path) -> AsyncIterator[QuietHome]:
    run_id = uuid.uuid4().hex[:8]
    _team, tech, patient, pump, thermometer, beat = await register(
        stack_env["VIGIL_PG_DSN"], run_id
    )
    # The delay measured is the pipeline's, from the deadline to the page: notify holds no
    # device silence here (home_pipeline).
    async with home_pipeline(stack_env, run_id, label="quiet", tech=tech, beat=beat) as pipeline:
        yield QuietHome(
            stack_env,
            pipeline.mail,
            run_id,
            patient,
            pump,
            thermometer,
            pipeline.rules_env,
            tmp_path,
            pipeline.start_offsets,
        )


async def report_once(home: QuietHome) -> None:
    """The pump and thermometer report once each, as the devices themselves (their accounts
    are the stack's gateway account), then stop."""
    now = datetime.now(UTC)
    messages = [
        (
            f"vigil/v1/dev/{home.pump}/pump-status",
            {
                "schema": "vigil.device.pump_status.v1",
                "device_id": home.pump,
                "state": "running",
                "rate_ml_h": 10.0,
                "volume_remaining_ml": 200.0,
                "bag_volume_ml": 250.0,
                "battery_pct": 90.0,
            },
        ),
        (
            f"vigil/v1/dev/{home.thermometer}/temperature",
            {
                "schema": "vigil.device.temperature.v1",
                "device_id": home.thermometer,
                "value": 36.8,
                "unit": "C",
                "site": "axillary",
            },
        ),
    ]
    async with aiomqtt.Client(
        "127.0.0.1",
        int(home.env["VIGIL_MQTT_PORT"]),
        username=home.env["VIGIL_SIM_MQTT_USERNAME"],
        password=home.env["VIGIL_SIM_MQTT_PASSWORD"],
        identifier=f"quiet-home-{home.run_id}",
    ) as client:
        for topic, body in messages:
            payload = {
                **body,
                "message_id": str(uuid.uuid4()),
                "seq": 1,
                "device_time": now.isoformat(),
            }
            await client.publish(topic, json.dumps(payload).encode(), qos=1)


async def pump_ingest_time(home: QuietHome, within_s: float = 60) -> datetime:
    """When ingest received the pump's status (stored with it): the silence counts from it."""
    conn = await asyncpg.connect(home.env["VIGIL_PG_DSN"])
    try:
        at: datetime = await eventually(
            lambda: conn.fetchval(
                "SELECT max(ingest_time) FROM pump_status WHERE device_id = $1", home.pump
            ),
            timeout_s=within_s,
            interval_s=0.2,
            what="the pump's status to be stored",
        )
        return at
    finally:
        await conn.close()


async def wait_for_page(home: QuietHome, deadline: datetime) -> tuple[Message, float]:
    """The device-silent page, and how long after the deadline it arrived (s)."""
    limit = deadline + timedelta(seconds=WAIT_AFTER_DEADLINE_S)
    pages = await eventually(
        home.silent_pages,
        timeout_s=max(0.0, (limit - datetime.now(UTC)).total_seconds()),
        interval_s=0.1,
        what=f"a device-silent page {WAIT_AFTER_DEADLINE_S:.0f} s after the deadline {deadline}",
        detail=lambda: (
            f"mail: {[m.get('Subject') for m in home.mail.messages]}; rules log: {tail(home.logs)}"
        ),
    )
    return pages[0], (datetime.now(UTC) - deadline).total_seconds()


def tail(logs: Path) -> str:
    return "\n".join(p.read_text()[-2500:] for p in sorted(logs.glob("rules-*.log")))


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def replayed_alert_ids(home: QuietHome) -> set[str]:
    """The telemetry topic from the test's start to its end, one engine per partition in
    partition order, with the configuration the rules service loaded from PostgreSQL."""
    bootstrap = home.env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    settings = RulesSettings()
    conn = await asyncpg.connect(home.env["VIGIL_PG_DSN"])
    try:
        config = await load_rules_config(
            conn, settings.thresholds(), allowed_lateness_s=settings.allowed_lateness_s
        )
    finally:
        await conn.close()
    ends = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await reader.start()
    ids: set[str] = set()
    try:
        partitions = list(home.start_offsets)
        reader.assign(partitions)
        for tp in partitions:
            reader.seek(tp, home.start_offsets[tp])
        engines = {tp.partition: RulesEngine(config) for tp in partitions}
        limit = time.monotonic() + 60
        while [tp for tp in partitions if await reader.position(tp) < ends[tp]]:
            assert time.monotonic() < limit, "the telemetry topic could not be read to its end"
            for tp, records in (await reader.getmany(timeout_ms=500)).items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    obs = decode_observation(record.value or b"")
                    ids |= {str(a.alert_id) for a in engines[tp.partition].on_observation(obs)}
    finally:
        await reader.stop()
    return ids


async def test_a_home_alone_that_goes_quiet_is_paged_and_a_replay_reproduces_the_alert(
    quiet_home: QuietHome,
) -> None:
    """Nothing else on the stack publishes: the pump's silence is paged after its deadline
    (last arrival + 1 min), and the replay of the topic decides the same alert id."""
    rules = quiet_home.start_rules()
    try:
        await report_once(quiet_home)
        deadline = await pump_ingest_time(quiet_home) + timedelta(minutes=PUMP_SILENT_MINUTES)
        page, delay = await wait_for_page(quiet_home, deadline)
    finally:
        stop_process(rules)
    print(f'\n{{"quiet_home_page_delay_s": {delay:.1f}, "rules_killed": false}}')
    assert delay >= 0, "paged before the deadline"
    assert header(page, "X-Vigil-Alert-Id") in await replayed_alert_ids(quiet_home)


async def test_the_silence_is_paged_when_rules_is_killed_in_the_middle_of_it(
    quiet_home: QuietHome,
) -> None:
    """SIGKILL the rules service half-way through the silence and start it again: the page
    still comes (the deadline was in its committed state, the heartbeats move its clock), and
    a replay of the topic decides the same alert id."""
    rules = quiet_home.start_rules()
    try:
        await report_once(quiet_home)
        deadline = await pump_ingest_time(quiet_home) + timedelta(minutes=PUMP_SILENT_MINUTES)
        halfway = deadline - timedelta(minutes=PUMP_SILENT_MINUTES / 2)
        await asyncio.sleep(max(0.0, (halfway - datetime.now(UTC)).total_seconds()))
        assert rules.poll() is None, f"rules exited early: {tail(quiet_home.logs)}"
        assert quiet_home.silent_pages() == [], "paged before the deadline"
        rules.send_signal(signal.SIGKILL)
        rules.wait(10)
        rules = quiet_home.start_rules()
        page, delay = await wait_for_page(quiet_home, deadline)
    finally:
        stop_process(rules)
    print(f'\n{{"quiet_home_page_delay_s": {delay:.1f}, "rules_killed": true}}')
    assert header(page, "X-Vigil-Alert-Id") in await replayed_alert_ids(quiet_home)
