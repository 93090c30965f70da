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
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from schemas.events import Alert, Telemetry
from schemas.kafka_topics import TELEMETRY_TOPIC
from schemas.topics import topic_for
from vigil.settings import KafkaSettings

#: Where a replayed event came from: ("kafka", partition, offset) or ("pg", table, row number).
Position = tuple[str, Any, int]
#: None instead of a position marks context: an event read but not replayed (see runner).
Batch = list[tuple[Telemetry, Position | None]]

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

    def admits(self, event: Telemetry) -> bool:
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


def make_reader_consumer(settings: KafkaSettings, client_id: str) -> AIOKafkaConsumer:
    """A consumer that cannot commit: no group id, no auto-commit, committed data only."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id_prefix}-{client_id}",
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # Large fetches: a replay reads a long stretch of log sequentially.
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        max_poll_records=20_000,
    )


async def plan_partitions(
    consumer: AIOKafkaConsumer,
    topic: str,
    *,
    since: datetime | None,
    until: datetime | None,
    offsets: Sequence[PartitionRange] | None,
) -> dict[TopicPartition, tuple[int, int]]:
    """Resolve a time range or explicit offsets to ``{partition: (start, end)}``, end exclusive.

    The end is fixed now (the log end or the first record at/after ``until``), so a replay of a
    live topic finishes instead of following it.
    """
    await consumer.topics()  # forces a metadata fetch
    partitions = sorted(consumer.partitions_for_topic(topic) or ())
    if not partitions:
        raise LookupError(f"topic {topic} has no partitions (does it exist?)")
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


async def read_kafka(
    consumer: AIOKafkaConsumer,
    plan: dict[TopicPartition, tuple[int, int]],
    selection: Selection,
    stats: ReadStats,
    *,
    decode: bool = True,
    context: bool = True,
) -> AsyncIterator[Batch]:
    """Yield admitted telemetry until every planned end, partitions merged by record time.

    Within a partition the order is the log's. Across partitions records are merged by their
    timestamp (when ingest produced them): the live rules consumed all partitions side by side,
    and one engine's event-time timers depend on that interleaving, so a replay must not run
    one partition days ahead of another. With ``context`` and a patient or device filter, the
    other records are decoded and passed on without a position, so they move event time as
    they did live (see ``Replay.feed``).
    """
    pending = {tp: span for tp, span in plan.items() if span[0] < span[1]}
    if not pending:
        return
    consumer.assign(list(pending))
    for tp, (start, _) in pending.items():
        consumer.seek(tp, start)
    filtered = selection.patient_ids is not None or selection.device_ids is not None
    keep_context = context and filtered and decode
    # Ingest keys records by patient: without context, a patient filter is decided on the key
    # before decoding.
    keys = (
        frozenset(p.encode() for p in selection.patient_ids)
        if selection.patient_ids is not None and not keep_context
        else None
    )
    buffers: dict[TopicPartition, deque[ConsumerRecord[bytes, bytes]]] = {
        tp: deque() for tp in pending
    }
    while pending or any(buffers.values()):
        hungry = [tp for tp in pending if not buffers[tp]]
        if hungry:
            fetched = await consumer.getmany(*hungry, timeout_ms=1000, max_records=20_000)
            for tp, records in fetched.items():
                end = pending[tp][1] if tp in pending else -1
                buffers[tp].extend(r for r in records if r.offset < end)
            for tp in hungry:
                if await consumer.position(tp) >= pending[tp][1]:
                    del pending[tp]
                    consumer.pause(tp)
            if any(not buffers[tp] for tp in pending):
                continue
        # Everything up to the earliest newest-buffered time of a partition still being read
        # can be merged now: no record yet to come can sort before it.
        limit = min((buffers[tp][-1].timestamp for tp in pending), default=None)
        chunks: list[list[ConsumerRecord[bytes, bytes]]] = []
        for buffer in buffers.values():
            chunk: list[ConsumerRecord[bytes, bytes]] = []
            while buffer and (limit is None or buffer[0].timestamp <= limit):
                chunk.append(buffer.popleft())
            chunks.append(chunk)
        merged = heapq.merge(*chunks, key=lambda r: (r.timestamp, r.partition, r.offset))
        batch = _decode_records(merged, selection, stats, keys, decode, keep_context)
        if batch:
            yield batch


def _decode_records(
    records: Iterable[ConsumerRecord[bytes, bytes]],
    selection: Selection,
    stats: ReadStats,
    keys: frozenset[bytes] | None,
    decode: bool,
    keep_context: bool,
) -> Batch:
    validate = Telemetry.model_validate_json
    patients = selection.patient_ids
    devices = selection.device_ids
    batch: Batch = []
    for record in records:
        stats.read += 1
        if keys is not None and record.key not in keys:
            continue
        if not decode:
            stats.admitted += 1
            continue
        try:
            event = validate(record.value or b"")
        except ValidationError:
            # The live rules dead-letter such a record; the replay counts it and goes on.
            stats.rejected += 1
            stats.rejected_positions.append(("kafka", record.partition, record.offset))
            continue
        if (patients is not None and event.patient_id not in patients) or (
            devices is not None and event.device_id not in devices
        ):
            if keep_context:
                batch.append((event, None))
            continue
        stats.admitted += 1
        batch.append((event, ("kafka", record.partition, record.offset)))
    return batch


def alert_from_json(raw: bytes) -> Alert | None:
    try:
        return Alert.model_validate_json(raw)
    except ValidationError:
        return None


# ---------------------------------------------------------------------------------------------
# PostgreSQL readings archive

_SELECT = """
SELECT 0 AS kind, device_time, ingest_time, patient_id, device_id, message_id, seq, flags,
       value_c, original_value, original_unit, site,
       NULL::text AS state, NULL::float8 AS rate_ml_h, NULL::float8 AS volume_remaining_ml,
       NULL::float8 AS bag_volume_ml, NULL::float8 AS battery_pct,
       NULL::text AS event, NULL::text AS alarm, NULL::text AS detail
