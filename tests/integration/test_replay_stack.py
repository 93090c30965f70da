"""Replay against the real stack: Kafka and PostgreSQL readers, comparison with the alerts
recorded at the time, and proof that a replay changes nothing and pages no one.

The recorded stream is written to a private topic (so no other test's services consume it) and
to the readings archive through ingest's own writer; the "live" alerts are what one engine
decided over the stream in Kafka order, stored in the ``alerts`` table through notify's own
repository, exactly as a live run records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiosmtpd.controller import Controller

from schemas.events import Alert, Telemetry
from schemas.kafka_topics import ALERTS_TOPIC, DEADLETTER_TOPIC, TELEMETRY_TOPIC
from services.ingest.adapters.postgres import store_telemetry
from services.ingest.adapters.registry_admin import upsert_care_team, upsert_patient
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.rules.domain.config import RulesConfig
from services.rules.domain.engine import RulesEngine
from tests.kafka_helpers import end_offsets
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings
from vigil_tools.replay import sources
from vigil_tools.replay.cli import main as replay_main
from vigil_tools.replay.compare import Outcome
from vigil_tools.replay.engine_port import PinnedRules, build_archived
from vigil_tools.replay.runner import ReplayedAlert
from vigil_tools.replay.service import (
    ReplayOutcome,
    ReplayRequest,
    RulesChoice,
    read_only_connection,
    run_replay,
)
from vigil_tools.replay.sources import (
    PartitionRange,
    ReadStats,
    Selection,
    read_archive,
)
from vigil_tools.replay.synthetic import FeverEpisode, PumpPause, course

pytestmark = pytest.mark.stack

LIVE_TOPICS = (TELEMETRY_TOPIC, ALERTS_TOPIC, DEADLETTER_TOPIC)
READING_TABLES = ("temperature_readings", "pump_status", "pump_events", "alerts", "pages")


@dataclass
class Recording:
    run: str
    topic: str
    team: str
    patients: tuple[str, ...]
    events: list[Telemetry]
    live: list[Alert]
    start: datetime


def live_alerts(events: list[Telemetry], partitions: list[int]) -> list[Alert]:
    """What the rules service decides: one engine per partition, each in log order."""
    engines: dict[int, RulesEngine] = {}
    decided: list[Alert] = []
    for event, partition in zip(events, partitions, strict=True):
        engine = engines.setdefault(partition, RulesEngine(RulesConfig()))
        decided += engine.on_telemetry(event)
    return decided


def distinct_partitions(run: str, partitions: int) -> tuple[str, ...]:
    """Patient ids that Kafka's default partitioner puts on different partitions, so each
    live engine serves exactly one of them (the shared archive holds other runs' patients,
    which an archive replay must not mistake for these patients' engine mates)."""
    lane = PinnedRules.partitioner(partitions)
    chosen: dict[int, str] = {}
    for n in range(1000):
        chosen.setdefault(lane(f"rp-{run}-{n}"), f"rp-{run}-{n}")
        if len(chosen) == partitions:
            break
    return tuple(chosen[p] for p in sorted(chosen))


@contextlib.asynccontextmanager
async def private_topic(topic: str) -> AsyncIterator[None]:
    """A three-partition topic no service consumes, kept until the block ends."""
    admin = AIOKafkaAdminClient(bootstrap_servers=KafkaSettings().bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1, topic_configs={"retention.ms": "-1"})])
        try:
            yield
        finally:
            await admin.delete_topics([topic])
    finally:
        await admin.close()


