"""Benchmark of replay: events per second from Kafka and from PostgreSQL through the rules.

``make bench-replay`` (or ``python bench/replay.py`` with ``VIGIL_STACK_*`` set). Writes a
recorded fleet (``--patients`` full 28-day courses: a reading every 5 min and a pump status every
15 min) to a private topic and to the readings archive, then measures, in the same run:

- ``kafka_raw_per_s``: records read from the topic by one consumer with no decoding (the
  baseline); ``kafka_replay_per_s``: the same records decoded and replayed through the pinned
  engine, as ``vigil replay --kafka --all`` does, by default with one worker process per core
  (``workers``); ``kafka_replay_one_process_per_s``: the same with ``--workers 1``;
  ``kafka_ratio`` = replay / raw (above 1 when the workers read in parallel).
- ``seal_rows_per_s``: the archive's rows sealed into days (``vigil replay seal``), once,
  after writing: the courses ended two days before the run, so their days are sealed, as the
  periodic pass would have sealed them.
- ``pg_raw_rows_per_s``: archive rows fetched from the readings tables by one connection
  (server-side cursor, 20,000-row batches) with no conversion; ``pg_replay_rows_per_s``: the
  archive replayed through its sealed days with the default workers;
  ``pg_replay_one_process_per_s``; ``pg_replay_unsealed_rows_per_s``: replayed from the rows
  alone (``--unsealed``) with the default workers; ``pg_ratio`` (replay / raw read) and
  ``pg_sealed_ratio`` (sealed / unsealed replay).
- On TimescaleDB the readings are hypertables and sealing refuses there: the archive's fast form
  is compressed chunks (``archive_form``: ``sealed_days`` or ``compressed_chunks``). The
  archive rounds then run twice, first on the rows as written (their replay with workers is
  ``pg_replay_unsealed_rows_per_s``), then after the chunks holding them are compressed, as
  the compression policy would have by then (``compress_rows_per_s``: rows compressed per
  second; ``compression_ratio``: the chunks' bytes before / after); ``pg_raw_rows_per_s``,
  ``pg_replay_rows_per_s`` and ``pg_ratio`` are from the compressed chunks, and
  ``pg_sealed_ratio`` is the ratio of the two replays' medians (rounds minutes apart, not
  interleaved). ``seal_rows_per_s`` is null there, ``compress_rows_per_s`` and
  ``compression_ratio`` on plain PostgreSQL: the keys are the same on both.
- Both replays are checked to decide the same alerts at the same positions in the same order
  with workers as in one process.
- ``course_28d_s``: one patient's full course (10,752 events) replayed from the archive, end
  to end (connection, query, replay); ``course_28d_memory_s``: the same course from memory.
- ``course_28d_window_s``: the same course replayed from day 14 on, warm-up included (the
  first 14 days are read and fed to the engine without being reported), end to end.
- ``engine_only_per_s``: the engine alone over pre-built events (what no reader can beat).
- ``kafka_record_us`` / ``archive_row_us``: in-process micro-timings, best of five passes, of
  the edge conversion alone: a recorded record's bytes -> event with the live decoder, and an
  archive row (real ``asyncpg`` records of the archive query) -> event. Steadier than the rates
  above on a shared machine.

Each read and replay rate is measured ``--repeats`` times (default 5) in this process, in
rounds: raw read, replay in one process, replay, then again, so that a rate and its baseline
are measured seconds apart and under the same load of the machine (the ratios are the medians
of the rounds' ratios). The plain key is the median, ``…_best`` the fastest;
``pg_replay_rows_per_s_runs`` and ``pg_raw_rows_per_s_runs`` list every round's archive replay
and baseline. Other processes on a shared machine only ever slow a run down, so the fastest is
the code's attainable speed (the convention of ``timeit``) and the median what a run on this
machine at this hour gives.

Progress goes to stderr; ONE JSON line of figures goes to stdout at the end. Nothing here
asserts a speed. The private topic and the archive rows are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import CpuMeter, stack_environment
from schemas.events import Telemetry
from services.ingest.adapters.postgres import store_telemetry
from vigil.db.migrate import timescaledb_enabled
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings
from vigil_tools.replay.engine_port import decode_record, default_rules, from_telemetry
from vigil_tools.replay.runner import Replay
from vigil_tools.replay.seal import seal_archive, seal_horizon
from vigil_tools.replay.service import ReplayOutcome, ReplayRequest, run_replay
from vigil_tools.replay.sources import (
    ReadStats,
    Selection,
    archive_query,
    event_from_row,
    make_reader_consumer,
    plan_partitions,
    read_archive,
    read_kafka,
)
from vigil_tools.replay.synthetic import course

TABLES = ("temperature_readings", "pump_status", "pump_events")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def produce(topic: str, events: list[Telemetry], kafka: KafkaSettings) -> None:
    producer = make_producer(kafka, "bench-replay", linger_ms=20)
    await producer.start()
    try:
        pending = []
        for event in events:
            pending.append(
                await producer.send(
                    topic,
                    encode(event),
                    key=event.patient_id.encode(),
                    timestamp_ms=int(event.ingest_time.timestamp() * 1000),
                )
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def kafka_raw(topic: str, kafka: KafkaSettings) -> tuple[int, float]:
    consumer = make_reader_consumer(kafka, "bench-replay-raw")
    await consumer.start()
    try:
        plan = await plan_partitions(
            consumer,
            topic,
            bootstrap_servers=kafka.bootstrap_servers,
            since=None,
            until=None,
            offsets=None,
        )
        stats = ReadStats()
        started = time.perf_counter()
        async for _ in read_kafka(consumer, plan, Selection(), stats, decode=False):
            pass
        return stats.read, time.perf_counter() - started
    finally:
        await consumer.stop()


async def pg_raw(dsn: str, patients: frozenset[str]) -> tuple[int, float]:
    conn = await asyncpg.connect(dsn)
    try:
        stats = ReadStats()
        started = time.perf_counter()
        rows = read_archive(
            conn, Selection(patient_ids=patients), stats, decode=False, sealed=False
        )
        async for _ in rows:
            pass
        return stats.read, time.perf_counter() - started
    finally:
        await conn.close()


def rate_figures(figures: dict[str, object], key: str, rates: list[float]) -> float:
    """Record the median rate as ``key`` and the fastest as ``key_best``; return the median."""
    median = statistics.median(rates)
    figures[key] = round(median)
    figures[f"{key}_best"] = round(max(rates))
    return median


async def interleaved(
    runs: dict[str, Callable[[], Awaitable[float]]], repeats: int
) -> dict[str, list[float]]:
    """Rates of ``repeats`` rounds of ``runs``, each round running every one of them in turn:
    a rate and the baseline it is divided by are measured seconds apart, not minutes, so a
    ratio compares them under the same load of the machine."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(await run())
    return rates


