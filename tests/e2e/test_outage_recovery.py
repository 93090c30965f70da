"""End to end on the real stack: the pipeline stops for longer than the silence limits while the
devices go on publishing into the broker's queue, then starts again. No page storm: no
start/all-clear pairs for devices whose queued or resumed data arrive; a device that went
quiet before the outage and stayed quiet is paged once; the care team gets one summary of the
outage, although notify was down through it too, and nobody is paged that the pipeline was
silent.

Three pumps of one patient each (silence limit 1 min by the care team's protocol): A publishes
all along (its messages queue in the broker for ingest's persistent session), B stops when the
pipeline stops and starts again when it is back, C stops when the pipeline stops and never
comes back. The heartbeat publisher beats every 2 s throughout. Ingest, rules (its own
process) and notify are stopped for 90 s, then started again on the same client id, consumer
groups and transactional id. Rules run with a 20 s outage gap and a 30 s grace, notify with a
60 s heartbeat timeout and a 35 s settle time (settings), so the test takes about three
minutes rather than eight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path

import aiomqtt
import asyncpg
import pytest
from aiosmtpd.controller import Controller

from schemas.kafka_topics import ALERTS_TOPIC, TELEMETRY_TOPIC
from schemas.topics import MQTT_SUBSCRIPTION
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from tests.e2e.conftest import (
    MailCollector,
    drop_mqtt_session,
    free_port,
    open_mqtt_session,
    start_group_at_end,
)
from tests.polling import eventually
from vigil_tools.heartbeat import HeartbeatSettings
from vigil_tools.heartbeat import run as run_heartbeat

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
OUTAGE_S = 90.0
GRACE_S = 30.0
HEARTBEAT_TIMEOUT_S = 60.0
PUMPS = ("A", "B", "C")
SUMMARY_WINDOW = re.compile(
    r"Vigil was not watching from (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC to "
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC"
)


@dataclass
class Site:
    env: dict[str, str]
    run_id: str
    mail: MailCollector
    logs: Path
    pumps: dict[str, tuple[str, str]]  # label -> (patient, pump device)
    publishing: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PUMPS, True))

    def header(self, message: Message, name: str) -> str:
        return "".join(str(message.get(name) or "").split())

    def summaries(self, halted: datetime, restarted: datetime) -> list[Message]:
        """The team's summaries of the outage between ``halted`` and ``restarted``. Every
        outage of any heartbeat source in the database is summarised to every team, and other
        tests' notify instances on the shared stack record outages of their own sources."""
        team = f"oncall-{self.run_id}@hospital.test"
        found = []
        for m in self.mail.messages:
            if self.header(m, "X-Vigil-Purpose") != "outage_summary":
                continue
            if self.header(m, "To") != team:
                continue
            window = SUMMARY_WINDOW.search(str(m.get_payload(decode=True), "utf-8"))
            assert window is not None, m.get_payload(decode=True)
            began, ended = (
                datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
                for t in window.groups()
            )
            if began <= restarted and ended >= halted:
                found.append(m)
        return found

    def subjects(self) -> list[str]:
        return [str(m.get("Subject")) for m in self.mail.messages if self.run_id in str(m)]

    def pipeline_pages(self) -> list[str]:
        """Pages about this test's heartbeat source falling silent (start or all clear)."""
        prefix = f"pipeline:silent:{self.env['BEAT']}:"
        return [
            self.header(m, "X-Vigil-Phase")
            for m in self.mail.messages
            if self.header(m, "X-Vigil-Dedup-Key").startswith(prefix)
        ]

    def silence_pages(self, label: str) -> list[tuple[str, str]]:
        patient, pump = self.pumps[label]
        prefix = f"{patient}:device_silent:{pump}:"
        return [
            (self.header(m, "X-Vigil-Phase"), self.header(m, "X-Vigil-Dedup-Key"))
            for m in self.mail.messages
            if self.header(m, "X-Vigil-Dedup-Key").startswith(prefix)
        ]


async def register(dsn: str, run_id: str) -> tuple[str, str, dict[str, tuple[str, str]]]:
    team = f"team-outage-{run_id}"
    tech = f"team-outage-tech-{run_id}"
    since = datetime.now(UTC) - timedelta(days=1)
    pumps = {label: (f"P-out-{label}-{run_id}", f"pump-out-{label}-{run_id}") for label in PUMPS}
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "Outage team", f"oncall-{run_id}@hospital.test")
        await upsert_care_team(conn, tech, "Technical", f"tech-{run_id}@hospital.test")
        await upsert_patient(conn, f"pipeline-{tech}", tech)
        beat = f"heartbeat-out-{run_id}"
        await upsert_device(conn, beat, "thermometer", "vigil-heartbeat")
        await bind_device(conn, beat, f"pipeline-{tech}", since)
        for patient, pump in pumps.values():
            await upsert_patient(conn, patient, team, weight_kg=25.0)
            await upsert_device(conn, pump, "pump", "test-pump")
            await bind_device(conn, pump, patient, since)
        await conn.execute(
            "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
            "signed_off_at) VALUES ($1, 1, $2::jsonb, 'charge-nurse', now())",
            team,
            json.dumps({"pump_silent_minutes": 1.0}),
        )
    finally:
        await conn.close()
    return tech, beat, pumps