@pytest.fixture(scope="module")
async def recording(stack_env: dict[str, str]) -> AsyncIterator[Recording]:
    """Three patients' three days, recorded to a private topic, the archive and the alerts."""
    run = uuid.uuid4().hex[:8]
    # Recent enough for the topic's time retention, old enough to be a finished recording.
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=5)
    team = f"team-rp-{run}"
    patients = distinct_partitions(run, 3)
    fevers = (
        FeverEpisode(timedelta(days=1, hours=2), timedelta(minutes=100), 38.1),
        FeverEpisode(timedelta(days=2, hours=5), timedelta(minutes=20), 38.7),
    )
    events: list[Telemetry] = []
    for n, patient in enumerate(patients):
        events += course(
            patient,
            start + timedelta(minutes=7 * n),
            days=3,
            fevers=fevers,
            pauses=(PumpPause(timedelta(days=1, hours=9), timedelta(minutes=45)),),
        )
    events.sort(key=lambda e: (e.ingest_time, e.patient_id))

    kafka = KafkaSettings()
    topic = f"replaytest.telemetry.{run}"
    async with private_topic(topic):
        producer = make_producer(kafka, f"replaytest-{run}")
        await producer.start()
        try:
            sends = [
                await producer.send(
                    topic,
                    encode(e),
                    key=e.patient_id.encode(),
                    timestamp_ms=int(e.ingest_time.timestamp() * 1000),
                )
                for e in events
            ]
            written = await asyncio.gather(*sends)
        finally:
            await producer.stop()

        pool = await asyncpg.create_pool(stack_env["VIGIL_PG_DSN"], min_size=1, max_size=2)
        assert pool is not None
        live = live_alerts(events, [meta.partition for meta in written])
        try:
            await upsert_care_team(pool, team, "Replay test team", f"{team}@example.org")
            await upsert_care_team(pool, f"{team}-x", "Other team", f"{team}-x@example.org")
            for patient in patients:
                await upsert_patient(pool, patient, team if patient != patients[2] else f"{team}-x")
            for offset in range(0, len(events), 5000):
                await store_telemetry(pool, events[offset : offset + 5000])
            repository = PostgresNotifyRepository(pool)
            for alert in live:
                await repository.record_alert(alert)
        finally:
            await pool.close()
        yield Recording(run, topic, team, patients, events, live, start)


def of(alerts: list[Alert], patients: set[str]) -> list[Alert]:
    return [a for a in alerts if a.patient_id in patients]


async def test_kafka_time_range_replays_to_exactly_the_recorded_alerts(
    recording: Recording,
) -> None:
    """The whole recording, read back from Kafka by time range (offsets_for_times), decides
    every alert recorded live and nothing else; the alerts table agrees."""
    outcome = await run_replay(
        ReplayRequest(
            source="kafka",
            topic=recording.topic,
            patient_ids=frozenset(recording.patients),
            since=recording.start,
            until=recording.events[-1].ingest_time + timedelta(seconds=1),
            compare_recorded="table",
            audit=False,
        )
    )
    assert outcome.stats.read == len(recording.events)
    replayed = [i.alert for i in outcome.primary.alerts]
    assert replayed and sorted(a.alert_id for a in replayed) == sorted(
        a.alert_id for a in recording.live
    )
    assert outcome.recorded_diff is not None
    assert outcome.recorded_diff.identical, outcome.recorded_diff.counts()
    assert outcome.recorded_diff.counts()["same"] == len(recording.live)


async def test_kafka_offsets_pick_exactly_the_named_records(recording: Recording) -> None:
    """An explicit range reads exactly its offsets; a later start time skips what is before."""
    ends = await end_offsets(KafkaSettings().bootstrap_servers, recording.topic)
    partition_ranges = tuple(PartitionRange(tp.partition, 10, 110) for tp in ends)
    outcome = await run_replay(
        ReplayRequest(source="kafka", topic=recording.topic, offsets=partition_ranges, audit=False)
    )
    # Three patients keyed onto three partitions may share one: count what each one holds.
    assert outcome.stats.read == sum(max(0, min(110, end) - 10) for end in ends.values()) > 0
    positions = {item.position for item in outcome.primary.alerts}
    assert all(p[0] == "kafka" and 10 <= p[2] < 110 for p in positions)

    midway = recording.start + timedelta(days=2)
    later = await run_replay(
        ReplayRequest(source="kafka", topic=recording.topic, since=midway, audit=False)
    )
    expected = sum(1 for e in recording.events if e.ingest_time >= midway)
    assert later.stats.read == expected


