"""Kafka helpers shared by stack tests (not a test module)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.rules.settings import RulesSettings
from vigil_tools.replay.sources import topic_partitions


async def end_offsets(bootstrap: str, *topics: str) -> dict[TopicPartition, int]:
    """The end offset of every partition of ``topics`` now: where a test's own records will
    start."""
    parts = [TopicPartition(t, p) for t in topics for p in await topic_partitions(bootstrap, t)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(parts))
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()


async def create_rules_topics(
    admin: AIOKafkaAdminClient, prefix: str, *, partitions: int = 1, keep: bool = False
) -> dict[str, str]:
    """Private topics for one rules service under test, named ``{prefix}.{kind}``: telemetry,
    alerts and state with ``partitions`` partitions (``keep``: telemetry and alerts never
    expire), a one-partition dead-letter topic, the state topic compacted."""
    names = {kind: f"{prefix}.{kind}" for kind in ("telemetry", "alerts", "state", "dlq")}
    kept = {"retention.ms": "-1"} if keep else {}
    await admin.create_topics(
        [
            NewTopic(names["telemetry"], partitions, 1, topic_configs=dict(kept)),
            NewTopic(names["alerts"], partitions, 1, topic_configs=dict(kept)),
            NewTopic(names["dlq"], 1, 1),
            NewTopic(names["state"], partitions, 1, topic_configs={"cleanup.policy": "compact"}),
        ]
    )
    return names


def rules_settings(names: dict[str, str], **fields: Any) -> RulesSettings:
    """``RulesSettings`` on the topics of ``create_rules_topics``, with ``fields`` besides."""
    return RulesSettings(
        telemetry_topic=names["telemetry"],
        alerts_topic=names["alerts"],
        state_topic=names["state"],
        deadletter_topic=names["dlq"],
        **fields,
    )
