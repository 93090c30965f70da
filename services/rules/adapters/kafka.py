"""Kafka behind the rules' ports: the transactional producer (``KafkaOutbox``), the state
topic read back at restore (``KafkaStateStore``) and the consumer's rebalance callbacks
(``RebalanceListener``).

``TELEMETRY_FETCH_BYTES`` is the telemetry consumer's fetch size per partition: large enough for
a batch.

The state topic (compacted, ``vigil.rules.state.v1``) holds, per telemetry partition number,
the state of each patient (key: patient id), the partition's watermark meta
(``__meta__/<partition>``), and on partition 0 one record per pinned configuration
(``__config__/<config_version>``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from services.rules.service_layer.partitions import META_KEY, PartitionEngines
from vigil.kafka import make_consumer
from vigil.runtime import log_fields
from vigil.settings import KafkaSettings

log = logging.getLogger("vigil.rules")


# Per partition and fetch: up to about a full batch (``MAX_BATCH``) of ~500-byte telemetry records
# over six partitions comes back in one fetch, so a batch is fetched in one round trip rather
# than four, and the fetch of the next batch is answered while this one is decided. Fetches are
# that large only while the service is behind; a caught-up one gets what arrived.
TELEMETRY_FETCH_BYTES = 4 * 1024 * 1024


# The restore reader's retry backoff (aiokafka's default is 100 ms). Its first request, for the
# partition's committed end, is for a topic the fresh reader has no metadata for: it fails as
# stale, asks for the metadata and retries after one backoff (the retry waits for the metadata
# however long it takes). With the default every restore stood still 100 ms. What the shorter
# one costs: a failing broker is retried five times as often while a partition is restored.
RESTORE_RETRY_BACKOFF_MS = 20


class KafkaOutbox:
    """``TransactionalOutbox`` on a started transactional ``AIOKafkaProducer``."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def begin(self) -> None:
        await self.producer.begin_transaction()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, partition: int | None = None
    ) -> Awaitable[Any]:
        future: Awaitable[Any] = await self.producer.send(
            topic, value, key=key, partition=partition
        )
        return future

    async def send_state(
        self, topic: str, partition: int, records: list[tuple[str, bytes]]
    ) -> list[Awaitable[Any]]:
        """Queue state records for one partition as whole record batches; the futures of their
        delivery.

        A transaction writes thousands of small state records; ``send`` costs a partitioner
        call, an accumulator append and a future per record, which dominated a batch. Filling a
        batch builder directly is the same records, same partition, same transaction, at a
        fraction of it."""
        producer = self.producer
        futures = []
        batch = producer.create_batch()
        for key, value in records:
            encoded = key.encode()
            if batch.append(key=encoded, value=value, timestamp=None) is None:
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                if batch.append(key=encoded, value=value, timestamp=None) is None:
                    raise ValueError(f"state of {key} does not fit in one record batch")
        if batch.record_count():
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures

    async def send_offsets(self, offsets: dict[Any, int], group_id: str) -> None:
        await self.producer.send_offsets_to_transaction(offsets, group_id)

    async def commit(self) -> None:
        await self.producer.commit_transaction()

    async def abort(self) -> None:
        await self.producer.abort_transaction()

    async def stop(self) -> None:
        await self.producer.stop()


class KafkaStateStore:
    """``StateStore`` on the state topic: each load reads one partition from its beginning to
    its committed end with a reader of its own."""

    def __init__(self, kafka: KafkaSettings, state_topic: str) -> None:
        self.kafka = kafka
        self.state_topic = state_topic

    async def load(self, partition: int) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        reader = make_consumer(
            self.kafka,
            group_id=None,
            client_id="rules-restore",
            retry_backoff_ms=RESTORE_RETRY_BACKOFF_MS,
        )
        await reader.start()
        try:
            tp = TopicPartition(self.state_topic, partition)
            meta: dict[str, Any] | None = None
            patients: dict[str, dict[str, Any]] = {}
            # The committed end before the partition is assigned: once assigned, the reader
            # fetches it, and on an empty partition the broker holds that fetch for its
            # maximum wait (500 ms) while the request for the end waited behind it on the
            # same connection. An empty partition needs no fetch at all.
            end = (await reader.end_offsets([tp]))[tp]
            if end == 0:
                return meta, patients
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            meta_key = META_KEY.format(partition=partition)
            while await reader.position(tp) < end:
                # Short: a partition's committed end is a transaction marker, which advances
                # the position without returning a record, so the last getmany always waits
                # it out.
                for records in (await reader.getmany(tp, timeout_ms=50)).values():
                    for record in records:
                        key = (record.key or b"").decode()
                        if key.startswith("__config__/"):
                            continue
                        if record.value is None:
                            patients.pop(key, None)
                        elif key == meta_key:
                            meta = orjson.loads(record.value)
                        else:
                            patients[key] = orjson.loads(record.value)
            return meta, patients
        finally:
            await reader.stop()


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer's rebalance callbacks: a revoked partition's engine is dropped; an
    assigned one is restored by the processing loop, before the next fetch."""

    def __init__(self, partitions: PartitionEngines) -> None:
        self.partitions = partitions

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.partitions.revoke(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info(
            "rules_partitions_assigned",
            extra=log_fields(partitions=[tp.partition for tp in assigned]),
        )
