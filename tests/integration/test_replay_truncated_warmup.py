"""A Kafka warm-up whose partition's beginning retention has deleted is flagged in the replay
summary, with the partition, its earliest offset and that record's time.

The deletion is real: ``delete_records`` moves the partition's log start offset exactly as
retention does, on a private one-partition topic.
"""

from __future__ import annotations

import argparse
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete

from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings
from vigil_tools.replay.cli import write_outputs
from vigil_tools.replay.service import ReplayRequest, run_replay
from vigil_tools.replay.synthetic import course

pytestmark = pytest.mark.stack


async def test_a_warmup_from_a_deleted_beginning_is_reported(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Two days recorded, the first 100 records deleted; a replay of day two warms up from
    the earliest record left and says so (``warmup_truncated``, partition 0, offset 100), in
    the summary and on every line of the alert file; the same replay before the deletion says
    nothing."""
    kafka = KafkaSettings()
    run = uuid.uuid4().hex[:8]
    topic = f"test.replay.truncated.{run}"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    events = sorted(course(f"trunc-{run}", start, days=2), key=lambda e: e.ingest_time)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"retention.ms": "-1"})])
    try:
        producer = make_producer(kafka, f"test-trunc-{run}")
        await producer.start()
        try:
            for event in events:
                await producer.send(
                    topic,
                    encode(event),
                    key=event.patient_id.encode(),
                    timestamp_ms=int(event.ingest_time.timestamp() * 1000),
                )
            await producer.flush()
        finally:
            await producer.stop()
        request = ReplayRequest(
            source="kafka", topic=topic, since=start + timedelta(days=1), audit=False
        )
        intact = await run_replay(request, kafka=kafka)
        assert intact.summary()["warmup_truncated"] is False
        assert intact.summary()["truncated_partitions"] == []

        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(100)})
        trimmed = await run_replay(request, kafka=kafka)
        summary = trimmed.summary()
        assert summary["warmup_truncated"] is True
        [flag] = summary["truncated_partitions"]
        assert flag["partition"] == 0
        assert flag["earliest_offset"] == 100
        assert flag["earliest_time"] == events[100].ingest_time.isoformat()
        assert flag["needed_from"] == "start of record"
        assert summary["warmup_events_read"] == intact.summary()["warmup_events_read"] - 100
        # The alert file says it of every alert too (all of them are on partition 0).
        for outcome, expected in ((trimmed, True), (intact, False)):
            out = tmp_path / f"alerts-{expected}.jsonl"
            write_outputs(
                outcome,
                argparse.Namespace(
                    out=str(out), format="jsonl", diff_json=None, diff_csv=None, html=None
                ),
            )
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            assert lines and {line["warmup_truncated"] for line in lines} == {expected}
    finally:
        await admin.delete_topics([topic])
        await admin.close()