async def publish_statuses(site: Site, stop: asyncio.Event) -> None:
    """Each pump reports every 5 s while it is publishing, as the device itself would (QoS 1,
    one counter per device); the broker holds what ingest is not there to take."""
    seqs = dict.fromkeys(PUMPS, 0)
    async with aiomqtt.Client(
        "127.0.0.1",
        int(site.env["VIGIL_MQTT_PORT"]),
        username=site.env["VIGIL_SIM_MQTT_USERNAME"],
        password=site.env["VIGIL_SIM_MQTT_PASSWORD"],
        identifier=f"outage-pumps-{site.run_id}",
    ) as client:
        while not stop.is_set():
            for label, (_patient, pump) in site.pumps.items():
                if not site.publishing[label]:
                    continue
                seqs[label] += 1
                body = {
                    "schema": "vigil.device.pump_status.v1",
                    "message_id": str(uuid.uuid4()),
                    "device_id": pump,
                    "seq": seqs[label],
                    "device_time": datetime.now(UTC).isoformat(),
                    "state": "running",
                    "rate_ml_h": 10.0,
                    "volume_remaining_ml": 200.0,
                }
                await client.publish(
                    f"vigil/v1/dev/{pump}/pump-status", json.dumps(body).encode(), qos=1
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 5.0)


@pytest.fixture
async def site(stack_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Site]:
    run_id = uuid.uuid4().hex[:8]
    tech, beat, pumps = await register(stack_env["VIGIL_PG_DSN"], run_id)
    mail = MailCollector()
    mail.bind(asyncio.get_running_loop())
    controller = Controller(mail, hostname="127.0.0.1", port=free_port())
    controller.start()
    made = Site(stack_env, run_id, mail, tmp_path, pumps)
    made.env = {**stack_env, "TECH": tech, "BEAT": beat, "SMTP": str(controller.port)}
    try:
        yield made
    finally:
        controller.stop()
        conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
        try:
            await conn.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", beat)
            await conn.execute(
                "UPDATE device_bindings SET valid_to = now() WHERE device_id = $1", beat
            )
        finally:
            await conn.close()


def rules_process(site: Site) -> subprocess.Popen[bytes]:
    group = f"rules-outage-{site.run_id}"
    env = {
        **os.environ,
        **site.env,
        "VIGIL_RULES_GROUP_ID": group,
        "VIGIL_RULES_TRANSACTIONAL_ID": group,
        "VIGIL_RULES_OPS_PORT": str(free_port()),
        "VIGIL_RULES_OUTAGE_GAP_S": "20",
        "VIGIL_RULES_RESUME_GRACE_S": str(GRACE_S),
    }
    log = (site.logs / f"rules-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "vigil_tools.cli", "rules"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def stop_rules(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def run_pipeline(site: Site) -> Callable[[], Awaitable[None]]:
    """Ingest and notify in this process, rules as its own; returns how to stop all three."""
    from services.ingest.app import run as run_ingest
    from services.ingest.settings import IngestSettings
    from services.notify.app import run as run_notify
    from services.notify.settings import NotifySettings

    ingest = IngestSettings(mqtt_client_id=f"ingest-outage-{site.run_id}")
    notify = NotifySettings(
        smtp_port=int(site.env["SMTP"]),
        group_id=f"notify-outage-{site.run_id}",
        technical_care_team_id=site.env["TECH"],
        escalation_tick_s=0.5,
        # What is tested here is which alerts the rules decide after an outage; notify's hold
        # of technical alerts (default 5 min) would only delay C's page.
        technical_hold_s=0,
        # Notify is down through the outage too: it finds the heartbeat silent when it starts
        # again. A 60 s timeout (default 120 s) makes the 90 s outage one in notify's eyes (and
        # is long enough that a stall of a busy machine is not one), and the summary is
        # composed once the rules' grace is over.
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        outage_settle_s=GRACE_S + 5,
        # Long enough for the rules to restore their state on a busy machine (about 50 s seen
        # with other stacks running); a page before the heartbeat is back would be true, and
        # followed by its all clear.
        heartbeat_start_grace_s=150,
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(ingest, stop), name="ingest"),
        asyncio.create_task(run_notify(notify, stop), name="notify"),
    ]
    rules = rules_process(site)

    async def halt() -> None:
        stop.set()
        stop_rules(rules)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for name, result in zip(("ingest", "notify"), results, strict=True):
            assert not isinstance(result, BaseException), f"{name} failed: {result!r}"

    return halt


