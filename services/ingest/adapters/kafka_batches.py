"""Keyed records to Kafka one partition batch at a time, instead of one ``send`` per record.

aiokafka's ``send`` costs about 20 µs of CPU per record (partitioning with a pure-Python
murmur2, a future per record, the accumulator's bookkeeping); at thousands of readings a second
that was a fifth of ingest's CPU. ``PartitionBatches`` fills one ``BatchBuilder`` per partition
and hands each to the producer with ``send_batch`` (about 5 µs per record). The producer is the
same idempotent, ``acks=all`` producer: sequence numbers are assigned when a batch is drained, so
a batch sent this way is deduplicated by the broker like any other.

Partitions are chosen exactly as the default partitioner chooses them for a key (murmur2 of the
key modulo the partition count, over partitions sorted by id), so a patient's records land on the
same partition as with ``send(key=...)`` and stay in order there; a key's partition is cached
until the topic's partition count changes.

A record named in ``everywhere`` goes to every partition instead, in its place in each one's
order: the pipeline heartbeat, which is every partition's arrival clock (docs/rules.md, "Time").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable
from typing import Any, get_args

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from pydantic import BaseModel

from schemas.device import AnyDeviceMessage
from schemas.events import DeadLetter, Telemetry
from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC

# One record: the caller's index for it (to track what is durable), key, value.
KeyedRecord = tuple[int, bytes, bytes]
# Indices of the records in one partition batch, and the future of that batch.
SentBatch = tuple[list[int], "asyncio.Future[object]"]

_KEYS_CACHED = 100_000


class RecordTooLarge(ValueError):
    """A single record bigger than the producer's batch size; it can never be sent."""


class PartitionBatches:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._partitioner = DefaultPartitioner()
        # topic -> (its partitions sorted by id, key -> partition)
        self._by_key: dict[str, tuple[list[int], dict[bytes, int]]] = {}

    async def _partition_of(self, topic: str) -> dict[bytes, int]:
        partitions = sorted(await self._producer.partitions_for(topic))
        known = self._by_key.get(topic)
        if known is None or known[0] != partitions or len(known[1]) > _KEYS_CACHED:
            known = self._by_key[topic] = (partitions, {})
        return known[1]

    async def send(
        self, topic: str, records: Iterable[KeyedRecord], everywhere: Collection[int] = ()
    ) -> list[SentBatch]:
        """Append ``records`` in order, one batch per partition (more when one fills up), and
        return each batch's record indices with the future that resolves when Kafka has it.
        A record whose index is in ``everywhere`` is appended to every partition (its index is
        then in several batches: it is durable only when all of them are)."""
        producer = self._producer
        by_key = await self._partition_of(topic)
        partitions = self._by_key[topic][0]
        open_batches: dict[int, tuple[Any, list[int]]] = {}
        sent: list[SentBatch] = []
        for index, key, value in records:
            if everywhere and index in everywhere:
                for each in partitions:
                    await self._append(topic, open_batches, sent, each, index, key, value)
                continue
            partition = by_key.get(key)
            if partition is None:
                partition = by_key[key] = self._partitioner(key, partitions, partitions)
            entry = open_batches.get(partition)
            if (
                entry is not None
                and entry[0].append(key=key, value=value, timestamp=None) is not None
            ):
                entry[1].append(index)  # the usual case, without a coroutine per record
                continue
            await self._append(topic, open_batches, sent, partition, index, key, value)
        for partition, (builder, indices) in open_batches.items():
            sent.append((indices, await producer.send_batch(builder, topic, partition=partition)))
        return sent

    async def _append(
        self,
        topic: str,
        open_batches: dict[int, tuple[Any, list[int]]],
        sent: list[SentBatch],
        partition: int,
        index: int,
        key: bytes,
        value: bytes,
    ) -> None:
        """One record into its partition's open batch (a full batch is sent first)."""
        producer = self._producer
        entry = open_batches.get(partition)
        if entry is None:
            entry = open_batches[partition] = (producer.create_batch(), [])
        if entry[0].append(key=key, value=value, timestamp=None) is None:
            if not entry[1]:
                raise RecordTooLarge(f"a {len(value)}-byte record exceeds the batch size")
            # Full: send it now, so this partition's batches reach Kafka in record order.
            future = await producer.send_batch(entry[0], topic, partition=partition)
            sent.append((entry[1], future))
            entry = open_batches[partition] = (producer.create_batch(), [])
            if entry[0].append(key=key, value=value, timestamp=None) is None:
                raise RecordTooLarge(f"a {len(value)}-byte record exceeds the batch size")
        entry[1].append(index)


