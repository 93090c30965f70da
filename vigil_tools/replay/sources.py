"""Where a replay reads its recorded stream from: the telemetry topic or the readings archive.

Both readers are read-only by construction. The Kafka reader is a consumer with no group id:
it assigns partitions itself, seeks, and never commits, so no consumer group (the live rules'
least of all) moves. The archive reader runs in a ``READ ONLY`` repeatable-read transaction, so
PostgreSQL itself refuses any write and the three readings tables are seen at one instant.

Order matters for reproducing decisions. The topic holds each patient's events in the order the
live rules consumed them (ingest keys by patient), so a Kafka replay feeds them in offset order.
The archive has no arrival order; it is replayed in device-time order with a stable tie-break
(ingest time, device, sequence number, message id), or in ingest-time order on request, which
approximates the order the live service saw.

A replay that starts mid-stream first *warms up*: both readers can start earlier than the window
(the archive from the start of each patient's record, Kafka from the start of each partition)
and mark what lies before the window as warm-up (``WARMUP``, ``WARMUP_CONTEXT``), so the engine
reaches the window with the state the live one had there; ``runner.Replay`` reports nothing
decided during warm-up except the alerts still open when the window starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from itertools import starmap
from operator import attrgetter
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from schemas.events import Alert
from schemas.kafka_topics import TELEMETRY_TOPIC
from vigil.kafka import make_consumer
from vigil.settings import KafkaSettings
from vigil_tools.replay.engine_port import (
    CHANNEL_PUMP_EVENT,
    CHANNEL_PUMP_STATUS,
    CHANNEL_TEMPERATURE,
    ReplayEvent,
    build_archived,
    decode_record,
    decode_sealed_day,
    encode_sealed_day,
)

#: Where a replayed event came from: ("kafka", partition, offset) or ("pg", table, message id)
#: for an archive row (a message id names one row of the archive, whatever was selected).
#: Other first elements mark events the engine sees but the replay does not report on (see
#: ``Replay.feed``): ``CONTEXT``, another patient's event that moves event time as it did live;
#: ``WARMUP``, a selected event before the window; ``WARMUP_CONTEXT``, context before the window.
Position = tuple[str, Any, Any]
CONTEXT = "context"
WARMUP = "warmup"
WARMUP_CONTEXT = "warmup-context"
Batch = list[tuple[ReplayEvent, Position]]


class AsRead(list[ReplayEvent]):
    """A batch of archive events that are all replayed as read: each one's position is
    ``ARCHIVED``, and none is context or warm-up. The archive reader's common case, fed by
    ``Replay.feed`` without a position per event (one tuple and one test less per row)."""

    __slots__ = ()


class AsReadByDeviceTime(AsRead):
    """An ``AsRead`` batch in device-time order (the archive's default order): its first
    event is its earliest and its last the latest, so its span needs no pass over it."""

    __slots__ = ()


@dataclass(slots=True)
class PartitionRun:
    """Records of one telemetry partition, in log order, all replayed as read (none is context
    or warm-up): event ``i`` is at ``("kafka", partition, offsets[i])``. The Kafka reader's
    common case, fed by ``Replay.feed`` without a position per record."""

    partition: int
    events: list[ReplayEvent]
    offsets: list[int]


#: What a reader yields and ``Replay.feed`` takes.
Feed = Batch | AsRead | PartitionRun

ArchiveOrder = Literal["device", "ingest"]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events a replay takes: one patient, one device, a care team's patients, or all.

    ``since``/``until`` bound device time for the archive. For Kafka they pick offsets by record
    timestamp (when ingest produced the record), which is the only time Kafka indexes.
    """

    patient_ids: frozenset[str] | None = None
    device_ids: frozenset[str] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def admits(self, event: ReplayEvent) -> bool:
        if self.patient_ids is not None and event.patient_id not in self.patient_ids:
            return False
        return self.device_ids is None or event.device_id in self.device_ids

    def describe(self) -> dict[str, Any]:
        return {
            "patients": sorted(self.patient_ids) if self.patient_ids is not None else "all",
            "devices": sorted(self.device_ids) if self.device_ids is not None else "all",
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


@dataclass(slots=True)
class ReadStats:
    """What a reader saw, so a report can say how much was read and what was not usable."""

    read: int = 0
    admitted: int = 0
    rejected: int = 0
    rejected_positions: list[Position] = field(default_factory=list)
    # Records read before the window to rebuild the rule state (not counted in ``read``).
    warmup_read: int = 0
    # Archive events (of ``read`` and ``warmup_read``) read from sealed days.
    sealed: int = 0

    def absorb(self, other: ReadStats) -> None:
        """Add what another reader of other lanes saw."""
        self.read += other.read
        self.admitted += other.admitted
        self.rejected += other.rejected
        self.rejected_positions = sorted(
            [*self.rejected_positions, *other.rejected_positions], key=str
        )
        self.warmup_read += other.warmup_read
        self.sealed += other.sealed


# ---------------------------------------------------------------------------------------------
# Kafka


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition; ``None`` means earliest / the end at start-up."""

    partition: int
    start: int | None = None
    end: int | None = None


def parse_offsets(text: str) -> list[PartitionRange]:
    """``"0:100-200,1:5-"`` -> ranges; an empty bound means earliest or current end."""
    ranges: list[PartitionRange] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        partition_text, _, span = part.partition(":")
        start_text, dash, end_text = span.partition("-")
        if not partition_text.isdigit() or (span and not dash and not start_text.isdigit()):
            raise ValueError(f"bad offset range {part!r}: expected PARTITION:START-END")
        ranges.append(
            PartitionRange(
                partition=int(partition_text),
                start=int(start_text) if start_text else None,
                end=int(end_text) if end_text else None,
            )
        )
    return ranges


#: Records per ``getmany``: a replay reads a long stretch of log sequentially.
FETCH_RECORDS = 20_000


#: The reader's retry backoff (aiokafka's default is 100 ms). A reader's first offset lookup
#: (``plan_partitions``) is for a topic its consumer has no metadata for yet: the lookup fails
#: as stale, asks for the topic's metadata and retries after one backoff, while the metadata
#: takes a round trip (1-3 ms on the local stack; the retry waits for it however long it takes).
#: With the default, every replay from Kafka stood still 100 ms before reading anything
#: (docs/perf/2026-12-07-replay-kafka-reader.md). What the shorter backoff costs: a failing
#: broker is retried five times as often.
READER_RETRY_BACKOFF_MS = 20


def make_reader_consumer(settings: KafkaSettings, client_id: str) -> AIOKafkaConsumer:
    """A consumer that cannot commit: no group id (``vigil.kafka.make_consumer`` never
    auto-commits and reads committed data only)."""
    return make_consumer(
        settings,
        group_id=None,
        client_id=client_id,
        max_poll_records=FETCH_RECORDS,
        retry_backoff_ms=READER_RETRY_BACKOFF_MS,
    )


async def topic_partitions(bootstrap_servers: str, topic: str) -> list[int]:
    """A topic's partition ids, from the cluster (a group-less consumer knows none until it
    is assigned some). Describing a topic is read-only."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="vigil-replay")
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for item in described:
        if item.get("topic") == topic and item.get("error_code") == 0:
            return sorted(int(p["partition"]) for p in item["partitions"])
    raise LookupError(f"topic {topic} does not exist")


async def plan_partitions(
    consumer: AIOKafkaConsumer,
    topic: str,
    *,
    bootstrap_servers: str,
    since: datetime | None,
    until: datetime | None,
    offsets: Sequence[PartitionRange] | None,
) -> dict[TopicPartition, tuple[int, int]]:
    """Resolve a time range or explicit offsets to ``{partition: (start, end)}``, end exclusive.

    The end is fixed now (the log end or the first record at/after ``until``), so a replay of a
    live topic finishes instead of following it.
    """
    partitions = await topic_partitions(bootstrap_servers, topic)
    tps = [TopicPartition(topic, p) for p in partitions]
    beginnings = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    plan: dict[TopicPartition, tuple[int, int]] = {}
    if offsets:
        for item in offsets:
            tp = TopicPartition(topic, item.partition)
            if tp not in ends:
                raise LookupError(f"{topic} has no partition {item.partition}")
            start = max(beginnings[tp], item.start if item.start is not None else 0)
            end = min(ends[tp], item.end if item.end is not None else ends[tp])
            plan[tp] = (start, max(start, end))
        return plan
    starts = dict(beginnings)
    if since is not None:
        found = await consumer.offsets_for_times({tp: _ms(since) for tp in tps})
        starts = {tp: (found[tp].offset if found[tp] is not None else ends[tp]) for tp in tps}
    stops = dict(ends)
    if until is not None:
        found = await consumer.offsets_for_times({tp: _ms(until) for tp in tps})
        stops = {tp: (found[tp].offset if found[tp] is not None else ends[tp]) for tp in tps}
    for tp in tps:
        plan[tp] = (starts[tp], max(starts[tp], stops[tp]))
    return plan


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


async def warmup_offsets(
    consumer: AIOKafkaConsumer,
    plan: dict[TopicPartition, tuple[int, int]],
    since: datetime | None,
) -> dict[TopicPartition, int]:
    """Where each partition's warm-up starts: the first record at/after ``since`` (record time),
    or with ``since`` None the partition's beginning, which is what the live engine started
    from. Only partitions whose window starts later than that are returned."""
    tps = list(plan)
    starts = dict(await consumer.beginning_offsets(tps))
    if since is not None:
        found = await consumer.offsets_for_times({tp: _ms(since) for tp in tps})
        starts = {
            tp: max(starts[tp], found[tp].offset if found[tp] is not None else plan[tp][0])
            for tp in tps
        }
    return {tp: starts[tp] for tp in tps if starts[tp] < plan[tp][0]}


@dataclass(frozen=True, slots=True)
class TruncatedStart:
    """A partition whose retained log starts later than the warm-up needed: retention (or a
    ``delete_records``) has removed its beginning, so the engine starts from an empty state at
    ``earliest_offset`` instead of the state the live engine had there."""

    partition: int
    earliest_offset: int
    # Record time of the earliest retained record (None when the partition holds none).
    earliest_time: datetime | None
    # Where the warm-up had to start: ``--warmup-since``, or None for the start of the record.
    needed_from: datetime | None

    def describe(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "earliest_offset": self.earliest_offset,
            "earliest_time": self.earliest_time.isoformat() if self.earliest_time else None,
            "needed_from": self.needed_from.isoformat() if self.needed_from else "start of record",
        }


def truncated_starts(
    read_from: Mapping[int, int],
    beginnings: Mapping[int, int],
    first_times: Mapping[int, datetime | None],
    needed_from: datetime | None,
) -> list[TruncatedStart]:
    """The partitions whose reading starts at a log beginning that retention has moved.

    ``read_from``: the offset each partition is read from (its warm-up start, or the window's
    start when there is no warm-up before it); ``beginnings``: each partition's earliest
    retained offset; ``first_times``: the record time of that earliest record. A log that was
    never trimmed begins at offset 0. One read from a later beginning lacks the records before
    it, unless the warm-up only needed records from ``needed_from`` on and the earliest
    retained record is no later than that. Pure, so the flagging is tested without a broker.
    """
    found: list[TruncatedStart] = []
    for partition in sorted(read_from):
        beginning = beginnings.get(partition, 0)
        if read_from[partition] > beginning or beginning == 0:
            continue  # read from later than the beginning, or nothing was ever deleted
        first = first_times.get(partition)
        if needed_from is not None and first is not None and first <= needed_from:
            continue
        found.append(TruncatedStart(partition, beginning, first, needed_from))
    return found


async def find_truncated_starts(
    consumer: AIOKafkaConsumer,
    plan: dict[TopicPartition, tuple[int, int]],
    warm_from: dict[TopicPartition, int] | None,
    needed_from: datetime | None,
) -> list[TruncatedStart]:
    """``truncated_starts`` for a planned read: asks the broker for each partition's earliest
    offset and, where that is above 0, the time of its earliest record (the first record at or
    after time 0)."""
    read_from = {tp: (warm_from or {}).get(tp, start) for tp, (start, _) in plan.items()}
    beginnings = await consumer.beginning_offsets(list(plan))
    trimmed = [tp for tp in plan if beginnings[tp] > 0 and read_from[tp] <= beginnings[tp]]
    first_times: dict[int, datetime | None] = {}
    if trimmed:
        found = await consumer.offsets_for_times({tp: 0 for tp in trimmed})
        for tp in trimmed:
            hit = found.get(tp)
            first_times[tp.partition] = (
                datetime.fromtimestamp(hit.timestamp / 1000, UTC) if hit is not None else None
            )
    return truncated_starts(
        {tp.partition: offset for tp, offset in read_from.items()},
        {tp.partition: offset for tp, offset in beginnings.items()},
        first_times,
        needed_from,
    )


Fetched = list[tuple[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]


async def read_ranges(
    consumer: AIOKafkaConsumer, plan: dict[TopicPartition, tuple[int, int]]
) -> AsyncIterator[Fetched]:
    """Every record of each planned ``[start, end)``, fetch by fetch, each partition in log
    order; a partition is paused once read to its end. The one loop every Kafka read here
    (telemetry, recorded alerts, the pinned config) goes through."""
    pending = {tp: span for tp, span in plan.items() if span[0] < span[1]}
    if not pending:
        return
    consumer.assign(list(pending))
    for tp, (start, _) in pending.items():
        consumer.seek(tp, start)
    while pending:
        fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=FETCH_RECORDS)
        out: Fetched = []
        for tp, records in fetched.items():
            end = pending[tp][1] if tp in pending else -1
            if records and records[-1].offset >= end:
                records = [r for r in records if r.offset < end]
            if records:
                out.append((tp, records))
        for tp in list(pending):
            if await consumer.position(tp) >= pending[tp][1]:
                del pending[tp]
                consumer.pause(tp)
        if pending:
            await let_next_fetch_go()
        if out:
            yield out


#: Turns of the event loop after each ``getmany``. Once a ``getmany`` has taken every record
#: the last fetch brought (it takes up to ``FETCH_RECORDS`` at a time), the consumer's
#: background fetcher sends its next request in the third turn (woken by the records being
#: taken, it plans the request, then its task writes it), so the broker reads and sends the
#: next fetch while this one is decoded and replayed. Without them the request left only when
#: the next ``getmany`` waited, and the replay stood still for each fetch's round trip (little
#: on the local stack, a network round trip or more where the broker is on another host).
FETCH_TURNS = 4


async def let_next_fetch_go() -> None:
    for _ in range(FETCH_TURNS):
        await asyncio.sleep(0)


async def read_kafka(
    consumer: AIOKafkaConsumer,
    plan: dict[TopicPartition, tuple[int, int]],
    selection: Selection,
    stats: ReadStats,
    *,
    decode: bool = True,
    context: bool = True,
    warmup_from: dict[TopicPartition, int] | None = None,
) -> AsyncIterator[Feed]:
    """Yield admitted telemetry until every planned end, each partition in log order.

    Partitions are not merged with one another: the rules service runs one engine per
    partition (see ``PinnedRules.lane_of``), so only the order within a partition decides
    anything. With ``context`` and a patient or device filter, the other records are decoded
    and passed on as context, so they move their engine's event time as they did live.
    ``warmup_from``: an earlier offset per partition to start reading at; what lies before the
    planned start is passed on as warm-up.
    """
    window = {tp: start for tp, (start, _) in plan.items()}
    reading = {
        tp: (min(start, (warmup_from or {}).get(tp, start)), end)
        for tp, (start, end) in plan.items()
    }
    filtered = selection.patient_ids is not None or selection.device_ids is not None
    keep_context = context and filtered and decode
    # Ingest keys records by patient: without context, a patient filter is decided on the key
    # before decoding.
    keys = (
        frozenset(p.encode() for p in selection.patient_ids)
        if selection.patient_ids is not None and not keep_context
        else None
    )
    # Every record replayed as read: a fetch becomes one run per partition.
    as_read = decode and not filtered
    async for fetched in read_ranges(consumer, reading):
        batch: Batch = []
        runs: list[PartitionRun] = []
        for tp, records in fetched:
            if records[0].offset < window[tp]:
                # Records are in offset order: the warm-up is a prefix of the fetch.
                cut = bisect_left(records, window[tp], key=_offset)
                batch += _decode_records(
                    records[:cut], selection, stats, keys, decode, keep_context, warm=True
                )
                records = records[cut:]
            if not records:
                continue
            run = _decode_run(records, stats) if as_read else None
            if run is not None:
                runs.append(run)
            else:
                batch += _decode_records(
                    records, selection, stats, keys, decode, keep_context, warm=False
                )
        if batch:
            yield batch
        for run in runs:
            yield run


def _offset(record: ConsumerRecord[bytes, bytes]) -> int:
    return int(record.offset)


_VALUE = attrgetter("value")
_OFFSET = attrgetter("offset")


def _decode_run(
    records: Sequence[ConsumerRecord[bytes, bytes]], stats: ReadStats
) -> PartitionRun | None:
    """One partition's records, all replayed, decoded in one pass (no test or tuple per record
    around the decoder); None when one of them is not a valid telemetry record
    (``_decode_records`` then decides them one by one, counting the rejected)."""
    try:
        # A record without a value (a tombstone) fails here too.
        events = list(map(decode_record, map(_VALUE, records)))
    except ValidationError:
        return None
    stats.read += len(records)
    stats.admitted += len(records)
    return PartitionRun(records[0].partition, events, list(map(_OFFSET, records)))


def _decode_records(
    records: Sequence[ConsumerRecord[bytes, bytes]],
    selection: Selection,
    stats: ReadStats,
    keys: frozenset[bytes] | None,
    decode: bool,
    keep_context: bool,
    *,
    warm: bool,
) -> Batch:
    decode_one = decode_record
    patients = selection.patient_ids
    devices = selection.device_ids
    source, context_source = (WARMUP, WARMUP_CONTEXT) if warm else ("kafka", CONTEXT)
    batch: Batch = []
    append = batch.append
    if warm:
        stats.warmup_read += len(records)
    else:
        stats.read += len(records)
    admitted = 0
    for record in records:
        if keys is not None and record.key not in keys:
            continue
        if not decode:
            admitted += 1
            continue
        try:
            event = decode_one(record.value or b"")
        except ValidationError:
            # The live rules dead-letter such a record; the replay counts it and goes on.
            if not warm:
                stats.rejected += 1
                stats.rejected_positions.append(("kafka", record.partition, record.offset))
            continue
        if (patients is not None and event.patient_id not in patients) or (
            devices is not None and event.device_id not in devices
        ):
            if keep_context:
                append((event, (context_source, record.partition, record.offset)))
            continue
        admitted += 1
        append((event, (source, record.partition, record.offset)))
    if not warm:
        stats.admitted += admitted
    return batch


#: The key under which the rules service writes each pinned config to its state topic.
CONFIG_KEY_PREFIX = "__config__/"


async def config_from_state_topic(
    consumer: AIOKafkaConsumer, bootstrap_servers: str, state_topic: str, version: str
) -> dict[str, Any]:
    """The record the live rules service pinned ``version`` with (what an alert's
    ``config_version`` names), read from partition 0 of its compacted state topic: the label,
    the content hash the config is stored under in PostgreSQL, its number of patient profiles
    and the config without them (``services.rules.service_layer.config_swap.config_record``);
    or, written before the config was stored in pieces, the whole RulesConfig JSON."""
    plan = await plan_partitions(
        consumer,
        state_topic,
        bootstrap_servers=bootstrap_servers,
        since=None,
        until=None,
        offsets=[PartitionRange(0)],
    )
    wanted = (CONFIG_KEY_PREFIX + version).encode()
    found: bytes | None = None
    async for fetched in read_ranges(consumer, plan):
        for _, records in fetched:
            for record in records:
                if record.key == wanted and record.value:
                    found = record.value  # the newest write of a key wins, as in compaction
    if found is None:
        raise LookupError(f"no rules config {version!r} in {state_topic}")
    value = json.loads(found)
    if not isinstance(value, dict):
        raise LookupError(f"rules config {version!r} in {state_topic} is not a JSON object")
    return value


def alert_from_json(raw: bytes) -> Alert | None:
    try:
        return Alert.model_validate_json(raw)
    except ValidationError:
        return None


# ---------------------------------------------------------------------------------------------
# PostgreSQL readings archive

# One row shape for all three tables: the fields of ``ArchivedObservation`` in its order, so
# that a row becomes one in a single C call (``ArchivedObservation(*row)``). A field the
# table's kind does not have is NULL, which the server sends and the client decodes for next
# to nothing (a constant would cost both a value per row). The client decodes every column of
# every row, so the flags arrive as the one boolean the rules use (a device clock ingest found
# far off: ``observation.CLOCK_SKEW_FLAGS``), and times as epoch seconds
# (float8): a ``timestamptz`` costs the client ~0.75 µs to decode into a datetime and the
# engine needs one only to build an alert; a float8 costs ~0.05 µs (server side ~0.2 µs).
# Epoch seconds order exactly as the times do (distinct microseconds stay distinct doubles).
# ``mid`` is the message id as text, the form the rules compare and report.
_SELECT = """
SELECT kind, patient_id, device_id, t, it, mid, skew,
       temperature_c, site, pump_state, rate_ml_h, volume_remaining_ml, bag_volume_ml,
       battery_pct, event, alarm FROM (
SELECT 0::int2 AS kind, patient_id, device_id,
       date_part('epoch', device_time) AS t, date_part('epoch', ingest_time) AS it,
       message_id::text AS mid,
       flags && ARRAY['device_clock_ahead', 'device_clock_behind', 'device_clock_skew'] AS skew,
       value_c AS temperature_c, site, NULL::text AS pump_state, NULL::float8 AS rate_ml_h,
       NULL::float8 AS volume_remaining_ml, NULL::float8 AS bag_volume_ml,
       NULL::float8 AS battery_pct, NULL::text AS event, NULL::text AS alarm, seq
FROM temperature_readings WHERE {where}
UNION ALL
SELECT 1::int2, patient_id, device_id,
       date_part('epoch', device_time), date_part('epoch', ingest_time),
       message_id::text,
       flags && ARRAY['device_clock_ahead', 'device_clock_behind', 'device_clock_skew'],
       NULL, NULL, state, rate_ml_h, volume_remaining_ml, bag_volume_ml, battery_pct,
       NULL, NULL, seq
FROM pump_status WHERE {where}
UNION ALL
SELECT 2::int2, patient_id, device_id,
       date_part('epoch', device_time), date_part('epoch', ingest_time),
       message_id::text,
       flags && ARRAY['device_clock_ahead', 'device_clock_behind', 'device_clock_skew'],
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, event, coalesce(alarm, ''), seq
FROM pump_events WHERE {where}
) AS archived
ORDER BY {order}
"""

# Text compared byte for byte whatever the database's collation: the same order on every
# server, and the one sealed days are merged in (``order_key``).
_ORDERS: dict[str, str] = {
    "device": 't, it, device_id COLLATE "C", seq, mid COLLATE "C"',
    "ingest": 'it, t, device_id COLLATE "C", seq, mid COLLATE "C"',
}

_TABLES = ("temperature_readings", "pump_status", "pump_events")


def selection_where(selection: Selection, *, after: int = 0) -> tuple[str, list[Any]]:
    """The SQL condition and its arguments selecting rows by patient, device and device time
    (the readings tables and the ``alerts`` table name these columns alike). ``after``: how
    many parameters the statement has before these (the first is then ``$after+1``)."""
    clauses: list[str] = []
    args: list[Any] = []
    if selection.patient_ids is not None:
        args.append(sorted(selection.patient_ids))
        clauses.append(f"patient_id = ANY(${after + len(args)}::text[])")
    if selection.device_ids is not None:
        args.append(sorted(selection.device_ids))
        clauses.append(f"device_id = ANY(${after + len(args)}::text[])")
    if selection.since is not None:
        args.append(selection.since)
        clauses.append(f"device_time >= ${after + len(args)}")
    if selection.until is not None:
        args.append(selection.until)
        clauses.append(f"device_time < ${after + len(args)}")
    where = " AND ".join(clauses) or "TRUE"
    return where, args


def archive_query(selection: Selection, order: ArchiveOrder) -> tuple[str, list[Any]]:
    """The SQL and its arguments for one selection (the same filter on each readings table)."""
    where, args = selection_where(selection)
    return _SELECT.format(where=where, order=_ORDERS[order]), args


def event_from_row(row: Sequence[Any]) -> ReplayEvent:
    """The event one archive row stands for (column order of ``_SELECT``); ingest stored the
    normalised values, so a row maps field for field."""
    return build_archived(*row)


def archive_reading(
    selection: Selection,
    context_patients: frozenset[str] | None,
    warmup: bool,
    warmup_since: datetime | None,
) -> Selection:
    """The rows an archive read of ``selection`` goes through (``read_archive``'s parameters):
    the selection's and its context patients' rows, from the warm-up's start."""
    return Selection(
        patient_ids=(
            (selection.patient_ids or frozenset()) | context_patients
            if context_patients
            else selection.patient_ids
        ),
        # Device filtering happens in the reader when there are lane mates to read as context.
        device_ids=None if context_patients else selection.device_ids,
        since=warmup_since if warmup and selection.since is not None else selection.since,
        until=selection.until,
    )


async def read_archive(
    conn: Any,
    selection: Selection,
    stats: ReadStats,
    *,
    order: ArchiveOrder = "device",
    batch_size: int = 20_000,
    decode: bool = True,
    context_patients: frozenset[str] | None = None,
    warmup: bool = False,
    warmup_since: datetime | None = None,
    snapshot: str | None = None,
    sealed: bool = True,
) -> AsyncIterator[Feed]:
    """Yield archive rows as replay events, in the chosen order, inside a read-only snapshot.

    ``context_patients``: other patients whose rows are read too and passed on as context
    (they shared the live engine with the selected ones). ``warmup``: with ``selection.since``,
    read from ``warmup_since`` (None: from each patient's first row) and pass the rows before
    ``since`` on as warm-up. ``conn`` is an asyncpg connection (asyncpg ships no types). The
    transaction is opened here and is READ ONLY: a bug that tried to write would fail, not
    write. The next batch is fetched while the caller replays this one, so the server's work
    overlaps the engine's. ``snapshot``: a snapshot another transaction exported
    (``pg_export_snapshot``), so the worker processes of one replay all read one instant.
    ``sealed``: read the sealed days of the selection's patients (``seal``) as such; False
    reads every row from the readings tables (the same events in the same order).
    """
    window_start = selection.since if warmup else None
    wanted = archive_reading(selection, context_patients, warmup, warmup_since)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # One round trip for the transaction's settings (a statement string without
        # arguments may hold several): the snapshot, which must come first; read-only; and a
        # ``work_mem`` that keeps each chunk's ORDER BY in memory, not in temporary files.
        settings = [
            "SET TRANSACTION READ ONLY",
            f"SET LOCAL work_mem = '{ARCHIVE_WORK_MEM}'",
        ]
        if snapshot is not None:
            if not _SNAPSHOT_ID.fullmatch(snapshot):
                raise ValueError(f"not a snapshot id: {snapshot!r}")
            settings.insert(0, f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        await conn.execute("; ".join(settings))
        fetch = await _chunked_fetch(conn, wanted, order, batch_size, sealed)
        ahead: asyncio.Future[tuple[list[Any], int | None]] = asyncio.ensure_future(fetch())
        try:
            while True:
                rows, sealed_events = await ahead
                if not rows:
                    break
                ahead = asyncio.ensure_future(fetch())
                await asyncio.sleep(0)  # let the next fetch go out before this batch is replayed
                if not decode:
                    stats.read += len(rows)
                    stats.admitted += len(rows)
                    continue
                yield _archive_batch(
                    rows,
                    selection,
                    stats,
                    bool(context_patients),
                    window_start,
                    order == "device",
                    sealed_events,
                )
        finally:
            if not ahead.done():
                ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ahead


#: About how many rows one archive query sorts (see ``_chunked_fetch``), and the device-time
#: span of the first query, before the reader knows how dense the selection is.
ARCHIVE_CHUNK_ROWS = 200_000
ARCHIVE_FIRST_SPAN = timedelta(days=1)
_MIN_SPAN = timedelta(minutes=1)

# The first and last device time of a selection that names its patients: per patient and
# table, the two ends of its (patient_id, device_time) index (two index probes, not a pass over
# the patient's rows). With a device filter the index ends may not be the device's rows, so
# those rows are aggregated (``_BOUNDS_SCAN``).
_BOUNDS = """
SELECT min(lo), max(hi) FROM unnest($1::text[]) AS p(pid) CROSS JOIN LATERAL (
    SELECT min(device_time) AS lo, max(device_time) AS hi FROM temperature_readings
    WHERE patient_id = p.pid AND {where}
    UNION ALL
    SELECT min(device_time), max(device_time) FROM pump_status WHERE patient_id = p.pid AND {where}
    UNION ALL
    SELECT min(device_time), max(device_time) FROM pump_events WHERE patient_id = p.pid AND {where}
) AS bounds
"""
_BOUNDS_SCAN = """
SELECT min(lo), max(hi) FROM (
    SELECT min(device_time) AS lo, max(device_time) AS hi FROM temperature_readings WHERE {where}
    UNION ALL
    SELECT min(device_time), max(device_time) FROM pump_status WHERE {where}
    UNION ALL
    SELECT min(device_time), max(device_time) FROM pump_events WHERE {where}
) AS bounds
"""


async def _bounds(conn: Any, wanted: Selection) -> tuple[datetime | None, datetime | None]:
    """The first and last device time of the rows of ``wanted`` (its patients named); None,
    None when it has none."""
    assert wanted.patient_ids is not None
    if wanted.device_ids is not None:
        where, args = selection_where(wanted)
        lo, hi = await conn.fetchrow(_BOUNDS_SCAN.format(where=where), *args)
        return lo, hi
    where, args = selection_where(replace(wanted, patient_ids=None), after=1)
    lo, hi = await conn.fetchrow(_BOUNDS.format(where=where), sorted(wanted.patient_ids), *args)
    return lo, hi


def next_span(span: timedelta, rows: int, target: int) -> timedelta:
    """The device-time span of the next archive chunk: the one that would have held about
    ``target`` rows at the density just read (the same after an empty chunk, whose gap the
    reader skips)."""
    if rows <= 0:
        return span
    return max(_MIN_SPAN, span * (target / rows))


async def _chunked_fetch(
    conn: Any, wanted: Selection, order: ArchiveOrder, batch_size: int, sealed: bool = True
) -> Callable[[], Awaitable[tuple[list[Any], int | None]]]:
    """A function returning the next batch of ``wanted`` in ``order`` ([] at the end), with
    None for a batch of rows, or for a batch of events already built (from sealed days) how
    many of them were read from sealed days.

    In device order the selection is read in consecutive device-time chunks, one query each,
    sized to about ``ARCHIVE_CHUNK_ROWS`` rows: the server sorts one chunk at a time, in
    memory, and the first rows arrive after one chunk's sort, not the whole selection's (an
    archive of a fleet over a year would otherwise be sorted to disk before the first row).
    The chunks are cut at device-time boundaries, so their rows concatenate to the same order
    as one query. The next chunk's query is issued as soon as one ends, so its sort overlaps
    the caller's work on the last batch. Chunks need the patients named: the index a chunk's
    device-time range is read through is (patient_id, device_time). A selection of every
    patient, and ingest order (no index on ingest time), are read in one query. Runs in the
    caller's transaction.

    With ``sealed``, the days every selected patient has sealed come first, read as sealed
    days (``_sealed_fetch``); the rows after them as above."""
    if order != "device" or wanted.patient_ids is None:
        sql, args = archive_query(wanted, order)
        cursor = await conn.cursor(sql, *args)

        async def whole() -> tuple[list[Any], int | None]:
            return list(await cursor.fetch(batch_size)), None

        return whole

    lo, hi = await _bounds(conn, wanted)
    target = ARCHIVE_CHUNK_ROWS
    state: dict[str, Any] = {"lo": lo, "span": ARCHIVE_FIRST_SPAN, "cursor": None, "rows": 0}
    sealed_part = None
    if sealed and lo is not None and hi is not None and wanted.device_ids is None:
        sealed_part = await _sealed_fetch(conn, wanted, lo, hi)
        if sealed_part is not None:
            read_sealed, sealed_end = sealed_part
            state["lo"] = max(lo, sealed_end)

    async def rows_fetch() -> list[Any]:
        while True:
            if state["cursor"] is None:
                start = state["lo"]
                if start is None or start > hi:
                    return []
                end = start + state["span"]
                # The last chunk keeps the selection's own upper bound (or none).
                chunk = replace(wanted, since=start, until=end if end <= hi else wanted.until)
                sql, chunk_args = archive_query(chunk, "device")
                state["cursor"] = await conn.cursor(sql, *chunk_args)
                state["end"] = end
                state["rows"] = 0
            rows = list(await state["cursor"].fetch(batch_size))
            state["rows"] += len(rows)
            if len(rows) < batch_size:  # this chunk is read
                state["cursor"] = None
                state["span"] = next_span(state["span"], state["rows"], target)
                state["lo"] = state["end"]
                if state["rows"] == 0:
                    # A gap in the record: the next chunk starts at the next row.
                    state["lo"] = (await _bounds(conn, replace(wanted, since=state["end"])))[0]
                if not rows:
                    continue
            return rows

    async def fetch() -> tuple[list[Any], int | None]:
        if sealed_part is not None and not state.get("sealed_done"):
            events, from_bodies = await read_sealed()
            if events:
                return events, from_bodies
            state["sealed_done"] = True
        return await rows_fetch(), None

    return fetch


# ---------------------------------------------------------------------------------------------
# Sealed days (``seal``, migration 0011): a patient's rows of one finished UTC day as one value.

#: The advisory lock class of sealing: a seal takes its exclusive form per patient
#: (``hashtext(patient_id)``), 0011's triggers its shared form.
SEAL_LOCK = 1447642945
#: The layout of the sealed days this code writes and reads (``archive_days.format``): the
#: order keys and the ``ArchivedObservation`` arrays. A day of another layout reads as stale.
SEALED_FORMAT = 1
#: About how many events one batch of sealed days holds (after a first batch of one day).
ARCHIVE_SEALED_ROWS = 50_000
_DAY_S = 86_400
_EPOCH_DAY = date(1970, 1, 1).toordinal()


def day_of(t: float) -> date:
    """The UTC day of POSIX seconds ``t`` (a stored microsecond never rounds across midnight:
    a double holds today's epoch seconds to within a tenth of one)."""
    return date.fromordinal(_EPOCH_DAY + int(t // _DAY_S))


def day_start(day: date) -> datetime:
    """The first instant of a UTC day."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


_PAIR = struct.Struct(">QQ").pack
_DOUBLE = struct.Struct(">d").pack
_BITS = struct.Struct(">Q").unpack
_SIGN = 1 << 63
_ALL = (1 << 64) - 1


def _ordered_bits(x: float) -> int:
    """A double's bits as an unsigned integer that orders as the doubles do."""
    bits: int = _BITS(_DOUBLE(x))[0]
    return bits ^ _ALL if bits & _SIGN else bits | _SIGN


def order_key(event: ReplayEvent) -> bytes:
    """An archived event's place in the archive's device order, as bytes that compare as the
    order's first three keys do (device time, ingest time, device id byte for byte; see
    ``_merge_sealed`` for why three are enough)."""
    return _PAIR(_ordered_bits(event.t), _ordered_bits(event.ingest_t)) + event.device_id.encode()


def encode_day(rows: Iterable[Sequence[Any]]) -> bytes:
    """Archive rows (``archive_query``'s columns, in its device order) as a sealed day's body:
    their order keys and the rows."""
    events = [build_archived(*row) for row in rows]
    return encode_sealed_day((list(map(order_key, events)), events))


def _merge_sealed(keys: list[bytes], events: list[Any]) -> list[Any]:
    """Sealed days' events (each day's body one patient's, in the archive's device order;
    a stale day's all patients', from the server in that order) in the archive's device order.

    Sorted stably on the order key: the order's first three keys. Rows that tie on all three
    keep their order, which is the whole order as long as they come from one body or one
    stale day. They do: ingest stamps one ingest time on a batch and binds each reading of a
    device to one patient for its device time within it, so such rows are one patient's, of one
    day. Sorting indexes on the keys (bytes, compared in C) costs a third of sorting the events
    on a tuple of their attributes."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return list(map(events.__getitem__, order))


_T = attrgetter("t")

_SEALED_PLAN = """
SELECT (SELECT count(*) FROM archive_seal WHERE patient_id = ANY($1::text[])),
       (SELECT min(sealed_until) FROM archive_seal WHERE patient_id = ANY($1::text[])),
       ARRAY(SELECT DISTINCT day FROM archive_days
             WHERE patient_id = ANY($1::text[]) AND (body IS NULL OR format <> $2)
             ORDER BY day)
"""
_SEALED_DAYS = """
SELECT body FROM archive_days
WHERE patient_id = ANY($1::text[]) AND day >= $2 AND day < $3 AND format = $5
  AND day <> ALL($4::date[])
ORDER BY day, patient_id
"""


async def _sealed_fetch(
    conn: Any, wanted: Selection, lo: datetime, hi: datetime
) -> tuple[Callable[[], Awaitable[tuple[list[Any], int]]], datetime] | None:
    """For a selection whose every patient has sealed days (and no device filter): a function
    returning the next batch of its events from the sealed days between ``lo`` and ``hi``
    (its first and last rows), in the archive's device order ([] at the end), with how many
    of them came from sealed days' bodies; and the instant the sealed days end at. None when
    no day of the range is sealed for every patient.

    A day some selected patient has stale is read from the readings tables, for every selected
    patient (so that each day comes from one source). Batches grow from one day to about
    ``ARCHIVE_SEALED_ROWS`` events."""
    assert wanted.patient_ids is not None
    patients = sorted(wanted.patient_ids)
    count, horizon, stale_days = await conn.fetchrow(_SEALED_PLAN, patients, SEALED_FORMAT)
    if count < len(patients) or horizon is None:
        return None
    first = day_of(lo.timestamp())
    end = min(day_of(horizon.timestamp()), day_of(hi.timestamp()) + timedelta(days=1))
    if end <= first:
        return None
    stale = sorted(day for day in stale_days if first <= day < end)
    since_t = wanted.since.timestamp() if wanted.since is not None else None
    until_t = wanted.until.timestamp() if wanted.until is not None else None
    next_day, span_days = first, 1

    async def fetch() -> tuple[list[Any], int]:
        nonlocal next_day, span_days
        while next_day < end:
            day = next_day
            stop = min(end, day + timedelta(days=span_days))
            keys: list[bytes] = []
            events: list[Any] = []
            from_rows = 0
            for (body,) in await conn.fetch(
                _SEALED_DAYS, patients, day, stop, stale, SEALED_FORMAT
            ):
                day_keys, day_events = decode_sealed_day(body)
                keys += day_keys
                events += day_events
            for stale_day in stale:
                if day <= stale_day < stop:
                    since, until = day_start(stale_day), day_start(stale_day + timedelta(days=1))
                    part = replace(
                        wanted,
                        since=max(since, wanted.since) if wanted.since is not None else since,
                        until=min(until, wanted.until) if wanted.until is not None else until,
                    )
                    sql, args = archive_query(part, "device")
                    read = list(starmap(build_archived, await conn.fetch(sql, *args)))
                    keys += map(order_key, read)
                    events += read
                    from_rows += len(read)
            done = (stop - day).days
            next_day = stop
            span_days = (
                max(1, round(done * ARCHIVE_SEALED_ROWS / len(events))) if events else done * 2
            )
            if not events:
                continue
            events = _merge_sealed(keys, events)
            # The selection's bounds cut its first and last day.
            if since_t is not None and events[0].t < since_t:
                del events[: bisect_left(events, since_t, key=_T)]
            if until_t is not None and events and events[-1].t >= until_t:
                del events[bisect_left(events, until_t, key=_T) :]
            if events:
                # The bounds cut sealed days only: a stale day is read within them.
                return events, len(events) - from_rows
        return [], 0

    return fetch, day_start(end)


#: The position of an archive event replayed as read, the common case: the row's real position
#: is made from the event only when it decides something (``archive_position``), so a row in
#: the fast path costs no tuple of its own.
ARCHIVED: Position = ("pg", None, None)

_TABLE_OF_CHANNEL = {
    CHANNEL_TEMPERATURE: "temperature_readings",
    CHANNEL_PUMP_STATUS: "pump_status",
    CHANNEL_PUMP_EVENT: "pump_events",
}


def archive_position(event: ReplayEvent, source: str = "pg") -> Position:
    """An archive event's position: its table and its message id."""
    return (source, _TABLE_OF_CHANNEL[event.channel], event.message_id)


def _archive_batch(
    rows: Sequence[Any],
    selection: Selection,
    stats: ReadStats,
    with_context: bool,
    window_start: datetime | None,
    by_device_time: bool,
    sealed: int | None = None,
) -> Feed:
    """Rows -> events, each marked replayed, context, warm-up or warm-up context;
    ``by_device_time``: the rows are in device-time order; ``sealed``: None for rows; for events
    already built (read through sealed days), how many came from sealed days' bodies."""
    built = sealed is not None
    convert = build_archived
    start_t = window_start.timestamp() if window_start is not None else None
    if start_t is None and not with_context:
        # The common case (every row is replayed): built in C, the record class called by a C
        # loop once per row.
        stats.read += len(rows)
        stats.admitted += len(rows)
        stats.sealed += sealed or 0
        as_read = AsReadByDeviceTime if by_device_time else AsRead
        return as_read(rows if built else starmap(convert, rows))
    batch: Batch = []
    append = batch.append
    admits = selection.admits
    admitted = read = warm = 0
    for row in rows:
        event = row if built else convert(*row)
        before = start_t is not None and event.t < start_t
        if before:
            warm += 1
        else:
            read += 1
        if with_context and not admits(event):
            append((event, archive_position(event, WARMUP_CONTEXT if before else CONTEXT)))
            continue
        if before:
            append((event, archive_position(event, WARMUP)))
            continue
        admitted += 1
        append((event, ARCHIVED))
    stats.read += read
    stats.warmup_read += warm
    stats.admitted += admitted
    stats.sealed += sealed or 0
    return batch


#: The sort memory of a replay's archive transaction (the server default, 4 MB, sends a few
#: hundred thousand rows to temporary files).
ARCHIVE_WORK_MEM = "64MB"

_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")

# Every patient with rows in one readings table: a loose index scan, one index probe per
# patient, not a pass over every row.
_PATIENTS_OF = """
WITH RECURSIVE p AS (
    (SELECT patient_id FROM {table} ORDER BY patient_id LIMIT 1)
    UNION ALL
    SELECT (SELECT patient_id FROM {table} WHERE patient_id > p.patient_id
            ORDER BY patient_id LIMIT 1)
    FROM p WHERE p.patient_id IS NOT NULL
)
SELECT patient_id FROM p WHERE patient_id IS NOT NULL
"""


async def archive_patients(conn: Any) -> frozenset[str]:
    """Every patient the readings archive holds rows of, in the caller's transaction (so a
    replay splitting the archive by patient sees the rows its workers will read)."""
    found: set[str] = set()
    for table in _TABLES:
        rows = await conn.fetch(_PATIENTS_OF.format(table=table))
        found.update(str(row[0]) for row in rows)
    return frozenset(found)


async def registered_patients(conn: Any) -> list[str]:
    async with conn.transaction(readonly=True):
        rows = await conn.fetch("SELECT patient_id FROM patients ORDER BY patient_id")
    return [str(r["patient_id"]) for r in rows]


async def count_archive(conn: Any, selection: Selection) -> int:
    """How many rows a selection covers (for the progress bar), in its own read-only snapshot."""
    sql, args = archive_query(selection, "device")
    count_sql = "SELECT count(*) FROM (" + sql.rsplit("ORDER BY", 1)[0] + ") AS selected"
    async with conn.transaction(readonly=True):
        return int(await conn.fetchval(count_sql, *args))


async def patients_of_care_team(conn: Any, care_team_id: str) -> frozenset[str]:
    """The care team's patients today (the registry keeps no history of team assignments)."""
    async with conn.transaction(readonly=True):
        rows = await conn.fetch(
            "SELECT patient_id FROM patients WHERE care_team_id = $1", care_team_id
        )
    return frozenset(str(r["patient_id"]) for r in rows)


# ---------------------------------------------------------------------------------------------
# Alerts recorded at the time


async def recorded_alerts_from_table(conn: Any, selection: Selection) -> list[Alert]:
    """The alerts notify recorded in the ``alerts`` table for the selection, by device time."""
    where, args = selection_where(selection)
    sql = (
        "SELECT alert_id, dedup_key, patient_id, device_id, kind, code, priority, phase, state,"
        " title, device_time, ingest_time, evidence::text AS evidence, rule_id, rule_version"
        f" FROM alerts WHERE {where} ORDER BY device_time, alert_id"
    )
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(sql, *args)
    return [
        Alert.model_validate({**dict(row), "evidence": json.loads(row["evidence"])}) for row in rows
    ]


async def recorded_alerts_from_topic(
    consumer: AIOKafkaConsumer,
    topic: str,
    selection: Selection,
    *,
    bootstrap_servers: str,
    since: datetime | None,
    until: datetime | None,
) -> list[Alert]:
    """The alerts the live rules published, read from the alerts topic without a group."""
    plan = await plan_partitions(
        consumer,
        topic,
        bootstrap_servers=bootstrap_servers,
        since=since,
        until=until,
        offsets=None,
    )
    alerts: list[Alert] = []
    async for fetched in read_ranges(consumer, plan):
        for _, records in fetched:
            for record in records:
                alert = alert_from_json(record.value or b"")
                if alert is None:
                    continue
                if selection.patient_ids is not None and alert.patient_id not in (
                    selection.patient_ids
                ):
                    continue
                if selection.device_ids is not None and alert.device_id not in (
                    selection.device_ids
                ):
                    continue
                alerts.append(alert)
    alerts.sort(key=lambda a: (a.device_time, str(a.alert_id)))
    return alerts


def dedupe_alerts(alerts: Iterable[Alert]) -> list[Alert]:
    """One alert per alert id (a redelivered alert is one decision), in first-seen order."""
    seen: set[Any] = set()
    unique: list[Alert] = []
    for alert in alerts:
        if alert.alert_id not in seen:
            seen.add(alert.alert_id)
            unique.append(alert)
    return unique


__all__ = [
    "ARCHIVED",
    "TELEMETRY_TOPIC",
    "ArchiveOrder",
    "AsRead",
    "AsReadByDeviceTime",
    "Batch",
    "Feed",
    "PartitionRange",
    "PartitionRun",
    "Position",
    "ReadStats",
    "Selection",
    "TruncatedStart",
    "archive_patients",
    "archive_position",
    "archive_query",
    "archive_reading",
    "count_archive",
    "event_from_row",
    "make_reader_consumer",
    "parse_offsets",
    "patients_of_care_team",
    "plan_partitions",
    "read_archive",
    "read_kafka",
    "recorded_alerts_from_table",
    "recorded_alerts_from_topic",
    "truncated_starts",
]