async def test_an_outage_longer_than_the_silence_limit_pages_only_the_device_still_silent(
    site: Site,
) -> None:
    """A kept publishing (queued), B resumed after the restart, C never came back: no page at
    all for A or B, exactly one silence page for C, and no start/all-clear pair anywhere."""
    bootstrap = site.env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    client_id = f"ingest-outage-{site.run_id}"
    await start_group_at_end(bootstrap, f"rules-outage-{site.run_id}", TELEMETRY_TOPIC)
    await start_group_at_end(bootstrap, f"notify-outage-{site.run_id}", ALERTS_TOPIC)
    await open_mqtt_session(site.env, client_id, MQTT_SUBSCRIPTION)
    stop_devices = asyncio.Event()
    beating = asyncio.Event()
    heartbeat = asyncio.create_task(
        run_heartbeat(
            HeartbeatSettings(
                device_id=site.env["BEAT"],
                interval_s=2.0,
                mqtt_username=site.env["VIGIL_SIM_MQTT_USERNAME"],
                mqtt_password=site.env["VIGIL_SIM_MQTT_PASSWORD"],
                mqtt_client_id=f"heartbeat-outage-{site.run_id}",
            ),
            beating,
        )
    )
    devices = asyncio.create_task(publish_statuses(site, stop_devices))
    halt: Callable[[], Awaitable[None]] | None = None
    try:
        halt = await run_pipeline(site)
        # The pipeline watching, each pump heard several times: every pump's third status is
        # stored, then heartbeats made it through ingest, rules and notify three more times
        # (the rules know their rhythm). A fixed sleep was too short on a busy machine.
        await statuses_stored(site, each=3)
        await through_pipeline(site, beats=3)
        assert site.silence_pages("C") == [], "paged before the outage"
        site.publishing["B"] = site.publishing["C"] = False
        halted = datetime.now(UTC)
        await halt()
        halt = None
        await asyncio.sleep(OUTAGE_S)  # nobody watching; A and the heartbeat go on publishing
        restarted = datetime.now(UTC)
        halt = await run_pipeline(site)
        site.publishing["B"] = True
        # A bound, not a target: restores are slow on a busy machine.
        limit = time.monotonic() + GRACE_S + 210
        await eventually(
            lambda: site.silence_pages("C"),
            timeout_s=limit - time.monotonic(),
            interval_s=0.5,
            what="C to be paged",
            detail=lambda: f"mail: {site.subjects()}; rules: {tail(site.logs)}",
        )
        # Notify was down too: it still records the outage and tells the team once.
        await eventually(
            lambda: site.summaries(halted, restarted),
            timeout_s=max(0.0, limit - time.monotonic()),
            interval_s=0.5,
            what="the outage summary",
            detail=lambda: f"mail: {site.subjects()}",
        )
        # Positive controls above (C paged, the summary sent): the pipeline was listening.
        # Give A and B as long again to show that nothing comes for them.
        await asyncio.sleep(GRACE_S)
    finally:
        if halt is not None:
            await halt()  # also when an assertion failed: no rules process outlives the test
        stop_devices.set()
        beating.set()
        await asyncio.gather(devices, heartbeat, return_exceptions=True)
        await drop_mqtt_session(site.env, client_id)
    assert site.silence_pages("A") == []
    assert site.silence_pages("B") == []
    assert [phase for phase, _ in site.silence_pages("C")] == ["start"]
    summaries = site.summaries(halted, restarted)
    assert len(summaries) == 1, [str(m.get("Subject")) for m in summaries]
    assert "Vigil was not watching from" in str(summaries[0].get_payload(decode=True), "utf-8")
    # The silence was over before notify could tell anyone: no "Pipeline silent", no all clear.
    assert site.pipeline_pages() == [], site.subjects()


async def statuses_stored(site: Site, *, each: int, bound_s: float = 180.0) -> None:
    """Wait (bounded) until ingest has stored ``each`` statuses of every pump."""
    pumps = [pump for _patient, pump in site.pumps.values()]
    conn = await asyncpg.connect(site.env["VIGIL_PG_DSN"])
    try:

        async def stored() -> bool:
            counts = await conn.fetchval(
                "SELECT count(DISTINCT device_id) FROM (SELECT device_id FROM pump_status "
                "WHERE device_id = ANY($1::text[]) GROUP BY device_id HAVING count(*) >= $2) s",
                pumps,
                each,
            )
            return bool(counts == len(pumps))

        await eventually(
            stored,
            timeout_s=bound_s,
            interval_s=0.5,
            what=f"{each} statuses of every pump stored",
            detail=lambda: tail(site.logs),
        )
    finally:
        await conn.close()


async def through_pipeline(site: Site, *, beats: int, bound_s: float = 180.0) -> None:
    """Wait (bounded) until notify has recorded ``beats`` successive heartbeats of the test's
    source: each went through ingest, the rules and notify, so all three are running."""
    seen: set[datetime] = set()
    conn = await asyncpg.connect(site.env["VIGIL_PG_DSN"])
    try:

        async def got_through() -> bool:
            last = await conn.fetchval(
                "SELECT last_seen_at FROM pipeline_heartbeats WHERE source = $1", site.env["BEAT"]
            )
            if last is not None:
                seen.add(last)
            return len(seen) >= beats

        await eventually(
            got_through,
            timeout_s=bound_s,
            interval_s=0.5,
            what=f"{beats} heartbeats through the pipeline",
            detail=lambda: tail(site.logs),
        )
    finally:
        await conn.close()


def tail(logs: Path) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("rules-*.log")))
