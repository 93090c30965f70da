"""End-to-end fixtures: the three services running against the real test stack.

Real Mosquitto, real Kafka (KRaft), real PostgreSQL, a real SMTP server (aiosmtpd). The three
services run in this process as tasks, each with its own settings built from the stack's
environment, exactly as their entry points build them.
"""

from __future__ import annotations

import asyncio
import email
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Any

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiosmtpd.controller import Controller

from schemas.kafka_topics import ALERTS_TOPIC, TELEMETRY_TOPIC
from schemas.topics import MQTT_SUBSCRIPTION
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from tests.factories import temperature_message
from tests.polling import eventually, until_ready


class MailCollector:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.arrived = asyncio.Event()

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))  # type: ignore[attr-defined]
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))  # type: ignore[attr-defined]
        loop = self._loop
        loop.call_soon_threadsafe(self.arrived.set)
        return "250 OK"

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def for_patient(self, patient_id: str) -> list[Message]:
        return [m for m in self.messages if patient_id in (m.get("Subject") or "")]


def free_port() -> int:
    # aiosmtpd's Controller probes its own port after start, so it cannot be given port 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Pipeline:
    mail: MailCollector
    rules_group: str
    run_id: str


@pytest.fixture(scope="module")
async def pipeline(stack_env: dict[str, str]) -> AsyncIterator[Pipeline]:
    """Start an SMTP server and the three services against the test stack."""
    from services.ingest.settings import IngestSettings
    from services.notify.settings import NotifySettings
    from services.rules.settings import RulesSettings

    run_id = uuid.uuid4().hex[:8]
    mail = MailCollector()
    mail.bind(asyncio.get_running_loop())
    smtp_port = free_port()
    controller = Controller(mail, hostname="127.0.0.1", port=smtp_port)
    controller.start()

    # Fresh consumer groups per run: the services see this run's events from the start. Its own
    # MQTT share group: Mosquitto also routes shared-subscription messages to offline sessions of
    # a group, so sharing one with another test's ingest could strand a message there.
    ports = ops_ports()
    ingest_settings = IngestSettings(
        mqtt_client_id=f"ingest-e2e-{run_id}",
        mqtt_share_group=f"ingest-e2e-{run_id}",
        metrics_port=ports["ingest"],
    )
    rules_settings = RulesSettings(group_id=f"rules-e2e-{run_id}", ops_port=ports["rules"])
    notify_settings = NotifySettings(
        smtp_port=smtp_port, group_id=f"notify-e2e-{run_id}", ops_port=ports["notify"]
    )
    try:
        async with three_services(
            stack_env, ingest_settings, rules_settings, notify_settings
        ) as tasks:
            await until_all_ready(tasks, ports)
            yield Pipeline(mail=mail, rules_group=f"rules-e2e-{run_id}", run_id=run_id)
    finally:
        controller.stop()


@asynccontextmanager
async def three_services(
    stack_env: dict[str, str], ingest: Any, rules: Any, notify: Any
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Ingest, rules and notify as tasks of this process with these settings; the block gets
    the tasks (to wait for their readiness). Stopped when the block ends, and each must have
    ended without an error."""
    from services.ingest.app import run as run_ingest
    from services.notify.app import run as run_notify
    from services.rules.app import run as run_rules

    # Fresh groups start at the current end of their topics, not at the beginning: on a shared
    # stack the topics hold every earlier run (and benchmark), and replaying all of it first
    # would hold this run's events back for minutes.
    bootstrap = stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    await start_group_at_end(bootstrap, rules.group_id, TELEMETRY_TOPIC)
    await start_group_at_end(bootstrap, notify.group_id, ALERTS_TOPIC)
    # Make the broker hold messages for this ingest from now on, whenever it gets to subscribing.
    await open_mqtt_session(
        stack_env, ingest.mqtt_client_id, f"$share/{ingest.mqtt_share_group}/{MQTT_SUBSCRIPTION}"
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(ingest, stop), name="ingest"),
        asyncio.create_task(run_rules(rules, stop), name="rules"),
        asyncio.create_task(run_notify(notify, stop), name="notify"),
    ]
    try:
        yield tasks
    finally:
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        await drop_mqtt_session(stack_env, ingest.mqtt_client_id)
        for name, result in zip(("ingest", "rules", "notify"), results, strict=True):
            assert not isinstance(result, BaseException), f"{name} failed: {result!r}"


def ops_ports() -> dict[str, int]:
    """A free ops port for each service, so ``until_all_ready`` asks this run's services (another
    run on the machine may hold the default ports)."""
    return {"ingest": free_port(), "rules": free_port(), "notify": free_port()}


async def until_all_ready(
    tasks: Sequence[asyncio.Task[Any]], ports: dict[str, int], within_s: float = 90
) -> None:
    """Wait for each service's ``/readyz`` to answer 200: ingest subscribed to the broker,
    rules with its partitions assigned and restored, notify with its consumer assigned. A
    service that stopped meanwhile raises its start-up failure as the test's error."""
    for name, port in ports.items():
        await until_ready(port, what=name, timeout_s=within_s, tasks=tasks)


