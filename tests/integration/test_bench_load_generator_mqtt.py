"""The benchmarks' load generator against the real Mosquitto of the stack: every message that
``paced`` sends through ``QosOnePublisher`` (chunked writes, PUBACKs counted from whole chunks
of bytes) is acknowledged, and a QoS 1 subscriber receives each one, in seq order per device."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict

import aiomqtt
import orjson
import pytest

from bench.common import QosOnePublisher, paced
from bench.ingest import make_payload_factory

pytestmark = pytest.mark.stack

MESSAGES = 12_000  # 500 per device


async def test_every_message_is_acknowledged_and_delivered(stack_env: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:8]
    # An even number of devices over two connections: each device's readings all go through
    # one connection (message i on connection i % 2), so they arrive in seq order.
    devices = [f"bench-lg-{run}-{i:02d}" for i in range(24)]
    port = int(stack_env["VIGIL_MQTT_PORT"])
    seqs: dict[str, list[int]] = defaultdict(list)
    ids: set[str] = set()
    complete = asyncio.Event()

    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        username=stack_env["VIGIL_INGEST_MQTT_USERNAME"],
        password=stack_env["VIGIL_INGEST_MQTT_PASSWORD"],
        identifier=f"bench-lg-{run}-reader",
    ) as reader:
        await reader.subscribe("vigil/v1/dev/+/temperature", qos=1)

        async def collect() -> None:
            async for delivery in reader.messages:
                assert isinstance(delivery.payload, bytes)
                doc = orjson.loads(delivery.payload)
                if not doc["device_id"].startswith(f"bench-lg-{run}-"):
                    continue
                assert delivery.topic.value == f"vigil/v1/dev/{doc['device_id']}/temperature"
                ids.add(doc["message_id"])
                seqs[doc["device_id"]].append(doc["seq"])
                if len(ids) == MESSAGES:
                    complete.set()

        collector = asyncio.create_task(collect())
        publishers = [
            QosOnePublisher(
                "127.0.0.1",
                port,
                f"bench-lg-{run}-pub-{k}",
                stack_env["VIGIL_SIM_MQTT_USERNAME"],
                stack_env["VIGIL_SIM_MQTT_PASSWORD"],
                window=300,
            )
            for k in range(2)
        ]
        try:
            for publisher in publishers:
                await publisher.connect()
            sent, _, _ = await paced(publishers, make_payload_factory(devices), 0, 60.0, MESSAGES)
            for publisher in publishers:
                await publisher.close()
            await asyncio.wait_for(complete.wait(), 30)
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    assert sent == MESSAGES
    assert sum(p.acked for p in publishers) == MESSAGES
    assert len(ids) == MESSAGES
    assert sorted(seqs) == devices
    for device_seqs in seqs.values():
        assert device_seqs == list(range(1, MESSAGES // len(devices) + 1))