def read_rate(read: Callable[[], Awaitable[tuple[int, float]]]) -> Callable[[], Awaitable[float]]:
    """A run of ``read`` (returning items read, seconds) as its rate in items/s."""

    async def run() -> float:
        count, seconds = await read()
        return count / seconds

    return run


class TimedReplays:
    """Replays of one request, each a rate (events/s); every run must replay all ``total``
    events and decide what the first run decided. ``last``: the last run's outcome;
    ``steal``: the share (%) of the machine's CPU time its hypervisor gave to other guests
    during each run (``CpuMeter``): how much of its cores the run did not have."""

    def __init__(self, request: ReplayRequest, total: int, kafka: KafkaSettings | None = None):
        self.request, self.total, self.kafka = request, total, kafka
        self.first: ReplayOutcome | None = None
        self.last: ReplayOutcome | None = None
        self.steal: list[float] = []

    async def run(self) -> float:
        meter = CpuMeter()
        outcome = await run_replay(self.request, kafka=self.kafka)
        self.steal.append(meter.stop()["machine_steal_pct"])
        assert outcome.primary.events == self.total, outcome.summary()
        if self.first is None:
            self.first = outcome
        assert same_decisions(outcome, self.first)
        self.last = outcome
        return outcome.primary.events / outcome.elapsed_s


