"""End to end on the real stack: the pipeline heartbeat, and the page when it stops.

The heartbeat publisher speaks MQTT to the real Mosquitto as the stack's gateway account; ingest,
rules and notify run in this process against the real Kafka and PostgreSQL, with fresh consumer
groups and a short heartbeat timeout for notify; pages go to a real SMTP server (aiosmtpd).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message

import asyncpg
import pytest
from aiosmtpd.controller import Controller

from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from tests.e2e.conftest import (
    MailCollector,
    free_port,
    ops_ports,
    three_services,
    until_all_ready,
)
from tests.polling import eventually
from vigil_tools.heartbeat import HeartbeatSettings
from vigil_tools.heartbeat import run as run_heartbeat

pytestmark = pytest.mark.stack

# Short, so the test waits seconds rather than notify's two minutes; long enough that a busy
# machine does not make a flowing pipeline look silent (a heartbeat goes out every second).
HEARTBEAT_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0


@dataclass
class SelfWatch:
    env: dict[str, str]
    mail: MailCollector
    source: str
    oncall: str
    run_id: str

    def pages_about_source(self) -> list[Message]:
        """Mail about this run's heartbeat source (notify watches every source in the table)."""
        return [
            m
            for m in self.mail.messages
            if (m.get("X-Vigil-Dedup-Key") or "").startswith(f"pipeline:silent:{self.source}:")
        ]

    def publisher(self, stop: asyncio.Event) -> asyncio.Task[int]:
        settings = HeartbeatSettings(
            device_id=self.source,
            interval_s=HEARTBEAT_INTERVAL_S,
            mqtt_username=self.env["VIGIL_SIM_MQTT_USERNAME"],
            mqtt_password=self.env["VIGIL_SIM_MQTT_PASSWORD"],
            mqtt_client_id=f"heartbeat-e2e-{self.run_id}",
        )
        return asyncio.create_task(run_heartbeat(settings, stop), name="heartbeat")


async def register_heartbeat_device(dsn: str, run_id: str) -> tuple[str, str, str]:
    """A technical team of this run, its pseudo-patient and the heartbeat device bound to it."""
    team = f"team-tech-{run_id}"
    oncall = f"tech-oncall-{run_id}@hospital.test"
    patient = f"pipeline-{team}"
    device = f"heartbeat-{run_id}"
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "E2E technical on-call", oncall)
        await upsert_patient(conn, patient, team)
        await upsert_device(conn, device, "thermometer", "vigil-heartbeat")
        await bind_device(conn, device, patient, datetime.now(UTC) - timedelta(days=1))
    finally:
        await conn.close()
    return team, device, oncall


@pytest.fixture
async def self_watch(stack_env: dict[str, str]) -> AsyncIterator[SelfWatch]:
    """Ingest, rules and notify (technical team of this run, short heartbeat timeout)."""
    from services.ingest.settings import IngestSettings
    from services.notify.settings import NotifySettings
    from services.rules.settings import RulesSettings

    run_id = uuid.uuid4().hex[:8]
    dsn = stack_env["VIGIL_PG_DSN"]
    team, device, oncall = await register_heartbeat_device(dsn, run_id)
    mail = MailCollector()
    mail.bind(asyncio.get_running_loop())
    controller = Controller(mail, hostname="127.0.0.1", port=free_port())
    controller.start()

    ports = ops_ports()
    ingest_settings = IngestSettings(
        mqtt_client_id=f"ingest-hb-{run_id}",
        mqtt_share_group=f"ingest-hb-{run_id}",
        metrics_port=ports["ingest"],
    )
    rules_settings = RulesSettings(group_id=f"rules-hb-{run_id}", ops_port=ports["rules"])
    # No heartbeat_sources: the source is watched from its first heartbeat, so a slow start of
    # this process's services cannot be mistaken for the silence the test is about.
    notify_settings = NotifySettings(
        smtp_port=controller.port,
        group_id=f"notify-hb-{run_id}",
        technical_care_team_id=team,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        escalation_tick_s=0.5,
        ops_port=ports["notify"],
    )
    # Fresh groups would read their topics from the start: heartbeats queued behind what
    # earlier runs left there would arrive late, and the wait would look like the silence this
    # test is about. three_services starts them at the end instead.
    try:
        async with three_services(
            stack_env, ingest_settings, rules_settings, notify_settings
        ) as tasks:
            await until_all_ready(tasks, ports)
            yield SelfWatch(stack_env, mail, device, oncall, run_id)
    finally:
        controller.stop()
        # Every notify instance watches every row of this table: a row left behind would page
        # whichever notify runs next once it goes quiet.
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", device)
        finally:
            await conn.close()


