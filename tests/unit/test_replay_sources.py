"""Pure parts of the readers: offset ranges, the archive query, archive rows to engine input."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from schemas.device import PumpEvent, PumpStatus, TemperatureReading
from schemas.events import Telemetry
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import ArchivedObservation
from vigil_tools.replay.engine_port import (
    CHANNEL_PUMP_EVENT,
    CHANNEL_PUMP_STATUS,
    CHANNEL_TEMPERATURE,
    ReplayEvent,
    build_archived,
    decode_record,
    from_telemetry,
)
from vigil_tools.replay.sources import (
    AsRead,
    AsReadByDeviceTime,
    PartitionRange,
    PartitionRun,
    ReadStats,
    Selection,
    _archive_batch,
    archive_query,
    archive_reading,
    event_from_row,
    next_span,
    parse_offsets,
    read_kafka,
)
from vigil_tools.replay.synthetic import course

START = datetime(2026, 3, 1, tzinfo=UTC)


def test_offset_ranges_parse_with_open_ends() -> None:
    """'0:100-200,1:5-,2:-9' names exact, open-ended and from-the-start ranges."""
    assert parse_offsets("0:100-200,1:5-,2:-9") == [
        PartitionRange(0, 100, 200),
        PartitionRange(1, 5, None),
        PartitionRange(2, None, 9),
    ]


@pytest.mark.parametrize("text", ["x:1-2", "0:abc", "0:1-x"])
def test_malformed_offset_ranges_are_refused(text: str) -> None:
    """A typo in an offset range is an error, not a replay of something else."""
    with pytest.raises(ValueError):
        parse_offsets(text)


def test_archive_query_filters_each_table_and_orders_with_a_stable_tie_break() -> None:
    """One filter, applied to all three readings tables, bound as parameters; device order
    breaks ties by ingest time, device, sequence number and message id (text byte for byte,
    whatever the database's collation)."""
    selection = Selection(
        patient_ids=frozenset({"P-2", "P-1"}),
        device_ids=None,
        since=START,
        until=START + timedelta(days=1),
    )
    sql, args = archive_query(selection, "device")
    assert args == [["P-1", "P-2"], START, START + timedelta(days=1)]
    assert sql.count("patient_id = ANY($1::text[])") == 3
    assert sql.count("device_time >= $2") == 3 and sql.count("device_time < $3") == 3
    assert sql.rstrip().endswith('ORDER BY t, it, device_id COLLATE "C", seq, mid COLLATE "C"')
    ingest_sql, _ = archive_query(Selection(), "ingest")
    assert "WHERE TRUE" in ingest_sql
    assert ingest_sql.rstrip().endswith(
        'ORDER BY it, t, device_id COLLATE "C", seq, mid COLLATE "C"'
    )


def _row(event: Telemetry) -> tuple[Any, ...]:
    """The archive row the query returns for what ingest stored of ``event``: the fields of
    ``ArchivedObservation`` in order, NULL where the kind has no such field."""
    m = event.message
    common = (
        event.patient_id,
        event.device_id,
        m.device_time.timestamp(),
        event.ingest_time.timestamp(),
        str(m.message_id),
        "device_clock_skew" in event.flags,
    )
    none5 = (None,) * 5
    if isinstance(m, TemperatureReading):
        return (0, *common, event.temperature_c, m.site.value, *none5, None, None)
    if isinstance(m, PumpStatus):
        pump = (m.state.value, m.rate_ml_h, m.volume_remaining_ml, m.bag_volume_ml, m.battery_pct)
        return (1, *common, None, None, *pump, None, None)
    assert isinstance(m, PumpEvent)
    return (2, *common, None, None, *none5, m.event.value, m.alarm.value if m.alarm else "")


_COMMON = (
    "patient_id",
    "device_id",
    "channel",
    "device_time",
    "ingest_time",
    "message_id",
    "clock_skew",
    "t",
    "ingest_t",
)
#: The fields each kind of observation has, besides the common ones.
_OWN = {
    CHANNEL_TEMPERATURE: ("temperature_c", "site"),
    CHANNEL_PUMP_STATUS: (
        "pump_state",
        "rate_ml_h",
        "volume_remaining_ml",
        "bag_volume_ml",
        "battery_pct",
    ),
    CHANNEL_PUMP_EVENT: ("event", "alarm"),
}


def _fields(event: ReplayEvent) -> tuple[object, ...]:
    """The fields of ``event`` that its kind has (what the rules read of it)."""
    return tuple(getattr(event, name) for name in (*_COMMON, *_OWN[event.channel]))


def _others_absent(event: ReplayEvent) -> bool:
    """An archived event's fields that its kind does not have are None."""
    others = {name for own in _OWN.values() for name in own} - set(_OWN[event.channel])
    return all(getattr(event, name) is None for name in others)


def test_archive_rows_become_the_same_engine_input_as_the_kafka_records() -> None:
    """A row read from the archive and the record ingest put on Kafka for the same message
    reach the engine as identical events (every field the rules read)."""
    events = course("P-1", START, days=0.1)
    assert {type(e.message) for e in events} == {TemperatureReading, PumpStatus}
    for event in events:
        from_row = event_from_row(_row(event))
        from_kafka = decode_record(event.model_dump_json(by_alias=True).encode())
        assert _fields(from_row) == _fields(from_kafka) == _fields(from_telemetry(event))
        assert _others_absent(from_row)


def test_only_rows_read_in_device_time_order_make_a_batch_marked_so() -> None:
    """A batch read in device order is marked as in device-time order (the replay then takes
    its span from its ends); one read in ingest order is not."""
    rows = [_row(e) for e in course("P-1", START, days=0.1)]
    for by_device_time, kind in ((True, AsReadByDeviceTime), (False, AsRead)):
        stats = ReadStats()
        batch = _archive_batch(rows, Selection(), stats, False, None, by_device_time)
        assert type(batch) is kind
        assert [_fields(e) for e in batch] == [_fields(event_from_row(r)) for r in rows]
        assert stats.read == stats.admitted == len(rows)


def test_archive_pump_event_rows_with_flags_become_the_same_engine_input() -> None:
    """A pump alarm row with a skewed clock keeps its alarm code and the skew."""
    event = Telemetry.model_validate(
        {
            "patient_id": "P-1",
            "device_id": "pu-1",
            "mqtt_topic": "vigil/v1/dev/pu-1/pump-event",
            "ingest_time": START,
            "message": {
                "schema": "vigil.device.pump_event.v1",
                "message_id": "6f0b2b8e-0a3c-4d55-9a51-8c2b0c7d9e10",
                "device_id": "pu-1",
                "seq": 4,
                "device_time": START,
                "event": "alarm_raised",
                "alarm": "occlusion_downstream",
            },
            "flags": ["device_clock_skew"],
        }
    )
    from_row = event_from_row(_row(event))
    assert _fields(from_row) == _fields(from_telemetry(event))
    assert from_row.clock_skew and from_row.alarm == "occlusion_downstream"
    assert _others_absent(from_row)


@pytest.mark.parametrize(
    ("kind", "blank"),
    [(0, "temperature_c"), (0, "site"), (1, "rate_ml_h"), (1, "volume_remaining_ml")],
)
def test_an_archived_row_without_a_field_of_its_kind_is_refused_not_read_as_zero(
    kind: int, blank: str
) -> None:
    """The rules read a kind's fields where they check them: a row that lacks one (None, as
    for the fields the kind does not have) raises instead of deciding on a made-up value."""
    event = next(e for e in course("P-1", START, days=0.1) if _row(e)[0] == kind)
    fields = list(_row(event))
    fields[ArchivedObservation.__struct_fields__.index(blank)] = None
    with pytest.raises(ValueError, match="without its"):
        RulesEngine().on_observation(event_from_row(fields))


def test_selection_admits_by_patient_and_device() -> None:
    """Patient and device filters both apply; no filter admits everything."""
    event = from_telemetry(course("P-1", START, days=0.01)[0])
    assert Selection().admits(event)
    assert Selection(patient_ids=frozenset({"P-1"})).admits(event)
    assert not Selection(patient_ids=frozenset({"P-2"})).admits(event)
    assert not Selection(device_ids=frozenset({"other"})).admits(event)


def test_archived_times_are_made_exactly_from_epoch_seconds() -> None:
    """An archived event's datetimes, made from float seconds, are the stored microseconds
    exactly, across this century (random instants, and the edges of a second)."""
    rng = random.Random(7)
    low, high = datetime(2000, 1, 1, tzinfo=UTC), datetime(2099, 12, 31, tzinfo=UTC)
    span_us = int((high - low).total_seconds() * 1_000_000)
    instants = [low + timedelta(microseconds=rng.randrange(span_us)) for _ in range(20_000)]
    instants += [START + timedelta(microseconds=us) for us in (0, 1, 499_999, 500_000, 999_999)]
    for instant in instants:
        event = build_archived(
            0,
            "P-1",
            "th-1",
            instant.timestamp(),
            instant.timestamp(),
            "m",
            False,
            37.0,
            "oral",
            *(None,) * 7,
        )
        assert event.device_time == instant and event.ingest_time == instant
        assert event.device_time.utcoffset() == timedelta(0)


def test_archive_chunks_grow_or_shrink_to_the_target_rows() -> None:
    day = timedelta(days=1)
    assert next_span(day, 384, 200_000) > timedelta(days=500)  # one patient: the rest at once
    assert next_span(day, 400_000, 200_000) == day / 2
    assert next_span(day, 0, 200_000) == day  # a gap in the record (skipped by the reader)
    assert next_span(timedelta(minutes=2), 10**9, 200_000) == timedelta(minutes=1)


def test_an_archive_read_goes_through_context_and_warm_up_rows_too() -> None:
    """What the progress bar counts is what the reader reads: the lane mates' rows (without
    the device filter, which the reader applies), and the warm-up before the window."""
    window = Selection(
        patient_ids=frozenset({"P-1"}),
        device_ids=frozenset({"th-1"}),
        since=START + timedelta(days=2),
    )
    plain = archive_reading(window, None, False, None)
    assert plain == window
    with_mates = archive_reading(window, frozenset({"P-7"}), True, START)
    assert with_mates.patient_ids == {"P-1", "P-7"} and with_mates.device_ids is None
    assert with_mates.since == START
    from_record_start = archive_reading(window, None, True, None)
    assert from_record_start.since is None and from_record_start.device_ids == {"th-1"}


class PrefetchingConsumer:
    """A replay's consumer as aiokafka's behaves around a fetch: ``getmany`` hands out what
    one fetch brought, and taking it all wakes the background fetcher, which sends the next
    request three turns of the event loop later (it is woken, plans the request, and its task
    writes it)."""

    def __init__(self, logs: dict[int, list[bytes]], per_fetch: int) -> None:
        self.logs = logs
        self.per_fetch = per_fetch
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.fetches = 0  # fetches handed out by getmany
        self.requests = 0  # requests for the next fetch sent to the broker

    def assign(self, tps: list[TopicPartition]) -> None:
        self.positions = dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def pause(self, tp: TopicPartition) -> None:
        self.paused.add(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def _send_request(self, turns: int) -> None:
        if turns == 0:
            self.requests += 1
        else:
            asyncio.get_running_loop().call_soon(self._send_request, turns - 1)

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        assert self.requests == self.fetches, "a fetch handed out before it was requested"
        fetched = {}
        for tp in tps:
            start = self.positions[tp]
            values = self.logs[tp.partition][start : start + self.per_fetch]
            fetched[tp] = [
                ConsumerRecord(tp.topic, tp.partition, start + n, 0, 0, None, v, None, 0, 0, ())
                for n, v in enumerate(values)
            ]
            self.positions[tp] = start + len(values)
        self.fetches += 1
        self._send_request(3)
        return fetched


async def test_a_kafka_read_sends_the_next_fetch_before_it_hands_one_over() -> None:
    """The broker prepares the next fetch while the reader decodes and replays this one: by
    the time a fetch's records are handed over, the request for the next is out."""
    logs = {
        partition: [
            event.model_dump_json(by_alias=True).encode()
            for event in course(f"P-{partition}", START, days=0.5)
        ]
        for partition in (0, 1)
    }
    consumer = PrefetchingConsumer(logs, per_fetch=50)
    plan = {TopicPartition("t", p): (0, len(values)) for p, values in logs.items()}
    read: dict[int, list[ReplayEvent]] = {0: [], 1: []}
    offsets: dict[int, list[int]] = {0: [], 1: []}
    stats = ReadStats()
    async for run in read_kafka(consumer, plan, Selection(), stats):  # type: ignore[arg-type]
        assert isinstance(run, PartitionRun)
        if consumer.positions[TopicPartition("t", run.partition)] < len(logs[run.partition]):
            assert consumer.requests == consumer.fetches
        read[run.partition] += run.events
        offsets[run.partition] += run.offsets
    for partition, values in logs.items():
        assert [_fields(e) for e in read[partition]] == [_fields(decode_record(v)) for v in values]
        assert offsets[partition] == list(range(len(values)))
    assert consumer.paused == set(plan)
    assert stats.read == stats.admitted == sum(map(len, logs.values()))
