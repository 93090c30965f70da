"""End to end on the real stack: a thermometer reading over MQTT becomes an e-mail page.

Real Mosquitto, real Kafka (KRaft), real PostgreSQL, a real SMTP server (aiosmtpd). The three
services run in this process as tasks, each with its own settings built from the stack's
environment, exactly as their entry points build them.
"""

from __future__ import annotations

import asyncio
import email
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiosmtpd.controller import Controller

from schemas.events import DeadLetter
from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC
from schemas.topics import MQTT_SUBSCRIPTION
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)

pytestmark = pytest.mark.stack


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
    from services.ingest.app import run as run_ingest
    from services.ingest.settings import IngestSettings
    from services.notify.app import run as run_notify
    from services.notify.settings import NotifySettings
    from services.rules.app import run as run_rules
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
    ingest_settings = IngestSettings(
        mqtt_client_id=f"ingest-e2e-{run_id}", mqtt_share_group=f"ingest-e2e-{run_id}"
    )
    rules_settings = RulesSettings(group_id=f"rules-e2e-{run_id}")
    notify_settings = NotifySettings(smtp_port=smtp_port, group_id=f"notify-e2e-{run_id}")
    # Make the broker hold messages for this ingest from now on, whenever it gets to subscribing.
    await open_mqtt_session(
        stack_env,
        ingest_settings.mqtt_client_id,
        f"$share/{ingest_settings.mqtt_share_group}/{MQTT_SUBSCRIPTION}",
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_ingest(ingest_settings, stop), name="ingest"),
        asyncio.create_task(run_rules(rules_settings, stop), name="rules"),
        asyncio.create_task(run_notify(notify_settings, stop), name="notify"),
    ]
    await asyncio.sleep(3)  # let consumers join their groups and ingest subscribe
    for task in tasks:
        if task.done():
            task.result()  # surface a start-up failure as the test error it is
    try:
        yield Pipeline(mail=mail, rules_group=f"rules-e2e-{run_id}", run_id=run_id)
    finally:
        stop.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        controller.stop()
        await drop_mqtt_session(stack_env, f"ingest-e2e-{run_id}")
        for name, result in zip(("ingest", "rules", "notify"), results, strict=True):
            assert not isinstance(result, BaseException), f"{name} failed: {result!r}"


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
    return json.dumps(
        {
            "schema": "vigil.device.temperature.v1",
            "message_id": str(uuid.uuid4()),
            "device_id": device_id,
            "seq": seq,
            "device_time": datetime.now(UTC).isoformat(),
            "value": value,
            "unit": "C",
            "site": "axillary",
        }
    ).encode()


async def rules_caught_up(bootstrap: str, group: str, within_s: float = 30) -> None:
    """Wait until the rules group has committed past every telemetry record written so far."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await probe.start()
    await admin.start()
    try:
        partitions = [
            TopicPartition(TELEMETRY_TOPIC, p)
            for p in probe.partitions_for_topic(TELEMETRY_TOPIC) or ()
        ]
        ends = await probe.end_offsets(partitions)
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            committed = await admin.list_consumer_group_offsets(group)
            if all(
                ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp])
                for tp in partitions
            ):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"rules did not catch up: {committed} < {ends}")
            await asyncio.sleep(0.2)
    finally:
        await probe.stop()
        await admin.close()


async def wait_for(predicate: object, within_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_normal_reading_pages_no_one(pipeline: Pipeline, stack_env: dict[str, str]) -> None:
    """A normal temperature is stored and evaluated by rules, and no page is sent."""
    patient, device, _ = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, "normal"
    )
    await publish(stack_env, f"vigil/v1/dev/{device}/temperature", temperature(device, 37.1, 1))

    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:

        async def stored() -> int:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM temperature_readings WHERE patient_id = $1", patient
                )
            )

        deadline = asyncio.get_running_loop().time() + 30
        while await stored() == 0:
            assert asyncio.get_running_loop().time() < deadline, "reading never stored"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    await rules_caught_up(stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"], pipeline.rules_group)
    await asyncio.sleep(1.0)  # any page rules decided has had time to reach notify and SMTP
    assert pipeline.mail.for_patient(patient) == []


async def test_fever_reading_reaches_the_oncall_by_email(
    pipeline: Pipeline, stack_env: dict[str, str]
) -> None:
    """38.6 °C published over MQTT QoS 1 becomes one e-mail page to the team's on-call address,
    carrying patient, device, value and threshold, and the page is recorded."""
    patient, device, oncall = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, "fever"
    )
    topic = f"vigil/v1/dev/{device}/temperature"
    await publish(stack_env, topic, temperature(device, 37.2, 1))
    await publish(stack_env, topic, temperature(device, 38.6, 2))

    await wait_for(lambda: pipeline.mail.for_patient(patient), 60, "the fever page")
    page = pipeline.mail.for_patient(patient)[0]
    body = page.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert page["To"] == oncall
    assert patient in page["Subject"] and "HIGH" in page["Subject"].upper()
    for expected in (patient, device, "38.6", "38.3", "fever"):
        assert expected in body, expected

    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        rows = await conn.fetch(
            "SELECT recipient, status FROM pages WHERE patient_id = $1", patient
        )
    finally:
        await conn.close()
    assert [r["recipient"] for r in rows] == [oncall]
    assert rows[0]["status"] in ("sent", "delivered")
    # The 37.2 °C reading before it paged no one; the fever paged exactly once.
    await rules_caught_up(stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"], pipeline.rules_group)
    await asyncio.sleep(1.0)
    assert len(pipeline.mail.for_patient(patient)) == 1


async def test_invalid_payload_goes_to_dead_letter_with_reason(
    pipeline: Pipeline, stack_env: dict[str, str]
) -> None:
    """Malformed JSON is not dropped: it reaches the dead-letter topic with its reason, and the
    pipeline keeps flowing for the next good reading."""
    bootstrap = stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        group_id=f"dlq-e2e-{pipeline.run_id}",
    )
    await consumer.start()
    try:
        while not consumer.assignment():  # noqa: ASYNC110 - aiokafka offers no assignment event
            await asyncio.sleep(0.1)
        await consumer.seek_to_end()
        for tp in consumer.assignment():
            await consumer.position(tp)
        device = f"thermo-dlq-{pipeline.run_id}"
        marker = uuid.uuid4().hex.encode()
        await publish(stack_env, f"vigil/v1/dev/{device}/temperature", b"{not json " + marker)
        found: DeadLetter | None = None
        deadline = asyncio.get_running_loop().time() + 30
        while found is None:
            assert asyncio.get_running_loop().time() < deadline, "no dead letter arrived"
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    letter = DeadLetter.model_validate_json(record.value or b"")
                    if letter.device_id == device:
                        found = letter
        assert found.reason == "invalid_json"
        assert found.source_topic == f"vigil/v1/dev/{device}/temperature"
        import base64

        assert marker in base64.b64decode(found.payload_b64)
    finally:
        await consumer.stop()

    patient, good_device, _ = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, "after-dlq"
    )
    await publish(
        stack_env, f"vigil/v1/dev/{good_device}/temperature", temperature(good_device, 38.9, 1)
    )
    await wait_for(lambda: pipeline.mail.for_patient(patient), 60, "a page after a bad message")