async def replay_rounds(
    figures: dict[str, object],
    repeats: int,
    baseline: tuple[str, Callable[[], Awaitable[float]]],
    keys: tuple[str, str],
    request: ReplayRequest,
    total: int,
    kafka: KafkaSettings | None = None,
    also: tuple[str, ReplayRequest] | None = None,
) -> tuple[dict[str, list[float]], ReplayOutcome]:
    """``repeats`` rounds of the baseline read, ``request`` replayed in one process and
    ``request`` as asked (``keys``: the figures' names of the two replays), and ``also`` (a
    figure's name and another request) if given; records each figure's median and best, and
    the hypervisor's steal during each replay as asked (``<source>_replay_steal_pct_runs``);
    checks the replays decided alike, and returns every round's rates by name and the last
    outcome of ``request``."""
    alone = TimedReplays(replace(request, workers=1), total, kafka)
    shared = TimedReplays(request, total, kafka)
    name, read = baseline
    runs = {name: read, keys[0]: alone.run, keys[1]: shared.run}
    other = None
    if also is not None:
        other = TimedReplays(also[1], total, kafka)
        runs[also[0]] = other.run
    log(f"{request.source}: {repeats} rounds of {', '.join(runs)}")
    rates = await interleaved(runs, repeats)
    for key, values in rates.items():
        rate_figures(figures, key, values)
    figures[f"{keys[1].split('_replay')[0]}_replay_steal_pct_runs"] = shared.steal
    assert shared.last is not None and alone.last is not None
    assert same_decisions(shared.last, alone.last)
    if other is not None:
        assert other.last is not None and same_decisions(other.last, shared.last)
    return rates, shared.last


def median_ratio(rates: list[float], baselines: list[float]) -> float:
    """The median of the rounds' ratios of ``rates`` to ``baselines``."""
    return round(statistics.median(r / b for r, b in zip(rates, baselines, strict=True)), 3)


def same_decisions(one: ReplayOutcome, other: ReplayOutcome) -> bool:
    """The two replays decided the same alerts, at the same positions, in the same order."""

    def listed(outcome: ReplayOutcome) -> list[tuple[object, object]]:
        return [(i.alert.alert_id, i.position) for i in outcome.primary.alerts]

    return listed(one) == listed(other)


def best_us(convert: object, items: list[object], repeats: int = 5) -> float:
    """Best-of-``repeats`` µs per item of ``convert`` over ``items``."""
    assert callable(convert)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            convert(item)
        best = min(best, time.perf_counter() - started)
    return round(best / len(items) * 1e6, 3)


async def micro_timings(
    events: list[Telemetry], dsn: str, patients: frozenset[str]
) -> dict[str, float]:
    payloads: list[object] = [encode(event) for event in events[:20_000]]
    conn = await asyncpg.connect(dsn)
    try:
        sql, args = archive_query(Selection(patient_ids=patients), "device")
        async with conn.transaction(readonly=True):
            rows: list[object] = list(await conn.fetch(sql + " LIMIT 20000", *args))
    finally:
        await conn.close()
    return {
        "kafka_record_us": best_us(decode_record, payloads),
        "archive_row_us": best_us(event_from_row, rows),
    }