async def test_archive_replays_one_patient_and_a_care_team(recording: Recording) -> None:
    """From the readings archive in device-time order, each patient on the engine lane its
    partition gave it: one patient's alerts match the live ones; the care team filter takes
    its two patients and not the third."""
    one = recording.patients[0]
    outcome = await run_replay(
        ReplayRequest(
            source="archive",
            topic=recording.topic,  # its partitions place each patient on its live engine
            patient_ids=frozenset({one}),
            compare_recorded="table",
            context_time=False,
            audit=False,
        )
    )
    assert outcome.stats.admitted == sum(1 for e in recording.events if e.patient_id == one)
    assert outcome.recorded_diff is not None and outcome.recorded_diff.identical
    # Each alert names the archive row that decided it: its table and its message id.
    recorded = {str(e.message.message_id): e for e in recording.events}
    tables = {"temperature": "temperature_readings", "pump_status": "pump_status"}
    placed = [i.position for i in outcome.primary.alerts if i.position[0] == "pg"]
    assert placed
    for _, table, message_id in placed:
        event = recorded[message_id]
        assert event.patient_id == one
        assert table == tables[event.message.schema_.split(".")[2]]
    assert outcome.recorded_diff.counts()["same"] == len(of(recording.live, {one}))

    team = await run_replay(
        ReplayRequest(
            source="archive",
            topic=recording.topic,
            care_team_id=recording.team,
            context_time=False,
            audit=False,
        )
    )
    assert {i.alert.patient_id for i in team.primary.alerts} == set(recording.patients[:2])


async def test_a_threshold_change_shows_the_expected_diff_over_the_archive(
    recording: Recording,
) -> None:
    """single_c 38.3 -> 38.0: each patient's sustained 38.1 °C fever now pages an hour
    earlier as a single reading; everything else is unchanged."""
    outcome = await run_replay(
        ReplayRequest(
            source="archive",
            partitions=3,
            context_time=False,
            patient_ids=frozenset(recording.patients),
            candidate=RulesChoice(what_if=(("fever_single_c", 38.0),)),
            audit=False,
        )
    )
    diff = outcome.candidate_diff
    assert diff is not None
    moved = [i for i in diff.items if i.outcome is Outcome.TIMING]
    assert len(moved) == 3
    assert all(i.delta == -timedelta(hours=1) for i in moved)
    assert {i.any_alert.patient_id for i in moved} == set(recording.patients)
    assert diff.counts()["missing"] == diff.counts()["extra"] == 0


def fever_crossing(recording: Recording) -> datetime:
    """A window start inside every patient's first fever: it began (day 1, 02:00 plus the
    patient's offset) before the window and reaches its 60 minutes after it."""
    return recording.start + timedelta(days=1, hours=2, minutes=30)


async def test_an_archive_replay_from_mid_stream_decides_what_the_full_replay_and_live_did(
    recording: Recording,
) -> None:
    """From the archive, a window starting inside a fever: the warm-up decides exactly the full
    replay's decisions before the window and the window exactly the rest (same alerts, same
    rows; the window's in the full replay's order); the window matches the alerts recorded
    live from its start on, including the sustained fever that crossed its threshold after the
    start. Without the warm-up the same window does not match live."""
    since = fever_crossing(recording)
    request = ReplayRequest(
        source="archive",
        partitions=3,
        context_time=False,
        patient_ids=frozenset(recording.patients),
        audit=False,
    )
    full = await run_replay(request)
    window = await run_replay(replace(request, since=since, compare_recorded="table"))

    def listed(items: list[ReplayedAlert]) -> list[tuple[object, int]]:
        return [(i.alert.alert_id, i.position[2]) for i in items]

    decided = listed(full.primary.alerts)
    windowed = listed(window.primary.alerts)
    assert sorted(listed(window.primary.warmup_alerts) + windowed, key=str) == sorted(
        decided, key=str
    )
    assert windowed == [item for item in decided if item in set(windowed)]
    sustained_after = [
        i.alert
        for i in window.primary.alerts
        if i.alert.code == "fever_sustained" and i.alert.phase.value == "start"
    ]
    assert {a.patient_id for a in sustained_after} == set(recording.patients)
    assert window.stats.warmup_read > 0
    assert window.recorded_diff is not None
    assert window.recorded_diff.identical, window.recorded_diff.counts()
    assert window.recorded_diff.counts()["same"] == len(window.primary.alerts)

    cold = await run_replay(replace(request, since=since, compare_recorded="table", warmup=False))
    assert cold.recorded_diff is not None and not cold.recorded_diff.identical


