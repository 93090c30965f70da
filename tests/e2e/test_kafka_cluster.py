"""A three-node Kafka cluster loses a node under load: nothing acknowledged is lost, and a fever
after the loss is alerted and paged exactly once.

The test starts a KRaft cluster of its own (``VIGIL_STACK_KAFKA_BROKERS=3`` through
``vigil_tools.stack``: three JVMs with small heaps on free loopback ports, topics at replication
factor 3 and ``min.insync.replicas`` 2) beside the stack's Mosquitto, PostgreSQL and a real SMTP
server; ingest, rules and notify run against it (every node in their bootstrap list), restarted
like a supervisor would if one exits. A device connection publishes paced QoS 1 readings for
eight patients; once a third of them are acknowledged by the broker, the node leading the
fever patient's telemetry partition is SIGKILLed and stays down. After the load, a fever for
that patient must give one alert and one page; a fever for a marker patient, paged after it, is
the positive control that a duplicate would have had time to arrive. Every reading the MQTT
broker acknowledged must be in PostgreSQL and in the telemetry topic. Figures: one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from aiosmtpd.controller import Controller

from schemas.kafka_topics import ALERTS_TOPIC, TELEMETRY_TOPIC
from schemas.topics import MQTT_SUBSCRIPTION
from tests.broker_faults import PacedPublisher
from tests.e2e.conftest import (
    MailCollector,
    drop_mqtt_session,
    free_port,
    open_mqtt_session,
    publish,
    register_patient,
    temperature,
)
from tests.polling import eventually
from vigil_tools.stack import StackSettings, down, kafka
from vigil_tools.stack.process import running_pid
from vigil_tools.stack.topics import topic_specs

pytestmark = pytest.mark.stack

DEVICES = 8
RATE = 40.0  # readings a second, over all devices
LOAD_S = 45.0
PARTITIONS = 6


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@pytest.fixture(scope="module")
def cluster(stack_env: dict[str, str]) -> Iterator[StackSettings]:
    """Three Kafka nodes of the test's own, in a temporary directory; stopped and deleted after."""
    data_dir = Path(tempfile.mkdtemp(prefix="vigil-kcluster-"))
    ports = _free_ports(6)
    settings = StackSettings(
        data_dir=data_dir,
        kafka_port=ports[0],
        kafka_controller_port=ports[1],
        kafka_brokers=3,
        kafka_cluster_ports=tuple(ports[2:]),
        kafka_partitions=PARTITIONS,
    )
    settings.pids_dir.mkdir(parents=True)
    try:
        kafka.start(settings)
        yield settings
    finally:
        down(settings)
        shutil.rmtree(data_dir, ignore_errors=True)


