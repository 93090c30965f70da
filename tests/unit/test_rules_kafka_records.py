"""The rules' telemetry consumer gets the record batches' own records; other consumers do not.

``services.rules.adapters.kafka.telemetry_consumer`` marks the consumer, and the fetcher of a
marked consumer hands out each record as its record batch decoded it instead of building a
``ConsumerRecord``. Checked here on a record batch in memory, through aiokafka's own fetcher
records, for a marked and an unmarked consumer.
"""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord

from services.rules.adapters.kafka import TELEMETRY_FETCH_BYTES, telemetry_consumer

READ_COMMITTED = 1


def _records(value_deserializer: object) -> list[object]:
    """Three records (offsets 5-7, the last one a tombstone) through the fetcher's records of
    one partition, with the value deserializer a consumer would give its fetcher."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for i, value in enumerate([b'{"n": 0}', b'{"n": 1}', None]):
        builder.append(i, timestamp=None, key=f"P-{i}".encode(), value=value, headers=[])
    batch = bytearray(builder.build())
    batch[0:8] = (5).to_bytes(8, "big")  # the batch's base offset
    records = MemoryRecords(bytes(batch))
    return list(
        PartitionRecords(
            TopicPartition("telemetry", 0),
            records,
            None,
            5,
            None,
            value_deserializer,
            False,
            READ_COMMITTED,
        )
    )


async def test_a_marked_consumer_gets_the_batch_records_with_the_same_offsets_and_values() -> None:
    consumer = telemetry_consumer(AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9"))
    assert consumer._max_partition_fetch_bytes == TELEMETRY_FETCH_BYTES

    marked = _records(consumer._value_deserializer)
    plain = _records(None)

    assert [type(r) for r in plain] == [ConsumerRecord] * 3
    assert not any(isinstance(r, ConsumerRecord) for r in marked)
    assert [(r.offset, r.key, r.value) for r in marked] == [  # type: ignore[attr-defined]
        (r.offset, r.key, r.value)  # type: ignore[attr-defined]
        for r in plain
    ]
    assert [r.offset for r in marked] == [5, 6, 7]  # type: ignore[attr-defined]
    assert [r.value for r in marked] == [b'{"n": 0}', b'{"n": 1}', None]  # type: ignore[attr-defined]


async def test_the_marking_leaves_other_consumers_alone() -> None:
    telemetry_consumer(AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9"))
    telemetry_consumer(AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9"))  # installed once

    other = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
    assert other._value_deserializer is None

    def upper(value: bytes | None) -> bytes | None:
        return None if value is None else value.upper()

    records = _records(upper)
    assert [type(r) for r in records] == [ConsumerRecord] * 3
    assert [r.value for r in records] == [b'{"N": 0}', b'{"N": 1}', None]  # type: ignore[attr-defined]