async def open_mqtt_session(env: dict[str, str], client_id: str, topic: str) -> None:
    """Create ingest's persistent session and subscription before ingest itself starts."""
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_INGEST_MQTT_USERNAME"],
        password=env["VIGIL_INGEST_MQTT_PASSWORD"],
        identifier=client_id,
        clean_session=False,
    ) as client:
        await client.subscribe(topic, qos=1)


async def drop_mqtt_session(env: dict[str, str], client_id: str) -> None:
    """End the persistent session a test's ingest left on the broker."""
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_INGEST_MQTT_USERNAME"],
        password=env["VIGIL_INGEST_MQTT_PASSWORD"],
        identifier=client_id,
        clean_session=True,
    ):
        pass


async def register_patient(dsn: str, run_id: str, label: str) -> tuple[str, str, str]:
    patient_id = f"P-{label}-{run_id}"
    device_id = f"thermo-{label}-{run_id}"
    team = f"team-e2e-{run_id}"
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "E2E oncology", f"oncall-{run_id}@hospital.test")
        await upsert_patient(conn, patient_id, team, weight_kg=18.5)
        await upsert_device(conn, device_id, "thermometer", "test-thermometer")
        await bind_device(conn, device_id, patient_id, datetime.now(UTC) - timedelta(days=1))
    finally:
        await conn.close()
    return patient_id, device_id, f"oncall-{run_id}@hospital.test"


async def publish(env: dict[str, str], topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_SIM_MQTT_USERNAME"],
        password=env["VIGIL_SIM_MQTT_PASSWORD"],
        identifier=f"e2e-publisher-{uuid.uuid4().hex[:6]}",
    ) as client:
        await client.publish(topic, payload, qos=1)


def temperature(device_id: str, value: float, seq: int) -> bytes:
    message = temperature_message(device_id, value, seq=seq, unit="C", site="axillary")
    return json.dumps(message).encode()


async def rules_caught_up(bootstrap: str, group: str, within_s: float = 30) -> None:
    """Wait until the rules group has committed past every telemetry record written so far."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await probe.start()
    await admin.start()
    try:
        # Asked of the broker: a fresh consumer's metadata cache does not know the topic yet,
        # and an empty partition list would end the wait below at once.
        partitions = await topic_partitions(bootstrap, TELEMETRY_TOPIC)
        ends = await probe.end_offsets(partitions)
        committed: dict[TopicPartition, Any] = {}

        async def caught_up() -> bool:
            offsets = await admin.list_consumer_group_offsets(group)
            committed.clear()
            committed.update(offsets)
            return all(
                ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp])
                for tp in partitions
            )

        await eventually(
            caught_up,
            timeout_s=within_s,
            interval_s=0.2,
            what="rules to catch up",
            detail=lambda: f"{committed} < {ends}",
        )
    finally:
        await probe.stop()
        await admin.close()


async def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    assert partitions, f"{topic} has no partitions"
    return partitions


async def start_group_at_end(bootstrap: str, group: str, topic: str) -> None:
    """Commit ``group``'s offsets at the current end of ``topic``, before the group's service
    starts: it then reads only what this test produces, not everything earlier runs left there."""
    partitions = await topic_partitions(bootstrap, topic)
    committer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await committer.start()
    try:
        committer.assign(partitions)
        ends = await committer.end_offsets(partitions)
        await committer.commit(ends)
    finally:
        await committer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    """The current end of each partition of ``topic``."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await probe.start()
    try:
        partitions = await topic_partitions(bootstrap, topic)
        return dict(await probe.end_offsets(partitions))
    finally:
        await probe.stop()