async def _fully_replicated(bootstrap: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [spec.name for spec in topic_specs(PARTITIONS, replication_factor=3)]
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return all(
        topic["error_code"] == 0
        and topic["partitions"]
        and all(len(p["isr"]) == 3 for p in topic["partitions"])
        for topic in described
    )


async def _leaders(bootstrap: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {p["partition"]: p["leader"] for p in described["partitions"]}


async def _topic_records(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every committed record of ``topic`` from the beginning to its current end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[dict[str, Any]] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batches = await consumer.getmany(timeout_ms=1000)
            for batch in batches.values():
                records.extend(json.loads(r.value or b"{}") for r in batch)
        return records
    finally:
        await consumer.stop()


@dataclass
class Services:
    exits: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def _supervised(
    name: str, run: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event, svc: Services
) -> None:
    """Run a service until ``stop``; when it exits by itself, count it and start it again."""
    while not stop.is_set():
        try:
            await run(stop)
        except Exception as exc:
            svc.errors.append(f"{name}: {exc!r}"[:300])
        if not stop.is_set():
            svc.exits[name] = svc.exits.get(name, 0) + 1
            # A supervisor's restart back-off, not a wait for a condition.
            await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def _pipeline(env: dict[str, str], run_id: str, smtp_port: int) -> AsyncIterator[Services]:
    from services.ingest.app import run as run_ingest
    from services.ingest.settings import IngestSettings
    from services.notify.app import run as run_notify
    from services.notify.settings import NotifySettings
    from services.rules.app import run as run_rules
    from services.rules.settings import RulesSettings

    ingest = IngestSettings(
        mqtt_client_id=f"ingest-kc-{run_id}",
        mqtt_share_group=f"ingest-kc-{run_id}",
        metrics_port=0,
    )
    rules = RulesSettings(group_id=f"rules-kc-{run_id}", ops_port=0)
    notify = NotifySettings(smtp_port=smtp_port, group_id=f"notify-kc-{run_id}", ops_port=0)
    await open_mqtt_session(
        env, ingest.mqtt_client_id, f"$share/{ingest.mqtt_share_group}/{MQTT_SUBSCRIPTION}"
    )
    stop = asyncio.Event()
    svc = Services()
    runs: dict[str, Callable[[asyncio.Event], Awaitable[None]]] = {
        "ingest": lambda s: run_ingest(ingest, s),
        "rules": lambda s: run_rules(rules, s),
        "notify": lambda s: run_notify(notify, s),
    }
    svc.tasks = [
        asyncio.create_task(_supervised(name, run, stop, svc), name=name)
        for name, run in runs.items()
    ]
    try:
        yield svc
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*svc.tasks, return_exceptions=True), 60)
        await drop_mqtt_session(env, ingest.mqtt_client_id)


async def _stored(dsn: str, message_ids: set[str], devices: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT message_id::text AS id FROM temperature_readings "
            "WHERE device_id = ANY($1::text[])",
            devices,
        )
    finally:
        await conn.close()
    return len({r["id"] for r in rows} & message_ids)


async def test_losing_one_of_three_brokers_loses_nothing_and_pages_once(
    cluster: StackSettings, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bootstrap = kafka.bootstrap_servers(cluster)
    monkeypatch.setenv("VIGIL_KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    env = {**stack_env, "VIGIL_KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    dsn = stack_env["VIGIL_PG_DSN"]
    await eventually(
        lambda: _fully_replicated(bootstrap),
        timeout_s=60,
        interval_s=0.2,
        what="every partition on three nodes",
    )

    run_id = uuid.uuid4().hex[:8]
    load = [await register_patient(dsn, run_id, f"load{i}") for i in range(DEVICES)]
    fever_patient, fever_device, _ = await register_patient(dsn, run_id, "fever")
    marker_patient, marker_device, _ = await register_patient(dsn, run_id, "marker")
    devices = [device for _, device, _ in load]

    # The node leading the fever patient's telemetry partition (ingest keys by patient).
    partition = (murmur2(fever_patient.encode()) & 0x7FFFFFFF) % PARTITIONS
    victim = (await _leaders(bootstrap, TELEMETRY_TOPIC))[partition]

    mail = MailCollector()
    mail.bind(asyncio.get_running_loop())
    smtp = Controller(mail, hostname="127.0.0.1", port=free_port())
    smtp.start()
    seqs = dict.fromkeys(devices, 0)

    def reading(device: str, _seq: int) -> bytes:
        seqs[device] += 1  # each device counts its own seq from 1, as a device does
        return temperature(device, 36.9, seqs[device])

    publisher = PacedPublisher(
        int(env["VIGIL_MQTT_PORT"]),
        env["VIGIL_SIM_MQTT_USERNAME"],
        env["VIGIL_SIM_MQTT_PASSWORD"],
        f"kc-hub-{run_id}",
        devices,
        RATE,
        payload=reading,
    )
    figures: dict[str, Any] = {"victim_node": victim, "partition": partition}
    try:
        async with _pipeline(env, run_id, smtp.port) as services:
            publisher.connect()
            started = time.monotonic()
            publisher.start(LOAD_S)
            third = int(RATE * LOAD_S / 3)
            await eventually(
                lambda: len(publisher.counts.acked) >= third,
                timeout_s=LOAD_S,
                interval_s=0.02,
                what="a third acked",
            )
            pid = running_pid(kafka.component(cluster, victim))
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            figures["killed_at_s"] = round(time.monotonic() - started, 1)

            await asyncio.to_thread(publisher.join)
            await eventually(
                publisher.all_acked, timeout_s=30, interval_s=0.02, what="every reading acked"
            )
            acked = set(publisher.counts.acked)
            # The partition failed over to a surviving node.
            figures["new_leader"] = (await _leaders(bootstrap, TELEMETRY_TOPIC))[partition]
            assert figures["new_leader"] not in (victim, -1)
            assert running_pid(kafka.component(cluster, victim)) is None
            await eventually(
                lambda: _stored_all(dsn, acked, devices),
                timeout_s=120,
                interval_s=0.2,
                what="every acked reading stored",
            )
            figures["load_s"] = round(time.monotonic() - started, 1)

            # The fever, after the loss, through the failed-over partition.
            topic = f"vigil/v1/dev/{fever_device}/temperature"
            await publish(env, topic, temperature(fever_device, 37.2, 1))
            fever_sent = time.monotonic()
            await publish(env, topic, temperature(fever_device, 38.6, 2))
            await eventually(
                lambda: mail.for_patient(fever_patient),
                timeout_s=90,
                interval_s=0.1,
                what="the fever page",
            )
            figures["fever_page_s"] = round(time.monotonic() - fever_sent, 2)
            # Positive control: a later fever's page has arrived, so a duplicate of the first
            # would have too.
            await publish(
                env,
                f"vigil/v1/dev/{marker_device}/temperature",
                temperature(marker_device, 38.6, 1),
            )
            await eventually(
                lambda: mail.for_patient(marker_patient),
                timeout_s=90,
                interval_s=0.1,
                what="the marker's page",
            )
            figures["service_exits"] = dict(services.exits)
            figures["service_errors"] = list(services.errors)
    finally:
        publisher.close()
        smtp.stop()

    alerts = [
        a
        for a in await _topic_records(bootstrap, ALERTS_TOPIC)
        if a.get("patient_id") == fever_patient and a.get("phase") == "start"
    ]
    in_kafka = {
        str(r["message"]["message_id"])
        for r in await _topic_records(bootstrap, TELEMETRY_TOPIC)
        if r.get("device_id") in seqs
    }
    conn = await asyncpg.connect(dsn)
    try:
        escalations = await conn.fetchval(
            "SELECT count(*) FROM escalations WHERE patient_id = $1", fever_patient
        )
        # The first step's pages (the team's default policy pages again after 5 minutes).
        pages = await conn.fetchval(
            "SELECT count(*) FROM pages p JOIN escalations e USING (escalation_id) "
            "WHERE p.patient_id = $1 AND p.purpose = 'alert' "
            "AND p.created_at < e.opened_at + interval '5 minutes'",
            fever_patient,
        )
    finally:
        await conn.close()
    figures.update(
        published=len(publisher.counts.published),
        acked=len(acked),
        stored=await _stored(dsn, acked, devices),
        in_kafka=len(in_kafka & acked),
        fever_alerts=len(alerts),
        fever_escalations=escalations,
        fever_pages=pages,
        fever_emails=len(mail.for_patient(fever_patient)),
        marker_emails=len(mail.for_patient(marker_patient)),
    )
    print("kafka-cluster " + json.dumps(figures))
    assert figures["acked"] == figures["published"]
    assert figures["stored"] == len(acked), "acknowledged readings missing in PostgreSQL"
    assert figures["in_kafka"] == len(acked), "acknowledged readings missing in Kafka"
    assert figures["fever_alerts"] == 1
    assert figures["fever_escalations"] == 1
    assert figures["fever_pages"] == 1
    assert figures["fever_emails"] == 1
    assert figures["marker_emails"] == 1


async def _stored_all(dsn: str, acked: set[str], devices: list[str]) -> bool:
    return await _stored(dsn, acked, devices) == len(acked)
