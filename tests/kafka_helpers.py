"""Kafka helpers shared by stack tests (not a test module)."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.kafka_topics import TELEMETRY_TOPIC


async def telemetry_end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    """The end offset of every telemetry partition now: where a test's own records will start."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        parts = [
            TopicPartition(TELEMETRY_TOPIC, p)
            for p in await producer.partitions_for(TELEMETRY_TOPIC)
        ]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(parts))
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
