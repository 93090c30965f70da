"""The rules' state store (``KafkaStateStore``) against the real stack: a partition's restore
reads what committed transactions wrote to it, up to its committed end, and nothing else.

Four partitions of a private state topic: one with two committed transactions (patients, the
watermark meta, a configuration record, then a tombstone), one never written, one with a
committed transaction followed by an open one, and one with only an open transaction."""

from __future__ import annotations

import uuid

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.rules.adapters.kafka import KafkaStateStore
from vigil.kafka import make_producer
from vigil.settings import KafkaSettings

pytestmark = pytest.mark.stack


async def test_restore_reads_committed_records_only_and_empty_partitions_as_empty(
    stack_env: dict[str, str],
) -> None:
    kafka = KafkaSettings()
    topic = f"rulesstate.{uuid.uuid4().hex[:8]}.state"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 4, 1, topic_configs={"cleanup.policy": "compact"})])
    producer = make_producer(kafka, "rules-state-test", transactional_id=f"{topic}-writer")
    await producer.start()
    try:
        meta = {"watermark": "2026-03-02T00:10:00+00:00"}

        async def committed(partition: int, records: list[tuple[str, bytes | None]]) -> None:
            await producer.begin_transaction()
            for key, value in records:
                await producer.send(topic, value, key=key.encode(), partition=partition)
            await producer.commit_transaction()

        await committed(
            0,
            [
                ("__config__/v1", b"{}"),
                ("P-A", orjson.dumps({"n": 1})),
                ("P-B", orjson.dumps({"n": 2})),
                ("__meta__/0", orjson.dumps(meta)),
            ],
        )
        await committed(0, [("P-A", orjson.dumps({"n": 3})), ("P-B", None)])
        await committed(2, [("P-C", orjson.dumps({"n": 4}))])
        # Open transactions on partitions 2 and 3: past the committed end, never restored.
        await producer.begin_transaction()
        pending = [
            await producer.send(topic, orjson.dumps({"n": 5}), key=b"P-D", partition=2),
            await producer.send(topic, orjson.dumps({"n": 6}), key=b"P-E", partition=3),
        ]
        for delivery in pending:
            await delivery

        store = KafkaStateStore(kafka, topic)
        assert await store.load(0) == (meta, {"P-A": {"n": 3}})
        assert await store.load(1) == (None, {})
        assert await store.load(2) == (None, {"P-C": {"n": 4}})
        assert await store.load(3) == (None, {})
        await producer.abort_transaction()
    finally:
        await producer.stop()
        await admin.delete_topics([topic])
        await admin.close()