async def test_a_kafka_replay_from_mid_stream_decides_what_the_full_replay_and_live_did(
    recording: Recording,
) -> None:
    """From Kafka by record time, a window starting inside a fever: each partition warms up
    from its beginning; the window decides, record for record, the full replay's decisions
    from the window start on, and matches the alerts recorded live."""
    since = fever_crossing(recording)
    request = ReplayRequest(
        source="kafka",
        topic=recording.topic,
        patient_ids=frozenset(recording.patients),  # the alerts table is shared
        audit=False,
    )
    full = await run_replay(request)
    window = await run_replay(replace(request, since=since, compare_recorded="table"))

    def placed(items: list[ReplayedAlert]) -> set[tuple[object, object, int]]:
        return {(i.alert.alert_id, i.position[1], i.position[2]) for i in items}

    warm, decided = placed(window.primary.warmup_alerts), placed(window.primary.alerts)
    assert warm.isdisjoint(decided)
    assert warm | decided == placed(full.primary.alerts)
    assert all(i.position[0] == "kafka" for i in window.primary.alerts)
    assert any(i.alert.code == "fever_sustained" for i in window.primary.alerts)
    assert window.recorded_diff is not None
    assert window.recorded_diff.identical, window.recorded_diff.counts()


async def records_between(
    before: dict[TopicPartition, int], after: dict[TopicPartition, int]
) -> list[bytes]:
    """Every record appended to the live topics between two snapshots (by anyone)."""
    grown = {tp: (before.get(tp, 0), end) for tp, end in after.items() if end > before.get(tp, 0)}
    if not grown:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=KafkaSettings().bootstrap_servers)
    await consumer.start()
    values: list[bytes] = []
    try:
        consumer.assign(list(grown))
        for tp, (start, _) in grown.items():
            consumer.seek(tp, start)
        while grown:
            for tp, records in (await consumer.getmany(*grown, timeout_ms=1000)).items():
                values += [r.value or b"" for r in records if r.offset < grown[tp][1]]
            for tp in list(grown):
                if await consumer.position(tp) >= grown[tp][1]:
                    del grown[tp]
    finally:
        await consumer.stop()
    return values


async def row_counts(conn: asyncpg.Connection, patients: tuple[str, ...]) -> dict[str, int]:
    counts = {
        table: int(
            await conn.fetchval(
                f"SELECT count(*) FROM {table} WHERE patient_id = ANY($1::text[])",
                list(patients),
            )
        )
        for table in READING_TABLES
    }
    counts["delivery_attempts"] = int(
        await conn.fetchval(
            "SELECT count(*) FROM delivery_attempts d JOIN pages p USING (page_id)"
            " WHERE p.patient_id = ANY($1::text[])",
            list(patients),
        )
    )
    return counts


def free_port() -> int:
    # aiosmtpd's Controller probes its own port after start, so it cannot be given port 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CountingSmtp:
    def __init__(self) -> None:
        self.connections = 0

    async def handle_EHLO(  # the name aiosmtpd dispatches to
        self, server: object, session: object, envelope: object, hostname: str, responses: list[str]
    ) -> list[str]:
        self.connections += 1
        return responses