async def compress_archive(dsn: str, start: datetime, total: int) -> dict[str, object]:
    """Compress every chunk of the readings tables from ``start`` on (TimescaleDB): rows
    compressed per second (``total``: the archive's rows) and the chunks' size ratio."""
    conn = await asyncpg.connect(dsn)
    try:
        chunks = [
            row[0]
            for table in TABLES
            for row in await conn.fetch(
                "SELECT c::text FROM show_chunks($1::regclass, newer_than => $2::timestamptz) c",
                table,
                start - timedelta(days=7),
            )
        ]
        started = time.perf_counter()
        for chunk in chunks:
            await conn.execute(
                "SELECT compress_chunk($1::regclass, if_not_compressed => true)", chunk
            )
        seconds = time.perf_counter() - started
        before, after = await conn.fetchrow(
            "SELECT sum(s.before_compression_total_bytes), sum(s.after_compression_total_bytes) "
            "FROM unnest($2::text[]) AS t, chunk_compression_stats(t::regclass) AS s "
            "WHERE s.chunk_schema || '.' || s.chunk_name = ANY($1::text[])",
            chunks,
            list(TABLES),
        )
        for table in TABLES:
            await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()
    return {
        "compress_rows_per_s": round(total / seconds),
        "compression_ratio": round(float(before) / float(after), 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    env = stack_environment()
    kafka = KafkaSettings()
    dsn = env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=30)
    patients = tuple(f"bench-rp-{run}-{n}" for n in range(args.patients))
    log(f"building {args.patients} 28-day courses")
    events = []
    for n, patient in enumerate(patients):
        events += course(patient, start + timedelta(minutes=n), days=28)
    events.sort(key=lambda e: e.ingest_time)
    per_course = len(events) // len(patients)

    topic = f"bench.replay.telemetry.{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 6, 1, topic_configs={"retention.ms": "-1"})])
    figures: dict[str, object] = {
        "bench": "replay",
        "events": len(events),
        "patients": len(patients),
    }
    try:
        log(f"producing {len(events)} records to {topic}")
        await produce(topic, events, kafka)
        log("writing the archive")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        assert pool is not None
        try:
            for offset in range(0, len(events), 10_000):
                await store_telemetry(pool, events[offset : offset + 10_000])
            # What autovacuum does to an archive that is not minutes old: statistics for the
            # planner, and hint bits set, so the first read does not write every page.
            for table in TABLES:
                await pool.execute(f"VACUUM (ANALYZE) {table}")
        finally:
            await pool.close()
        conn = await asyncpg.connect(dsn)
        try:
            timescaledb = await timescaledb_enabled(conn)
            figures["archive_form"] = "compressed_chunks" if timescaledb else "sealed_days"
            figures["seal_rows_per_s"] = None
            figures["compress_rows_per_s"] = figures["compression_ratio"] = None
            if not timescaledb:
                # The courses ended two days ago: their days are sealed, as the periodic pass
                # would have sealed them by now.
                log("sealing the archive's days")
                started = time.perf_counter()
                sealed = await seal_archive(conn, seal_horizon(datetime.now(UTC)), patients)
                figures["seal_rows_per_s"] = round(sealed.rows / (time.perf_counter() - started))
                assert sealed.rows == len(events), sealed.describe()
        finally:
            await conn.close()

        figures.update(await micro_timings(events, dsn, frozenset(patients)))

        # The engine alone, over events already converted: the ceiling for any reader.
        converted = [
            (from_telemetry(e), ("kafka", hash(e.patient_id) % 6, n)) for n, e in enumerate(events)
        ]
        replay = Replay(default_rules())
        started = time.perf_counter()
        replay.feed(converted)
        engine_s = time.perf_counter() - started
        figures["engine_only_per_s"] = round(len(converted) / engine_s)
        # The recorded stream lives on in the topic and the archive only: a replay runs in a
        # process that does not hold 215,040 pydantic models (the CLI's does not; a worker
        # forked from one that did would start with its pages and its collector's work).
        total = len(events)
        del converted, replay, events
        gc.collect()

        repeats = args.repeats
        figures["repeats"] = repeats
        kafka_request = ReplayRequest(source="kafka", topic=topic, audit=False, progress=False)
        rates, outcome = await replay_rounds(
            figures,
            repeats,
            ("kafka_raw_per_s", read_rate(lambda: kafka_raw(topic, kafka))),
            ("kafka_replay_one_process_per_s", "kafka_replay_per_s"),
            kafka_request,
            total,
            kafka,
        )
        figures["workers"] = outcome.workers
        figures["kafka_ratio"] = median_ratio(rates["kafka_replay_per_s"], rates["kafka_raw_per_s"])
        figures["alerts"] = len(outcome.primary.alerts)

        pg_request = ReplayRequest(
            source="archive",
            patient_ids=frozenset(patients),
            partitions=6,
            context_time=False,
            audit=False,
            progress=False,
        )
        raw = ("pg_raw_rows_per_s", read_rate(lambda: pg_raw(dsn, frozenset(patients))))
        if timescaledb:
            # The rows as written first; of these rounds only the replay with workers is kept.
            written: dict[str, object] = {}
            before, written_outcome = await replay_rounds(
                written,
                repeats,
                raw,
                ("pg_replay_one_process_per_s", "pg_replay_rows_per_s"),
                pg_request,
                total,
            )
            log("compressing the archive's chunks")
            figures.update(await compress_archive(dsn, start, total))
            rates, compressed_outcome = await replay_rounds(
                figures,
                repeats,
                raw,
                ("pg_replay_one_process_per_s", "pg_replay_rows_per_s"),
                pg_request,
                total,
            )
            # Compression changed nothing a replay decides.
            assert same_decisions(compressed_outcome, written_outcome)
            rates["pg_replay_unsealed_rows_per_s"] = before["pg_replay_rows_per_s"]
            rate_figures(figures, "pg_replay_unsealed_rows_per_s", before["pg_replay_rows_per_s"])
            figures["pg_sealed_ratio"] = round(
                statistics.median(rates["pg_replay_rows_per_s"])
                / statistics.median(before["pg_replay_rows_per_s"]),
                3,
            )
        else:
            rates, _ = await replay_rounds(
                figures,
                repeats,
                raw,
                ("pg_replay_one_process_per_s", "pg_replay_rows_per_s"),
                pg_request,
                total,
                also=("pg_replay_unsealed_rows_per_s", replace(pg_request, sealed=False)),
            )
            figures["pg_sealed_ratio"] = median_ratio(
                rates["pg_replay_rows_per_s"], rates["pg_replay_unsealed_rows_per_s"]
            )
        figures["pg_ratio"] = median_ratio(
            rates["pg_replay_rows_per_s"], rates["pg_raw_rows_per_s"]
        )
        for key in (
            "pg_raw_rows_per_s",
            "pg_replay_rows_per_s",
            "pg_replay_unsealed_rows_per_s",
        ):
            figures[f"{key}_runs"] = [round(rate) for rate in rates[key]]

        log("one 28-day course")
        started = time.perf_counter()
        one = await run_replay(
            ReplayRequest(
                source="archive",
                patient_ids=frozenset({patients[0]}),
                partitions=6,
                context_time=False,
                audit=False,
                progress=False,
            )
        )
        figures["course_28d_events"] = one.primary.events
        figures["course_28d_s"] = round(time.perf_counter() - started, 3)
        assert one.primary.events == per_course
        started = time.perf_counter()
        window = await run_replay(
            ReplayRequest(
                source="archive",
                patient_ids=frozenset({patients[0]}),
                since=start + timedelta(days=14),
                partitions=6,
                context_time=False,
                audit=False,
                progress=False,
            )
        )
        figures["course_28d_window_s"] = round(time.perf_counter() - started, 3)
        assert window.stats.warmup_read > 0 and window.primary.events < per_course
        memory = [
            (from_telemetry(e), ("memory", None, n))
            for n, e in enumerate(course(patients[0], start, days=28))
        ]
        started = time.perf_counter()
        Replay(default_rules()).feed(memory)
        figures["course_28d_memory_s"] = round(time.perf_counter() - started, 3)
    finally:
        await admin.delete_topics([topic])
        await admin.close()
        conn = await asyncpg.connect(dsn)
        try:
            # The seal first: the rows' delete then marks no sealed day stale.
            for table in ("archive_seal", *TABLES, "archive_days"):
                await conn.execute(
                    f"DELETE FROM {table} WHERE patient_id = ANY($1::text[])", list(patients)
                )
        finally:
            await conn.close()
    figures["targets"] = {
        "kafka_replay_per_s": 100_000,
        "pg_replay_rows_per_s": 200_000,
        "course_28d_s": 1.0,
    }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20, help="28-day courses to record")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each read and replay rate (median, best)"
    )
    args = parser.parse_args()
    figures = asyncio.run(main_async(args))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