@dataclass
class HomePipeline:
    """Ingest, notify and the heartbeat publisher running in this process, for a test that runs
    the rules service as its own process (``vigil rules``) with ``rules_env``."""

    mail: MailCollector
    rules_env: dict[str, str]
    rules_ops_port: int
    #: The telemetry topic's end before anything of this test was published.
    start_offsets: dict[TopicPartition, int]


@asynccontextmanager
async def home_pipeline(
    stack_env: dict[str, str],
    run_id: str,
    *,
    label: str,
    tech: str,
    beat: str,
    rules_env: dict[str, str] | None = None,
) -> AsyncIterator[HomePipeline]:
    """The pipeline around a quiet home: e-mail pages to an SMTP server of this test, notify
    paging ``tech`` (the technical care team) about the pipeline, the heartbeat publisher
    publishing as device ``beat`` (bound to ``tech``'s pipeline patient) at its default interval.
    Rules and notify read from the current end of their topics. ``rules_env``: more of the rules
    service's environment. When the block ends every task is stopped and must have ended
    without an error, and the heartbeat source is left unbound (every notify watches every
    heartbeat source)."""
    from services.ingest.app import run as run_ingest
    from services.ingest.settings import IngestSettings
    from services.notify.app import run as run_notify
    from services.notify.settings import NotifySettings
    from vigil_tools.heartbeat import HeartbeatSettings
    from vigil_tools.heartbeat import run as run_heartbeat

    mail = MailCollector()
    mail.bind(asyncio.get_running_loop())
    controller = Controller(mail, hostname="127.0.0.1", port=free_port())
    controller.start()
    bootstrap = stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    ingest_settings = IngestSettings(
        mqtt_client_id=f"ingest-{label}-{run_id}", mqtt_share_group=f"ingest-{label}-{run_id}"
    )
    notify_settings = NotifySettings(
        smtp_port=controller.port,
        group_id=f"notify-{label}-{run_id}",
        technical_care_team_id=tech,
        escalation_tick_s=0.5,
        # A device silence is paged at once: notify's hold of a device silence
        # (VIGIL_NOTIFY_SILENCE_HOLD_S, default 45 min, docs/notify.md) is turned off by a
        # technical hold of 0, so what a test waits for after a deadline is the pipeline's.
        technical_hold_s=0,
    )
    rules_group = f"rules-{label}-{run_id}"
    await start_group_at_end(bootstrap, rules_group, TELEMETRY_TOPIC)
    await start_group_at_end(bootstrap, notify_settings.group_id, ALERTS_TOPIC)
    await open_mqtt_session(
        stack_env,
        ingest_settings.mqtt_client_id,
        f"$share/{ingest_settings.mqtt_share_group}/{MQTT_SUBSCRIPTION}",
    )
    start_offsets = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    ops_port = free_port()
    full_rules_env = {
        **os.environ,
        **stack_env,
        "VIGIL_RULES_GROUP_ID": rules_group,
        "VIGIL_RULES_TRANSACTIONAL_ID": rules_group,
        "VIGIL_RULES_OPS_PORT": str(ops_port),
        "VIGIL_RULES_LOG_LEVEL": "INFO",
        **(rules_env or {}),
    }
    stop = asyncio.Event()
    beating = asyncio.Event()
    heartbeat_settings = HeartbeatSettings(
        device_id=beat,
        mqtt_username=stack_env["VIGIL_SIM_MQTT_USERNAME"],
        mqtt_password=stack_env["VIGIL_SIM_MQTT_PASSWORD"],
        mqtt_client_id=f"heartbeat-{label}-{run_id}",
    )
    tasks = [
        asyncio.create_task(run_ingest(ingest_settings, stop), name="ingest"),
        asyncio.create_task(run_notify(notify_settings, stop), name="notify"),
        asyncio.create_task(run_heartbeat(heartbeat_settings, beating), name="heartbeat"),
    ]
    try:
        yield HomePipeline(mail, full_rules_env, ops_port, start_offsets)
    finally:
        beating.set()
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        controller.stop()
        await drop_mqtt_session(stack_env, ingest_settings.mqtt_client_id)
        conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
        try:
            await conn.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", beat)
            await conn.execute(
                "UPDATE device_bindings SET valid_to = now() WHERE device_id = $1", beat
            )
        finally:
            await conn.close()
        for name, result in zip(("ingest", "notify", "heartbeat"), results, strict=True):
            assert not isinstance(result, BaseException), f"{name} failed: {result!r}"
