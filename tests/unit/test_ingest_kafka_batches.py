"""PartitionBatches: keyed records reach the partition the default partitioner would choose, in
order, one batch per partition, with each batch's record indices (a fake producer stands in for
aiokafka; the real broker path is covered by the ingest integration, crash and bench runs)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner

from services.ingest.adapters.kafka_batches import PartitionBatches, RecordTooLarge


class FakeBuilder:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes, bytes]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        if sum(len(v) for _, v in self.records) + len(value) > self.capacity:
            return None
        self.records.append((key, value))
        return object()


class FakeProducer:
    def __init__(self, partitions: set[int], capacity: int = 10_000) -> None:
        self.partitions = partitions
        self.capacity = capacity
        self.sent: list[tuple[str, int, list[tuple[bytes, bytes]]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder(self.capacity)

    async def send_batch(self, batch: FakeBuilder, topic: str, *, partition: int) -> Any:
        self.sent.append((topic, partition, batch.records))
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _records(count: int, patients: int = 7, size: int = 10) -> list[tuple[int, bytes, bytes]]:
    return [(i, f"P-{i % patients}".encode(), f"{i:0{size}d}".encode()) for i in range(count)]


async def test_each_key_lands_where_the_default_partitioner_puts_it_in_order() -> None:
    """Same partition as ``send(key=...)`` would pick, records of one key in their order, and
    every record index reported once with its batch."""
    producer = FakeProducer({0, 1, 2, 3, 4, 5})
    records = _records(100)
    sent = await PartitionBatches(producer).send("t", records)
    default = DefaultPartitioner()
    for _, partition, batch in producer.sent:
        for key, _ in batch:
            assert partition == default(key, [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
    by_key: dict[bytes, list[bytes]] = {}
    for _, _, batch in producer.sent:
        for key, value in batch:
            by_key.setdefault(key, []).append(value)
    for key, values in by_key.items():
        assert values == [v for _, k, v in records if k == key]
    assert sorted(i for indices, _ in sent for i in indices) == list(range(100))
    assert len(producer.sent) == len({p for _, p, _ in producer.sent})  # one batch per partition


async def test_a_full_batch_is_sent_before_the_next_of_its_partition() -> None:
    """When a partition's batch fills up it is sent, and the next one follows it, so order
    within the partition holds across batches."""
    producer = FakeProducer({0}, capacity=35)
    sent = await PartitionBatches(producer).send("t", _records(10))
    values = [v for _, _, batch in producer.sent for _, v in batch]
    assert values == [f"{i:010d}".encode() for i in range(10)]
    assert [indices for indices, _ in sent] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


async def test_a_changed_partition_count_repartitions() -> None:
    """The key-to-partition cache is dropped when the topic gains partitions."""
    producer = FakeProducer({0, 1})
    batches = PartitionBatches(producer)
    await batches.send("t", _records(20, patients=20))
    producer.partitions = set(range(12))
    producer.sent.clear()
    await batches.send("t", _records(20, patients=20))
    default = DefaultPartitioner()
    for _, partition, batch in producer.sent:
        for key, _ in batch:
            assert partition == default(key, list(range(12)), list(range(12)))


async def test_a_record_larger_than_a_batch_is_refused() -> None:
    """A record that fits in no batch raises instead of being silently dropped."""
    producer = FakeProducer({0}, capacity=5)
    with pytest.raises(RecordTooLarge):
        await PartitionBatches(producer).send("t", _records(1))


async def test_a_record_named_everywhere_reaches_every_partition_in_its_place() -> None:
    """The pipeline heartbeat is every partition's arrival clock: named in ``everywhere`` it is
    appended to each partition, after the records before it and before those after it there,
    and its index is in one batch per partition. The other records still go by their key."""
    producer = FakeProducer({0, 1, 2, 3})
    records = _records(12, patients=12)
    beat = (12, b"pipeline", b"heartbeat")
    records = [*records[:6], beat, *records[6:]]
    sent = await PartitionBatches(producer).send("t", records, everywhere={12})
    default = DefaultPartitioner()
    assert {p for _, p, _ in producer.sent} == {0, 1, 2, 3}
    for _, partition, batch in producer.sent:
        values = [v for _, v in batch]
        assert values.count(b"heartbeat") == 1
        at = values.index(b"heartbeat")
        keys = [k for k, _ in batch]
        for position, key in enumerate(keys):
            if key == b"pipeline":
                continue
            assert partition == default(key, [0, 1, 2, 3], [0, 1, 2, 3])
            index = int(batch[position][1])
            assert (index < 6) == (position < at)
    assert sum(1 for indices, _ in sent if 12 in indices) == 4


async def test_without_everywhere_the_same_record_goes_to_its_key_alone() -> None:
    """Positive control for the test above: the heartbeat's key alone decides its partition
    when it is not named in ``everywhere``."""
    producer = FakeProducer({0, 1, 2, 3})
    await PartitionBatches(producer).send("t", [(0, b"pipeline", b"heartbeat")])
    assert len(producer.sent) == 1
