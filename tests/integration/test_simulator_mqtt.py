"""The simulator against a real Mosquitto: what it counts as published is what a subscriber gets.

The broker comes from the environment (``VIGIL_MQTT_HOST``, ``VIGIL_MQTT_PORT``,
``VIGIL_SIM_MQTT_USERNAME``, ``VIGIL_SIM_MQTT_PASSWORD``). The local stack's ACL lets the
simulator's account write device topics but not read them, so the test subscribes as the account
in ``VIGIL_MQTT_READER_USERNAME``/``_PASSWORD`` or else ``VIGIL_INGEST_MQTT_USERNAME``/``_PASSWORD``
(both exported by ``vigil stack env``), falling back to the simulator's account on a bare broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import aiomqtt
import pytest

from schemas.device import (
    HeartbeatMessage,
    PumpAlarmCode,
    PumpEvent,
    PumpStatus,
    TemperatureReading,
    parse_device_message,
)
from schemas.topics import CHANNEL_SCHEMAS, MQTT_SUBSCRIPTION, parse_topic
from vigil.settings import MqttSettings
from vigil_tools.simulator import SimulatorSettings
from vigil_tools.simulator.publisher import PUBLISHED, run
from vigil_tools.simulator.registry import fleet_registry

pytestmark = pytest.mark.stack


@dataclass(frozen=True, slots=True)
class MqttEnv:
    host: str
    port: int
    username: str
    password: str
    reader_username: str
    reader_password: str


def _first_env(*names: str) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


@pytest.fixture
def mqtt_env(stack_env: dict[str, str]) -> MqttEnv:
    """The test stack's broker, with the simulator's account and a reader account."""
    port = stack_env["VIGIL_MQTT_PORT"]
    username = os.environ.get("VIGIL_SIM_MQTT_USERNAME", "vigil-sim")
    password = os.environ.get("VIGIL_SIM_MQTT_PASSWORD", "")
    return MqttEnv(
        host=os.environ.get("VIGIL_MQTT_HOST", "127.0.0.1"),
        port=int(port),
        username=username,
        password=password,
        reader_username=_first_env("VIGIL_MQTT_READER_USERNAME", "VIGIL_INGEST_MQTT_USERNAME")
        or username,
        reader_password=_first_env("VIGIL_MQTT_READER_PASSWORD", "VIGIL_INGEST_MQTT_PASSWORD")
        or password,
    )


async def test_every_published_message_arrives_valid(mqtt_env: MqttEnv) -> None:
    """Every message the simulator counts as acknowledged reaches a QoS 1 subscriber, valid
    against the device contract, on its own device's topic, in seq order per topic, including
    the fever readings and the occlusion alarm."""
    # Patient numbers no demo fleet uses, so another simulator on the same broker is not counted.
    first_patient = random.randrange(50_000, 90_000)
    n_patients = 4
    devices = {
        d.device_id
        for d in fleet_registry(
            n_patients, "CT-T", "t@example.org", first_patient=first_patient
        ).devices
    }
    settings = SimulatorSettings(
        patients=n_patients,
        first_patient=first_patient,
        interval_s=0.2,
        duration_s=3.0,
        scenario="fever:1,occlusion:1,normal:rest",
        fever_onset_s=1.0,
        occlusion_after_s=1.5,
        seed=3,
        max_inflight=5,
        mqtt_username=mqtt_env.username,
        mqtt_password=mqtt_env.password,
        mqtt_client_id=f"vigil-sim-test-{uuid4().hex[:8]}",
        mqtt=MqttSettings(host=mqtt_env.host, port=mqtt_env.port),
    )

    received: dict[UUID, TemperatureReading | PumpStatus | PumpEvent] = {}
    channels: Counter[str] = Counter()
    seqs_by_topic: dict[str, list[int]] = defaultdict(list)
    invalid: list[str] = []
    arrived = asyncio.Event()
    started = datetime.now(UTC)

    async with aiomqtt.Client(
        mqtt_env.host,
        mqtt_env.port,
        username=mqtt_env.reader_username,
        password=mqtt_env.reader_password or None,
        identifier=f"vigil-test-reader-{uuid4().hex[:8]}",
    ) as reader:
        await reader.subscribe(MQTT_SUBSCRIPTION, qos=1)

        async def collect() -> None:
            async for delivery in reader.messages:
                topic = parse_topic(delivery.topic.value)
                if topic is None or topic.device_id not in devices:
                    continue
                if not isinstance(delivery.payload, bytes | bytearray):
                    invalid.append(f"{delivery.topic.value}: payload is not bytes")
                    continue
                try:
                    message = parse_device_message(bytes(delivery.payload))
                except ValueError as error:
                    invalid.append(f"{delivery.topic.value}: {error}")
                    continue
                if message.device_id != topic.device_id or message.device_time < started:
                    invalid.append(f"{delivery.topic.value}: wrong device or stale")
                    continue
                if isinstance(message, HeartbeatMessage):
                    # The pipeline heartbeat is not the fleet's to send.
                    invalid.append(f"{delivery.topic.value}: a heartbeat from a fleet device")
                    continue
                if message.message_id not in received:
                    received[message.message_id] = message
                    channels[topic.channel] += 1
                    seqs_by_topic[delivery.topic.value].append(message.seq)
                    arrived.set()

        collector = asyncio.create_task(collect())
        try:
            counts = await run(settings, asyncio.Event())
            try:
                async with asyncio.timeout(10):
                    while len(received) < counts[PUBLISHED]:
                        arrived.clear()
                        await arrived.wait()
            except TimeoutError:
                pytest.fail(
                    f"{len(received)} of {counts[PUBLISHED]} acknowledged messages arrived in "
                    f"10 s; may {mqtt_env.reader_username!r} read {MQTT_SUBSCRIPTION}?"
                )
            # Anything beyond the count would be a message the simulator did not count.
            await asyncio.sleep(0.3)
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    assert invalid == []
    assert counts[PUBLISHED] > 40
    assert len(received) == counts[PUBLISHED]
    assert {k: v for k, v in counts.items() if k in CHANNEL_SCHEMAS} == {
        "temperature": channels["temperature"],
        "pump-status": channels["pump-status"],
        "pump-event": channels["pump-event"],
    }
    # The end-to-end acknowledgements come from whatever ingest shares the broker, if any: this
    # test runs none and registers none of these devices, so an ingest on the shared test stack
    # answers them as rejected (unknown_device), and without one nothing is answered. Either
    # way, every published message is answered once or still waiting in the outbox, and none is
    # due for a resend within the run.
    assert set(counts) - set(CHANNEL_SCHEMAS) <= {
        PUBLISHED,
        "answered_stored",
        "answered_rejected",
        "unanswered",
    }
    assert (
        counts.get("answered_stored", 0) + counts.get("answered_rejected", 0) + counts["unanswered"]
        == counts[PUBLISHED]
    )
    for topic, seqs in seqs_by_topic.items():
        assert seqs == sorted(seqs), topic
    messages = list(received.values())
    assert any(isinstance(m, TemperatureReading) and m.value >= 38.5 for m in messages)
    assert any(
        isinstance(m, PumpEvent) and m.alarm is PumpAlarmCode.OCCLUSION_DOWNSTREAM for m in messages
    )