def _pydantic_json(event: Telemetry | DeadLetter) -> bytes:
    """The event's JSON, as ``vigil.kafka.encode`` writes it, through the model's serializer
    directly (the ``model_dump_json`` wrapper and the ``str`` round trip cost a third more)."""
    return event.__pydantic_serializer__.to_json(event, by_alias=True)


# The same bytes through orjson, about a third of the time per record: each model's fields in
# declaration order under their serialised names, read from the instance's ``__dict__``. What
# makes the two writers agree (tests/unit/test_ingest_kafka_encode.py compares them over many
# generated events of every kind): pydantic-core and orjson write str (non-ASCII as is), int,
# UUID, enum values, None, tuples and floats (shortest round trip, ``1e+16``, ``-0.0``) alike, and
# aware datetimes alike once orjson writes a zero offset as ``Z`` (``OPT_UTC_Z``), as pydantic
# does. A float field holding something else than a float (pydantic writes an int there as
# ``37.0``, orjson as ``37``), a model with custom serialisation, or anything orjson refuses goes
# through pydantic's serializer instead.

# A model's fields as a dict for orjson; None when a float field holds something else.
_Fields = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def _fields_of(model: type[BaseModel]) -> _Fields | None:
    """A function of an instance's ``__dict__`` giving its fields in declaration order under
    their serialised names (written out as one dict display: a third of the time of a loop over
    the fields); None when the model serialises in a way orjson does not reproduce."""
    decorators = model.__pydantic_decorators__
    if decorators.field_serializers or decorators.model_serializers or model.model_computed_fields:
        return None
    items: list[str] = []
    checks: list[str] = []
    for name, info in model.model_fields.items():
        if info.exclude:
            return None
        items.append(f"{info.serialization_alias or info.alias or name!r}: d[{name!r}]")
        if info.annotation in (float, float | None):
            checks.append(f"    v = d[{name!r}]\n    if v is not None and type(v) is not float:\n")
            checks.append("        return None\n")
    source = f"def fields(d):\n{''.join(checks)}    return {{{', '.join(items)}}}\n"
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # the source holds the model's own field names only
    fields: _Fields = namespace["fields"]
    return fields


def _all_fields(models: Iterable[type[BaseModel]]) -> dict[type[BaseModel], _Fields]:
    return {model: fields for model in models if (fields := _fields_of(model)) is not None}


_MESSAGE_FIELDS = _all_fields(get_args(AnyDeviceMessage))
_EVENT_FIELDS = _all_fields((Telemetry, DeadLetter))
_TELEMETRY_FIELDS = _EVENT_FIELDS.get(Telemetry)


def _document(event: Telemetry | DeadLetter) -> dict[str, Any] | None:
    """The event as orjson should write it, or None when pydantic's serializer must."""
    if type(event) is Telemetry:
        message = event.message
        message_fields = _MESSAGE_FIELDS.get(type(message))
        if _TELEMETRY_FIELDS is None or message_fields is None:
            return None
        document = _TELEMETRY_FIELDS(event.__dict__)
        body = message_fields(message.__dict__)
        if document is None or body is None:
            return None
        document["message"] = body  # in its place: a key that exists keeps its position
        return document
    fields = _EVENT_FIELDS.get(type(event))
    return None if fields is None else fields(event.__dict__)


def encode(event: Telemetry | DeadLetter) -> bytes:
    """The event's JSON, byte for byte as ``vigil.kafka.encode`` (pydantic) writes it."""
    document = _document(event)
    if document is not None:
        try:
            return orjson.dumps(document, option=orjson.OPT_UTC_Z)
        except orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: pydantic's serializer decides
    return _pydantic_json(event)


class KafkaTelemetry:
    """The pipeline's Kafka port (``service_layer.ports.TelemetryProducer``): accepted telemetry
    to ``vigil.telemetry.v1`` keyed by patient, one batch per partition; dead letters to
    ``vigil.deadletter.v1`` keyed by the topic's device id, one record at a time (they are rare)."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        telemetry_topic: str = TELEMETRY_TOPIC,
        deadletter_topic: str = DEADLETTER_TOPIC,
    ) -> None:
        self._producer = producer
        self._batches = PartitionBatches(producer)
        self._telemetry_topic = telemetry_topic
        self._deadletter_topic = deadletter_topic

    async def send_telemetry(
        self, records: Iterable[tuple[int, Telemetry]], everywhere: Collection[int] = ()
    ) -> list[SentBatch]:
        return await self._batches.send(
            self._telemetry_topic,
            ((i, t.patient_id.encode(), encode(t)) for i, t in records),
            everywhere,
        )

    async def send_dead_letter(self, dead: DeadLetter) -> asyncio.Future[object]:
        future: asyncio.Future[object] = await self._producer.send(
            self._deadletter_topic, encode(dead), key=(dead.device_id or "").encode() or None
        )
        return future