async def last_seen(dsn: str, source: str) -> datetime | None:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT last_seen_at FROM pipeline_heartbeats WHERE source = $1", source
        )
    finally:
        await conn.close()
    return value  # type: ignore[no-any-return]


async def wait_for_last_seen_after(
    dsn: str, source: str, after: datetime | None, within_s: float
) -> datetime:
    async def seen_after() -> datetime | None:
        seen = await last_seen(dsn, source)
        return seen if seen is not None and (after is None or seen > after) else None

    return await eventually(
        seen_after,
        timeout_s=within_s,
        interval_s=0.3,
        what=f"heartbeat of {source} recorded after {after}",
    )


async def test_heartbeat_flows_and_its_silence_pages_the_technical_oncall(
    self_watch: SelfWatch,
) -> None:
    """Heartbeats cross MQTT, ingest, Kafka, rules and notify: pipeline_heartbeats.last_seen_at
    advances for the source, and nobody is paged. When they stop, the technical team's on-call
    address gets a page naming the source; when they resume, it gets the all-clear. No reading
    is stored for a heartbeat."""
    dsn = self_watch.env["VIGIL_PG_DSN"]
    source = self_watch.source

    beating = asyncio.Event()
    publisher = self_watch.publisher(beating)
    first = await wait_for_last_seen_after(dsn, source, None, within_s=60)
    second = await wait_for_last_seen_after(dsn, source, first, within_s=30)
    assert second > first
    assert self_watch.pages_about_source() == []

    beating.set()
    assert await publisher >= 2
    await eventually(
        lambda: self_watch.pages_about_source(),
        timeout_s=HEARTBEAT_TIMEOUT_S + 50,
        interval_s=0.1,
        what="the silence page",
    )
    (page,) = self_watch.pages_about_source()
    assert page["To"] == self_watch.oncall
    assert "Pipeline silent" in page["Subject"]
    assert source in page.as_string()
    # The silence is dated from the last heartbeat that made it through before the stop.
    last = await last_seen(dsn, source)
    assert last is not None
    assert page["X-Vigil-Dedup-Key"] == f"pipeline:silent:{source}:{int(last.timestamp())}"

    resumed = asyncio.Event()
    publisher = self_watch.publisher(resumed)
    try:
        await eventually(
            lambda: len(self_watch.pages_about_source()) >= 2,
            timeout_s=60,
            interval_s=0.1,
            what="the all-clear after recovery",
        )
    finally:
        resumed.set()
        await publisher
    all_clear = self_watch.pages_about_source()[1]
    assert all_clear["To"] == self_watch.oncall
    assert all_clear["Subject"].startswith("[VIGIL ALL CLEAR]")
    assert all_clear["X-Vigil-All-Clear"] == "yes" and all_clear["X-Vigil-Phase"] == "end"

    conn = await asyncpg.connect(dsn)
    try:
        stored = await conn.fetchval(
            "SELECT (SELECT count(*) FROM temperature_readings WHERE device_id = $1)"
            " + (SELECT count(*) FROM pump_status WHERE device_id = $1)"
            " + (SELECT count(*) FROM pump_events WHERE device_id = $1)",
            source,
        )
        channel = await conn.fetchval(
            "SELECT last_channel FROM device_last_seen WHERE device_id = $1", source
        )
    finally:
        await conn.close()
    assert stored == 0
    assert channel == "heartbeat"