async def test_a_replay_writes_nothing_live_and_pages_no_one(
    recording: Recording, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka and archive replays with comparisons and reports, through the CLI: the private
    topic's end offsets are unchanged, no record about these patients reached a live topic,
    no readings/alerts/pages row changed, no SMTP connection was made; the only write is one
    audit entry per run."""
    smtp = CountingSmtp()
    port = free_port()
    controller = Controller(smtp, hostname="127.0.0.1", port=port)
    controller.start()
    # Anything that tried to page during the replay would find this server, and be counted.
    monkeypatch.setenv("VIGIL_NOTIFY_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("VIGIL_NOTIFY_SMTP_PORT", str(port))
    actor = f"replay-test-{recording.run}"
    kafka = KafkaSettings().bootstrap_servers
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        offsets_before = await end_offsets(kafka, *LIVE_TOPICS, recording.topic)
        rows_before = await row_counts(conn, recording.patients)
        runs = [
            [
                "--kafka",
                "--topic",
                recording.topic,
                "--all",
                "--compare-recorded",
                "table",
                "--what-if",
                "fever_single_c=38.0",
                "--html",
                str(tmp_path / "k.html"),
            ],
            [
                "--archive",
                "--topic",
                recording.topic,
                "--care-team",
                recording.team,
                "--no-context-time",
                "--compare-recorded",
                "table",
                "--format",
                "csv",
                "--diff-json",
                str(tmp_path / "d.json"),
                "--progress",
            ],
            [
                "--kafka",
                "--topic",
                recording.topic,
                "--patient",
                recording.patients[0],
                "--compare-recorded",
                "topic",
            ],
        ]
        for n, argv in enumerate(runs):
            out = tmp_path / f"alerts-{n}.out"
            code = await asyncio.to_thread(
                replay_main, [*argv, "--out", str(out), "--actor", actor]
            )
            assert code == 0, argv
            assert out.stat().st_size > 0
        offsets_after = await end_offsets(kafka, *LIVE_TOPICS, recording.topic)
        rows_after = await row_counts(conn, recording.patients)
        audit_rows = await conn.fetch(
            "SELECT action, details::text AS details FROM audit_log WHERE actor = $1 ORDER BY seq",
            actor,
        )
    finally:
        await conn.close()
        controller.stop()

    private = {tp: n for tp, n in offsets_before.items() if tp.topic == recording.topic}
    assert private == {tp: n for tp, n in offsets_after.items() if tp.topic == recording.topic}
    appended = await records_between(offsets_before, offsets_after)
    assert not [v for v in appended if any(p.encode() in v for p in recording.patients)]
    assert rows_after == rows_before
    assert smtp.connections == 0
    assert [r["action"] for r in audit_rows] == ["replay.run"] * 3
    assert json.loads(audit_rows[0]["details"])["recorded_diff"]["same"] == len(recording.live)
    html = (tmp_path / "k.html").read_text()
    assert html.count("<svg") == 3 and "<script" not in html
    diffs = json.loads((tmp_path / "d.json").read_text())
    assert diffs[0]["identical"] is True, [i for i in diffs[0]["items"] if i["outcome"] != "same"]


async def test_the_replay_connection_cannot_write(stack_env: dict[str, str]) -> None:
    """The archive reader's connection refuses writes: a bug could not write live rows."""
    conn = await read_only_connection(stack_env["VIGIL_PG_DSN"])
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute(
                "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, 'x', 'x')",
                f"never-{uuid.uuid4().hex[:6]}",
            )
    finally:
        await conn.close()


def decisions(outcome: ReplayOutcome) -> dict[str, object]:
    """Everything a replay reports, as comparable values."""

    def listed(items: list[ReplayedAlert]) -> list[tuple[str, object]]:
        return [(i.alert.model_dump_json(), i.position) for i in items]

    candidate = outcome.candidate
    return {
        "alerts": listed(outcome.primary.alerts),
        "warmup": listed(outcome.primary.warmup_alerts),
        "open": listed(outcome.primary.open_at_start()),
        "candidate": listed(candidate.alerts) if candidate else None,
        "events": outcome.primary.events,
        "span": (outcome.primary.first_device_time, outcome.primary.last_device_time),
        "stats": (outcome.stats.read, outcome.stats.admitted, outcome.stats.warmup_read),
        "diff": outcome.candidate_diff.counts() if outcome.candidate_diff else None,
    }


async def test_worker_processes_decide_exactly_what_one_process_decides_from_kafka(
    recording: Recording,
) -> None:
    """The topic's three partitions read by three worker processes, whole and from mid-stream
    with warm-up, with a what-if candidate: alert for alert, position for position, in the
    same order, what one process decides; and the window still matches live."""
    request = ReplayRequest(
        source="kafka",
        topic=recording.topic,
        patient_ids=frozenset(recording.patients),
        candidate=RulesChoice(what_if=(("fever_single_c", 38.0),)),
        advance_to=recording.events[-1].device_time + timedelta(hours=2),
        audit=False,
    )
    for window in (request, replace(request, since=fever_crossing(recording))):
        alone = await run_replay(replace(window, workers=1))
        shared = await run_replay(replace(window, workers=3))
        assert (alone.workers, shared.workers) == (1, 3)
        assert decisions(shared) == decisions(alone)
        assert alone.primary.alerts and alone.candidate and alone.candidate.alerts
    windowed = await run_replay(
        replace(
            request,
            since=fever_crossing(recording),
            advance_to=None,  # live fired no timer past the recording's end
            compare_recorded="table",
            workers=3,
        )
    )
    assert windowed.recorded_diff is not None
    assert windowed.recorded_diff.identical, windowed.recorded_diff.counts()


async def test_worker_processes_decide_exactly_what_one_process_decides_from_the_archive(
    recording: Recording,
) -> None:
    """The archive split by lane among workers (the patients' own rows, a window, a device
    filter whose lane mates are read as context, ingest order): the same decisions as one
    process."""
    base = ReplayRequest(
        source="archive",
        topic=recording.topic,
        patient_ids=frozenset(recording.patients),
        candidate=RulesChoice(what_if=(("fever_single_c", 38.0),)),
        audit=False,
    )
    device = next(e.device_id for e in recording.events if e.patient_id == recording.patients[1])
    requests = (
        base,
        replace(base, since=fever_crossing(recording)),
        replace(base, patient_ids=None, device_ids=frozenset({device})),
        replace(base, order="ingest"),  # one query per worker, not chunks
    )
    for request in requests:
        alone = await run_replay(replace(request, workers=1))
        shared = await run_replay(replace(request, workers=3))
        assert alone.workers == 1 and shared.workers > 1
        assert decisions(shared) == decisions(alone)
        assert alone.primary.alerts
    # Everyone, without context: the workers split every patient the archive holds in the
    # window, found by the loose index scan.
    everyone = replace(
        base,
        patient_ids=None,
        context_time=False,
        since=recording.start,
        until=recording.start + timedelta(days=3),
        warmup=False,
    )
    alone = await run_replay(replace(everyone, workers=1))
    shared = await run_replay(replace(everyone, workers=2))
    assert shared.workers == 2 and decisions(shared) == decisions(alone)
    assert set(recording.patients) <= {i.alert.patient_id for i in shared.primary.alerts}
    by_device = await run_replay(replace(requests[2], workers=2))
    assert {i.alert.device_id for i in by_device.primary.alerts} == {device}


async def test_an_archive_worker_reads_the_snapshot_it_was_given(
    recording: Recording, stack_env: dict[str, str]
) -> None:
    """A row written after the snapshot was exported is not read by a worker that imports it;
    a reader without the snapshot reads it."""
    dsn = stack_env["VIGIL_PG_DSN"]
    patient = recording.patients[0]
    selection = Selection(patient_ids=frozenset({patient}))
    exporter = await read_only_connection(dsn)
    writer = await asyncpg.connect(dsn)
    last = next(e for e in reversed(recording.events) if e.patient_id == patient)
    late = last.model_copy(
        update={"message": last.message.model_copy(update={"message_id": uuid.uuid4()})}
    )
    try:
        async with exporter.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await exporter.fetchval("SELECT pg_export_snapshot()")
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
            assert pool is not None
            try:
                await store_telemetry(pool, [late])
            finally:
                await pool.close()

            async def count(snapshot: str | None) -> int:
                reader = await read_only_connection(dsn)
                try:
                    stats = ReadStats()
                    async for _ in read_archive(
                        reader, selection, stats, decode=False, snapshot=snapshot
                    ):
                        pass
                    return stats.read
                finally:
                    await reader.close()

            expected = sum(1 for e in recording.events if e.patient_id == patient)
            assert await count(snapshot) == expected
            assert await count(None) == expected + 1
    finally:
        for table in ("temperature_readings", "pump_status", "pump_events"):
            await writer.execute(
                f"DELETE FROM {table} WHERE message_id = $1", late.message.message_id
            )
        await writer.close()
        await exporter.close()


async def test_the_archive_reads_stored_microseconds_back_exactly(
    stack_env: dict[str, str],
) -> None:
    """The archive query sends times as epoch seconds (float8); made back into datetimes they
    are the stored ``timestamptz`` values to the microsecond, whatever the session time zone."""
    rng = random.Random(11)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    instants = [
        base + timedelta(microseconds=rng.randrange(400 * 86_400_000_000)) for _ in range(5000)
    ]
    conn = await read_only_connection(stack_env["VIGIL_PG_DSN"])
    try:
        await conn.execute("SET TimeZone = 'America/New_York'")
        rows = await conn.fetch(
            "SELECT date_part('epoch', s) FROM unnest($1::timestamptz[]) AS s", instants
        )
    finally:
        await conn.close()
    back = [
        build_archived(0, "P", "d", r[0], r[0], "m", False, 37.0, "oral", *(None,) * 7)
        for r in rows
    ]
    assert [e.device_time for e in back] == instants


async def test_an_archive_read_in_small_chunks_decides_what_one_query_decides(
    recording: Recording, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive read in device-time chunks of about 300 rows (dozens of queries, a first
    span of one hour) gives the same rows in the same order as in one large chunk: the same
    decisions, positions and counts, in one process and in workers, with and without warm-up,
    and with the lane mates' rows (other runs' patients, with gaps of days between them)."""
    base = ReplayRequest(
        source="archive",
        topic=recording.topic,
        patient_ids=frozenset(recording.patients),
        context_time=False,  # three patients of even density: the chunk sizes are known
        audit=False,
    )
    requests = (
        base,
        replace(base, since=fever_crossing(recording)),
        replace(base, context_time=True),
    )
    whole = [await run_replay(replace(request, workers=1)) for request in requests]
    monkeypatch.setattr(sources, "ARCHIVE_CHUNK_ROWS", 300)
    monkeypatch.setattr(sources, "ARCHIVE_FIRST_SPAN", timedelta(hours=1))
    chunks: list[int] = []
    real_next_span = sources.next_span

    def counted(span: timedelta, rows: int, target: int) -> timedelta:
        chunks.append(rows)
        return real_next_span(span, rows, target)

    monkeypatch.setattr(sources, "next_span", counted)
    for request, expected in zip(requests, whole, strict=True):
        for workers in (1, 3):
            chunks.clear()
            chunked = await run_replay(replace(request, workers=workers))
            assert decisions(chunked) == decisions(expected)
            if workers == 1 and not request.context_time:  # (workers count in their own)
                assert len(chunks) > 5 and sum(chunks) == (
                    chunked.stats.read + chunked.stats.warmup_read
                )
                assert max(chunks) < 1000


async def test_the_archive_bounds_of_named_patients_are_those_of_their_rows(
    recording: Recording, stack_env: dict[str, str]
) -> None:
    """The first and last device time of a selection, read from each patient's index ends, are
    those of its rows (aggregated over every row in one scan), whatever the time range and
    device filter, and there are none for a patient without rows."""
    middle = recording.start + timedelta(days=1, hours=5, minutes=3)
    patients = frozenset(recording.patients)
    thermometer = f"th-{recording.patients[0]}"  # the course's thermometer (synthetic.course)
    assert any(e.device_id == thermometer for e in recording.events)
    selections = [
        Selection(patient_ids=patients),
        Selection(patient_ids=frozenset(recording.patients[:1])),
        Selection(patient_ids=patients, since=middle),
        Selection(patient_ids=patients, until=middle),
        Selection(patient_ids=patients, since=middle, until=middle + timedelta(hours=7)),
        Selection(patient_ids=patients, device_ids=frozenset({thermometer}), since=middle),
        Selection(patient_ids=frozenset({f"nobody-{recording.run}"})),
        Selection(patient_ids=patients, since=recording.start + timedelta(days=30)),
    ]
    conn = await read_only_connection(stack_env["VIGIL_PG_DSN"])
    try:
        for selection in selections:
            where, args = sources.selection_where(selection)
            scanned = tuple(await conn.fetchrow(sources._BOUNDS_SCAN.format(where=where), *args))
            assert await sources._bounds(conn, selection) == scanned, selection
        assert scanned == (None, None)
        assert (await sources._bounds(conn, selections[0]))[0] == recording.start
    finally:
        await conn.close()


async def test_a_kafka_replay_counts_records_that_break_the_contract_and_decides_the_rest(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records the live service would dead-letter (not JSON, empty, a tombstone, a reading in
    an unknown unit) among one partition's valid records: a replay of the whole topic decides
    exactly what one engine per partition decided over the valid records, each alert at the
    offset of the record that decided it, and counts each bad record at its position. The
    partitions without a bad record are decoded in one pass (``PartitionRun``); the one with
    them falls back to deciding record by record."""
    del stack_env  # the stack must be up
    run = uuid.uuid4().hex[:8]
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    patients = distinct_partitions(run, 3)
    fevers = (FeverEpisode(timedelta(hours=10), timedelta(minutes=90), 38.6),)
    events = sorted(
        (e for p in patients for e in course(p, start, days=1, fevers=fevers, pauses=())),
        key=lambda e: (e.ingest_time, e.patient_id),
    )
    unit_k = json.loads(encode(events[0]))
    unit_k["temperature_c"] = None
    unit_k["message"]["unit"] = "K"
    bad: list[bytes | None] = [b"not json", b"", None, json.dumps(unit_k).encode()]
    topic = f"replaytest.badrecords.{run}"
    expected: list[tuple[object, object]] = []
    bad_positions: list[tuple[str, int, int]] = []
    engines: dict[int, RulesEngine] = {}
    decoded: list[bool] = []
    real_decode_run = sources._decode_run

    def counted(records: Any, stats: ReadStats) -> sources.PartitionRun | None:
        run = real_decode_run(records, stats)
        decoded.append(run is not None)
        return run

    monkeypatch.setattr(sources, "_decode_run", counted)
    async with private_topic(topic):
        producer = make_producer(KafkaSettings(), f"replaytest-{run}")
        await producer.start()
        try:
            for n, event in enumerate(events):
                if n in (40, 41, 300, 301):  # among the first patient's valid records
                    meta = await (await producer.send(topic, bad.pop(0), key=patients[0].encode()))
                    bad_positions.append(("kafka", meta.partition, meta.offset))
                meta = await (
                    await producer.send(
                        topic,
                        encode(event),
                        key=event.patient_id.encode(),
                        timestamp_ms=int(event.ingest_time.timestamp() * 1000),
                    )
                )
                engine = engines.setdefault(meta.partition, RulesEngine(RulesConfig()))
                expected += [
                    (a.alert_id, ("kafka", meta.partition, meta.offset))
                    for a in engine.on_telemetry(event)
                ]
        finally:
            await producer.stop()
        outcome = await run_replay(
            ReplayRequest(source="kafka", topic=topic, audit=False, workers=1)
        )
    assert not bad and any(a[0] for a in expected)
    assert outcome.stats.read == len(events) + 4 and outcome.primary.events == len(events)
    assert outcome.stats.rejected == 4
    assert sorted(outcome.stats.rejected_positions) == sorted(bad_positions)
    replayed = [(i.alert.alert_id, i.position) for i in outcome.primary.alerts]
    assert sorted(replayed, key=str) == sorted(expected, key=str)
    assert any(
        i.alert.rule_id == "fever" and i.alert.patient_id == patients[0]
        for i in outcome.primary.alerts
    )
    assert True in decoded and False in decoded