FROM temperature_readings WHERE {where}
UNION ALL
SELECT 1, device_time, ingest_time, patient_id, device_id, message_id, seq, flags,
       NULL, NULL, NULL, NULL,
       state, rate_ml_h, volume_remaining_ml, bag_volume_ml, battery_pct,
       NULL, NULL, NULL
FROM pump_status WHERE {where}
UNION ALL
SELECT 2, device_time, ingest_time, patient_id, device_id, message_id, seq, flags,
       NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL,
       event, alarm, detail
FROM pump_events WHERE {where}
ORDER BY {order}
"""

_ORDERS: dict[str, str] = {
    "device": "device_time, ingest_time, device_id, seq, message_id",
    "ingest": "ingest_time, device_time, device_id, seq, message_id",
}

_TABLES = ("temperature_readings", "pump_status", "pump_events")
_CHANNELS = ("temperature", "pump-status", "pump-event")
# Indexed by the ``kind`` column of the query: the table a row came from.
_SCHEMAS = (
    "vigil.device.temperature.v1",
    "vigil.device.pump_status.v1",
    "vigil.device.pump_event.v1",
)


def archive_query(selection: Selection, order: ArchiveOrder) -> tuple[str, list[Any]]:
    """The SQL and its arguments for one selection (the same filter on each readings table)."""
    clauses: list[str] = []
    args: list[Any] = []
    if selection.patient_ids is not None:
        args.append(sorted(selection.patient_ids))
        clauses.append(f"patient_id = ANY(${len(args)}::text[])")
    if selection.device_ids is not None:
        args.append(sorted(selection.device_ids))
        clauses.append(f"device_id = ANY(${len(args)}::text[])")
    if selection.since is not None:
        args.append(selection.since)
        clauses.append(f"device_time >= ${len(args)}")
    if selection.until is not None:
        args.append(selection.until)
        clauses.append(f"device_time < ${len(args)}")
    where = " AND ".join(clauses) or "TRUE"
    return _SELECT.format(where=where, order=_ORDERS[order]), args


def telemetry_from_row(row: Sequence[Any]) -> Telemetry:
    """Rebuild the Telemetry ingest published from one archive row (column order of _SELECT)."""
    kind = row[0]
    device_id = row[4]
    common = {
        "schema": _SCHEMAS[kind],
        "message_id": row[5],
        "device_id": device_id,
        "seq": row[6],
        "device_time": row[1],
    }
    temperature_c = None
    if kind == 0:
        message: dict[str, Any] = {**common, "value": row[9], "unit": row[10], "site": row[11]}
        temperature_c = row[8]
    elif kind == 1:
        message = {
            **common,
            "state": row[12],
            "rate_ml_h": row[13],
            "volume_remaining_ml": row[14],
            "bag_volume_ml": row[15],
            "battery_pct": row[16],
        }
    else:
        message = {**common, "event": row[17], "alarm": row[18], "detail": row[19]}
    return Telemetry.model_validate(
        {
            "patient_id": row[3],
            "device_id": device_id,
            "mqtt_topic": topic_for(device_id, _CHANNELS[kind]),
            "ingest_time": row[2],
            "message": message,
            "temperature_c": temperature_c,
            "flags": tuple(row[7] or ()),
        }
    )


async def read_archive(
    conn: Any,
    selection: Selection,
    stats: ReadStats,
    *,
    order: ArchiveOrder = "device",
    batch_size: int = 20_000,
    decode: bool = True,
) -> AsyncIterator[Batch]:
    """Yield archive rows as Telemetry, in the chosen order, inside a read-only snapshot.

    ``conn`` is an asyncpg connection (asyncpg ships no types). The transaction is opened here
    and is READ ONLY: a bug that tried to write would fail, not write.
    """
    sql, args = archive_query(selection, order)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute("SET TRANSACTION READ ONLY")
        cursor = await conn.cursor(sql, *args)
        number = 0
        while True:
            rows = await cursor.fetch(batch_size)
            if not rows:
                break
            stats.read += len(rows)
            if not decode:
                stats.admitted += len(rows)
                continue
            batch: Batch = []
            for row in rows:
                number += 1
                try:
                    event = telemetry_from_row(row)
                except ValidationError:
                    stats.rejected += 1
                    stats.rejected_positions.append(("pg", _TABLES[row[0]], number))
                    continue
                batch.append((event, ("pg", _TABLES[row[0]], number)))
            stats.admitted += len(batch)
            yield batch


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
    clauses: list[str] = []
    args: list[Any] = []
    if selection.patient_ids is not None:
        args.append(sorted(selection.patient_ids))
        clauses.append(f"patient_id = ANY(${len(args)}::text[])")
    if selection.device_ids is not None:
        args.append(sorted(selection.device_ids))
        clauses.append(f"device_id = ANY(${len(args)}::text[])")
    if selection.since is not None:
        args.append(selection.since)
        clauses.append(f"device_time >= ${len(args)}")
    if selection.until is not None:
        args.append(selection.until)
        clauses.append(f"device_time < ${len(args)}")
    where = " AND ".join(clauses) or "TRUE"
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
    since: datetime | None,
    until: datetime | None,
) -> list[Alert]:
    """The alerts the live rules published, read from the alerts topic without a group."""
    plan = await plan_partitions(consumer, topic, since=since, until=until, offsets=None)
    pending = {tp: span for tp, span in plan.items() if span[0] < span[1]}
    alerts: list[Alert] = []
    if not pending:
        return alerts
    consumer.assign(list(pending))
    for tp, (start, _) in pending.items():
        consumer.seek(tp, start)
    while pending:
        fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=10_000)
        for tp, records in fetched.items():
            end = pending.get(tp, (0, -1))[1]
            for record in records:
                if record.offset >= end:
                    break
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
        for tp in list(pending):
            if await consumer.position(tp) >= pending[tp][1]:
                del pending[tp]
                consumer.pause(tp)
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
    "TELEMETRY_TOPIC",
    "ArchiveOrder",
    "Batch",
    "PartitionRange",
    "Position",
    "ReadStats",
    "Selection",
    "archive_query",
    "count_archive",
    "make_reader_consumer",
    "parse_offsets",
    "patients_of_care_team",
    "plan_partitions",
    "read_archive",
    "read_kafka",
    "recorded_alerts_from_table",
    "recorded_alerts_from_topic",
    "telemetry_from_row",
]
