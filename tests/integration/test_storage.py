"""The storage layer against the real database, plain PostgreSQL (``make test``, CI) or
PostgreSQL with TimescaleDB (``make test-timescale``, which sets ``VIGIL_TEST_TIMESCALEDB=1``):

- the migrations upgrade every earlier schema state to what a fresh database gets, keeping the
  rows (on TimescaleDB from states with compressed chunks too);
- the hourly temperature aggregate is what the rows say;
- TimescaleDB only: the compression policy runs in the background scheduler, a replay from
  compressed chunks decides what the uncompressed rows decide, the retention and compression
  policies follow the settings and never touch alerts, pages or the audit log, and sealing
  refuses there (compression replaces it).

Each schema state is built in a scratch schema of the stack's database (search_path first),
as the application role, and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.ingest.adapters.postgres import store_telemetry
from tests.polling import eventually
from vigil.db.migrate import apply_migrations, migration_names, timescaledb_enabled
from vigil.db.storage import READINGS_TABLES, TEMPERATURE_HOURLY, StorageSettings
from vigil.db.storage import apply_storage_policies as apply_policies
from vigil_tools.replay import seal
from vigil_tools.replay.cli import main as replay_main
from vigil_tools.replay.service import ReplayOutcome, ReplayRequest, run_replay
from vigil_tools.replay.synthetic import FeverEpisode, course

pytestmark = pytest.mark.stack

#: Set by ``make test-timescale``: the stack's PostgreSQL must have TimescaleDB.
EXPECT_TIMESCALEDB = os.environ.get("VIGIL_TEST_TIMESCALEDB") == "1"


@dataclass
class Database:
    dsn: str
    timescaledb: bool


@pytest.fixture(scope="module")
async def database(pg_dsn: str) -> Database:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return Database(pg_dsn, await timescaledb_enabled(conn))
    finally:
        await conn.close()


@pytest.fixture
def timescaledb(database: Database) -> Database:
    if not database.timescaledb:
        pytest.skip("plain PostgreSQL: TimescaleDB only (make test-timescale)")
    return database


async def test_the_stack_database_is_the_kind_this_run_asked_for(database: Database) -> None:
    """``make test`` (and CI) runs on plain PostgreSQL, ``make test-timescale`` on TimescaleDB;
    a stack of the wrong kind would test the other path without anyone noticing."""
    conn = await asyncpg.connect(database.dsn)
    try:
        available = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
    finally:
        await conn.close()
    assert database.timescaledb is EXPECT_TIMESCALEDB
    assert bool(available) is EXPECT_TIMESCALEDB


# --- TimescaleDB, first: before the upgrades make and drop jobs ---------------------------


async def store_course(dsn: str, patient: str, start: datetime, days: int) -> int:
    events = course(
        patient,
        start,
        days=days,
        fevers=(FeverEpisode(timedelta(days=1, hours=2), timedelta(minutes=100), 38.7),),
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        await store_telemetry(pool, events)
    finally:
        await pool.close()
    return len(events)


async def delete_patient(dsn: str, patient: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in READINGS_TABLES:
            await conn.execute(f"DELETE FROM {table} WHERE patient_id = $1", patient)
    finally:
        await conn.close()


async def test_the_compression_policy_runs_in_the_background_scheduler(
    timescaledb: Database,
) -> None:
    """The readings' compression policy, started by TimescaleDB's own scheduler (not ``CALL
    run_job``), succeeds and compresses the chunks older than its setting."""
    patient = f"compress-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=40)
    await store_course(timescaledb.dsn, patient, start, days=2)
    conn = await asyncpg.connect(timescaledb.dsn)
    try:
        job, runs = await conn.fetchrow(
            "SELECT j.job_id, coalesce(s.total_runs, 0) FROM timescaledb_information.jobs j "
            "LEFT JOIN timescaledb_information.job_stats s USING (job_id) "
            "WHERE j.proc_name = 'policy_compression' "
            "AND j.hypertable_name = 'temperature_readings'"
        )
        await conn.execute("SELECT alter_job($1, next_start => now())", job)

        async def finished() -> str | None:
            row = await conn.fetchrow(
                "SELECT total_runs, last_run_status, job_status "
                "FROM timescaledb_information.job_stats WHERE job_id = $1",
                job,
            )
            # The run's status is written after its count: finished once both are there.
            done = row is not None and row[0] > runs and row[2] != "Running" and row[1] is not None
            return str(row[1]) if done else None

        status = await eventually(
            finished, timeout_s=60, interval_s=0.2, what=f"compression job {job} to run"
        )
        errors = await conn.fetch(
            "SELECT err_message FROM timescaledb_information.job_history "
            "WHERE job_id = $1 AND NOT succeeded",
            job,
        )
        assert status == "Success", [row[0] for row in errors]
        uncompressed = await conn.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'temperature_readings' AND NOT is_compressed "
            "AND range_end <= $1",
            start + timedelta(days=3),
        )
        assert uncompressed == 0
    finally:
        await conn.close()
        await delete_patient(timescaledb.dsn, patient)


def decisions(outcome: ReplayOutcome) -> list[tuple[str, object]]:
    return [(i.alert.model_dump_json(), i.position) for i in outcome.primary.alerts]


async def test_a_replay_from_compressed_chunks_decides_what_the_rows_decide(
    timescaledb: Database,
) -> None:
    """The same archive replayed before and after its chunks are compressed: the same events,
    the same alerts at the same positions (compression is lossless and keeps the order)."""
    patient = f"compressed-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=60)
    stored = await store_course(timescaledb.dsn, patient, start, days=3)
    request = ReplayRequest(
        source="archive",
        patient_ids=frozenset({patient}),
        partitions=6,
        context_time=False,
        audit=False,
        progress=False,
        workers=1,
    )
    try:
        before = await run_replay(request)
        conn = await asyncpg.connect(timescaledb.dsn)
        try:
            for table in READINGS_TABLES:
                await conn.execute(
                    f"SELECT compress_chunk(c, if_not_compressed => true) "
                    f"FROM show_chunks('{table}', older_than => $1::timestamptz) c",
                    start + timedelta(days=14),
                )
            # Every chunk holding the course (pump events too, where it has any) compressed.
            chunks = await conn.fetch(
                "SELECT hypertable_name, is_compressed FROM timescaledb_information.chunks "
                "WHERE hypertable_schema = current_schema() "
                "AND hypertable_name = ANY($3::text[]) AND range_start < $2 AND range_end > $1",
                start,
                start + timedelta(days=3),
                list(READINGS_TABLES),
            )
            assert {row[0] for row in chunks} >= {"temperature_readings", "pump_status"}
            assert all(row[1] for row in chunks), chunks
        finally:
            await conn.close()
        after = await run_replay(request)
        assert before.primary.events == after.primary.events == stored
        assert decisions(before) and decisions(after) == decisions(before)
    finally:
        await delete_patient(timescaledb.dsn, patient)


async def test_the_policies_follow_the_settings_and_spare_alerts_and_the_audit_log(
    timescaledb: Database,
) -> None:
    """Retention set: a drop policy on the three readings tables and the hourly aggregate and
    on nothing else; compression after the set days; back to the defaults: no drop policy."""
    conn = await asyncpg.connect(timescaledb.dsn)
    try:

        async def policies(proc: str) -> dict[str, str]:
            rows = await conn.fetch(
                "SELECT hypertable_name, config::text FROM timescaledb_information.jobs "
                "WHERE proc_name = $1 AND hypertable_schema = current_schema()",
                proc,
            )
            return {row[0]: row[1] for row in rows}

        try:
            await apply_policies(
                conn, StorageSettings(readings_retention_days=400, compress_after_days=3)
            )
            dropping = await policies("policy_retention")
            assert set(dropping) == {*READINGS_TABLES, TEMPERATURE_HOURLY}
            assert all('"drop_after": "400 days"' in config for config in dropping.values())
            compressing = await policies("policy_compression")
            assert set(compressing) == set(READINGS_TABLES)
            assert all('"compress_after": "3 days"' in c for c in compressing.values())
        finally:
            await apply_policies(conn, StorageSettings())
        assert await policies("policy_retention") == {}
        assert all(
            '"compress_after": "7 days"' in c
            for c in (await policies("policy_compression")).values()
        )
        # Nothing but the readings and their aggregate is a hypertable a policy could drop.
        hypertables = {
            row[0]
            for row in await conn.fetch(
                "SELECT hypertable_name FROM timescaledb_information.hypertables "
                "WHERE hypertable_schema = current_schema()"
            )
        }
        assert hypertables == set(READINGS_TABLES)
    finally:
        await conn.close()


async def test_sealing_refuses_on_timescaledb(
    timescaledb: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The readings are hypertables there (no transition-table triggers keep sealed days true
    to the rows); the archive's fast path is compression, so sealing refuses, loudly."""
    conn = await asyncpg.connect(timescaledb.dsn)
    try:
        assert not await seal.sealing_available(conn)
        with pytest.raises(seal.SealingUnavailable):
            await seal.seal_archive(conn, seal.seal_horizon(datetime.now(UTC)), ["nobody"])
    finally:
        await conn.close()
    capsys.readouterr()
    assert await asyncio.to_thread(replay_main, ["seal", "--patient", "nobody"]) == 2
    assert "no sealing triggers" in capsys.readouterr().err


# --- upgrades -------------------------------------------------------------------------------


async def scratch_connect(dsn: str, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"search_path": f"{schema}, public"})


@pytest.fixture
async def scratch(database: Database) -> AsyncIterator[list[str]]:
    """Names of scratch schemas the test creates; all dropped at the end."""
    made: list[str] = []
    yield made
    conn = await asyncpg.connect(database.dsn)
    try:
        for schema in made:
            if database.timescaledb:
                # The scheduler may be running one of the schema's policies right now: their
                # jobs are unscheduled first, and deleted once none of them runs (a job
                # deleted while the scheduler starts it can stop the scheduler).
                await conn.execute(
                    "SELECT alter_job(job_id, scheduled => false) "
                    "FROM timescaledb_information.jobs WHERE hypertable_schema = $1",
                    schema,
                )

                async def idle(schema: str = schema) -> bool | None:
                    running = await conn.fetchval(
                        "SELECT count(*) FROM timescaledb_information.job_stats "
                        "WHERE hypertable_schema = $1 AND job_status = 'Running'",
                        schema,
                    )
                    return True if running == 0 else None

                await eventually(
                    idle, timeout_s=60, interval_s=0.2, what=f"the jobs of {schema} to finish"
                )
                await conn.execute(
                    "SELECT delete_job(job_id) FROM timescaledb_information.jobs "
                    "WHERE hypertable_schema = $1",
                    schema,
                )
            async with conn.transaction():
                for table in READINGS_TABLES:
                    if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.{table}"):
                        await conn.execute(f"LOCK TABLE {schema}.{table} IN ACCESS EXCLUSIVE MODE")
                await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


async def new_schema(database: Database, made: list[str]) -> str:
    schema = f"mig_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(database.dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    made.append(schema)
    return schema


async def migrate_in(database: Database, schema: str, upto: str | None = None) -> list[str]:
    """The migrator on ``schema`` (its objects go there, the extension's functions resolve)."""
    # The migrator connects by DSN alone; asyncpg sends a DSN's unknown query parameters as
    # server settings, so the search path travels in the DSN.
    assert "?" not in database.dsn
    scoped = f"{database.dsn}?search_path={schema}%2Cpublic"
    return await apply_migrations(scoped, upto=upto, storage=StorageSettings())


def _normalise(text: str, schema: str) -> str:
    text = text.replace(f"{schema}.", "S.")
    # TimescaleDB's internal ids differ between two databases built along different paths.
    return re.sub(r"_(materialized_hypertable|hyper|compress_hyper)_\d+(_\d+)?", r"_\1_N", text)


async def fingerprint(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """What a migration makes in ``schema``, without names that depend on the path taken."""
    oid = await conn.fetchval("SELECT oid FROM pg_namespace WHERE nspname = $1", schema)
    columns = await conn.fetch(
        """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = $1
        ORDER BY table_name, column_name
        """,
        schema,
    )
    indexes = await conn.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = $1 ORDER BY 1, 2",
        schema,
    )
    constraints = await conn.fetch(
        """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid)
        FROM pg_constraint AS k JOIN pg_class AS c ON c.oid = k.conrelid
        WHERE c.relnamespace = $1 ORDER BY 1, 2
        """,
        oid,
    )
    triggers = await conn.fetch(
        """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
        WHERE c.relnamespace = $1 AND NOT t.tgisinternal ORDER BY 1, 2
        """,
        oid,
    )
    functions = await conn.fetch(
        "SELECT proname, md5(prosrc) FROM pg_proc WHERE pronamespace = $1 ORDER BY 1", oid
    )
    relations = await conn.fetch(
        "SELECT relname, relkind::text FROM pg_class WHERE relnamespace = $1 AND relkind IN "
        "('r', 'v', 'm', 'p') ORDER BY 1",
        oid,
    )
    migrations = await conn.fetch(f"SELECT name, sha256 FROM {schema}.schema_migrations ORDER BY 1")
    found: dict[str, Any] = {
        name: [tuple(_normalise(str(v), schema) for v in row) for row in rows]
        for name, rows in (
            ("columns", columns),
            ("indexes", indexes),
            ("constraints", constraints),
            ("triggers", triggers),
            ("functions", functions),
            ("relations", relations),
            ("migrations", migrations),
        )
    }
    if await timescaledb_enabled(conn):
        found["hypertables"] = [
            tuple(row)
            for row in await conn.fetch(
                "SELECT hypertable_name, compression_enabled, num_dimensions "
                "FROM timescaledb_information.hypertables WHERE hypertable_schema = $1 "
                "ORDER BY 1",
                schema,
            )
        ]
        found["compression"] = [
            tuple(row)
            for row in await conn.fetch(
                "SELECT hypertable_name, attname, segmentby_column_index, "
                "orderby_column_index, orderby_asc "
                "FROM timescaledb_information.compression_settings "
                "WHERE hypertable_schema = $1 ORDER BY 1, 2",
                schema,
            )
        ]
        found["jobs"] = [
            tuple(row)
            for row in await conn.fetch(
                "SELECT proc_name, hypertable_name, "
                "(config - 'hypertable_id' - 'mat_hypertable_id')::text, schedule_interval "
                "FROM timescaledb_information.jobs WHERE hypertable_schema = $1 ORDER BY 1, 2",
                schema,
            )
        ]
        found["aggregates"] = [
            tuple(row)
            for row in await conn.fetch(
                "SELECT view_name, materialized_only FROM "
                "timescaledb_information.continuous_aggregates WHERE view_schema = $1",
                schema,
            )
        ]
    return found


OLD = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # weeks before any test: a chunk of its own


async def seed_readings(conn: asyncpg.Connection, schema: str) -> int:
    """Two readings, if the readings table exists yet; on TimescaleDB with compression on (the
    states 0001 and 0002 leave), the old one's chunk is compressed, as a policy would have."""
    if not await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{schema}.temperature_readings"
    ):
        return 0
    for moment in (OLD, datetime.now(UTC) - timedelta(hours=2)):
        await conn.execute(
            f"""
            INSERT INTO {schema}.temperature_readings (device_time, ingest_time, patient_id,
                device_id, message_id, seq, value_c, original_value, original_unit, site)
            VALUES ($1, $1, 'P-up', 'T-up', $2, 1, 38.6, 38.6, 'C', 'axillary')
            """,
            moment,
            uuid.uuid4(),
        )
    if await timescaledb_enabled(conn):
        compressed = await conn.fetchval(
            "SELECT compression_enabled FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = $1 AND hypertable_name = 'temperature_readings'",
            schema,
        )
        if compressed:
            # The schema's own policy (0001's) may have compressed it already.
            await conn.execute(
                "SELECT compress_chunk(c, if_not_compressed => true) "
                "FROM show_chunks($1::regclass, older_than => $2::timestamptz) c",
                f"{schema}.temperature_readings",
                OLD + timedelta(days=30),
            )
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM timescaledb_information.chunks WHERE is_compressed "
                    "AND hypertable_schema = $1 AND hypertable_name = 'temperature_readings'",
                    schema,
                )
                == 1
            )
    return 2


async def test_a_fresh_schema_applies_every_migration_once(
    database: Database, scratch: list[str]
) -> None:
    schema = await new_schema(database, scratch)
    assert await migrate_in(database, schema) == migration_names()
    assert await migrate_in(database, schema) == []
    conn = await scratch_connect(database.dsn, schema)
    try:
        prints = await fingerprint(conn, schema)
        columns = {(row[0], row[1]) for row in prints["columns"]}
        assert {(t, "stored_at") for t in READINGS_TABLES} <= columns
        if database.timescaledb:
            assert {row[0] for row in prints["hypertables"] if row[1]} == set(READINGS_TABLES)
            # 0012: the unique key's message_id is in the compression order (no warning).
            orderby = {(row[0], row[1]) for row in prints["compression"] if row[3] is not None}
            assert {(t, "message_id") for t in READINGS_TABLES} <= orderby
            assert prints["aggregates"] == [(TEMPERATURE_HOURLY, False)]
        else:
            assert ("temperature_hourly", "v") in prints["relations"]
    finally:
        await conn.close()


@pytest.mark.parametrize("upto", migration_names()[:-1])
async def test_every_earlier_schema_state_upgrades_to_the_fresh_schema(
    database: Database, scratch: list[str], upto: str
) -> None:
    """A schema migrated up to ``upto`` (with readings in it, compressed on TimescaleDB where
    that state compresses) is migrated to the end: the same tables, columns, keys, indexes,
    triggers, functions and TimescaleDB settings and policies as a fresh schema, the readings
    all there."""
    fresh = await new_schema(database, scratch)
    await migrate_in(database, fresh)
    older = await new_schema(database, scratch)
    names = migration_names()
    assert await migrate_in(database, older, upto=upto) == names[: names.index(upto) + 1]
    conn = await scratch_connect(database.dsn, older)
    try:
        seeded = await seed_readings(conn, older)
    finally:
        await conn.close()
    assert await migrate_in(database, older) == names[names.index(upto) + 1 :]
    conn = await scratch_connect(database.dsn, older)
    try:
        upgraded = await fingerprint(conn, older)
        assert await conn.fetchval(f"SELECT count(*) FROM {older}.temperature_readings") == seeded
        if seeded:
            assert (
                await conn.fetchval(
                    f"SELECT count(*) FROM {older}.temperature_readings WHERE stored_at IS NOT NULL"
                )
                == seeded
            )
            hourly = await conn.fetchval(f"SELECT sum(readings) FROM {older}.temperature_hourly")
            assert hourly == seeded
        conn_fresh = await scratch_connect(database.dsn, fresh)
        try:
            expected = await fingerprint(conn_fresh, fresh)
        finally:
            await conn_fresh.close()
    finally:
        await conn.close()
    for part, rows in expected.items():
        assert upgraded[part] == rows, part


# --- the hourly aggregate -------------------------------------------------------------------


async def test_the_hourly_temperature_aggregate_is_what_the_rows_say(database: Database) -> None:
    """Count, min, max and mean per UTC hour of one patient's readings, from the aggregate and
    from the rows, agree. On plain PostgreSQL the aggregate is a view. On TimescaleDB the
    newest hours (after the aggregate's materialized part) come from the rows at once, and a
    day written late (below what is materialized) shows once the aggregate is refreshed, as
    its policy does every few minutes."""
    patient = f"hourly-{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    events = course(
        patient,
        start,
        days=1,
        fevers=(FeverEpisode(timedelta(hours=5), timedelta(minutes=90), 38.9),),
    )
    pool = await asyncpg.create_pool(database.dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        await store_telemetry(pool, events)
    finally:
        await pool.close()
    expected_sql = """
        SELECT date_bin(INTERVAL '1 hour', device_time, TIMESTAMPTZ '2000-01-03 00:00:00+00'),
               count(*), min(value_c), max(value_c), avg(value_c)
        FROM temperature_readings WHERE patient_id = $1 GROUP BY 1 ORDER BY 1
    """
    aggregate_sql = (
        "SELECT bucket, readings, min_c, max_c, mean_c FROM temperature_hourly "
        "WHERE patient_id = $1 ORDER BY bucket"
    )
    conn = await asyncpg.connect(database.dsn)
    try:
        # A reading of the current hour, as a device sends it now.
        now = datetime.now(UTC)
        await conn.execute(
            """
            INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id,
                message_id, seq, value_c, original_value, original_unit, site)
            VALUES ($1, $1, $2, 'th-hourly', $3, 1, 37.4, 37.4, 'C', 'axillary')
            """,
            now,
            patient,
            uuid.uuid4(),
        )
        expected = [tuple(row) for row in await conn.fetch(expected_sql, patient)]
        assert len(expected) >= 25 and max(row[3] for row in expected) >= 38.9
        found = [tuple(row) for row in await conn.fetch(aggregate_sql, patient)]
        assert found and found[-1][:2] == expected[-1][:2]  # the current hour, at once
        if database.timescaledb:
            await conn.execute(
                "CALL refresh_continuous_aggregate("
                "'temperature_hourly', $1::timestamptz, $2::timestamptz)",
                start - timedelta(hours=1),
                start + timedelta(days=2),
            )
            materialized = await conn.fetchval(
                "SELECT count(*) FROM _timescaledb_internal."
                + await conn.fetchval(
                    "SELECT materialization_hypertable_name FROM "
                    "timescaledb_information.continuous_aggregates WHERE view_name = $1",
                    TEMPERATURE_HOURLY,
                )
                + " WHERE patient_id = $1",
                patient,
            )
            assert materialized >= 24
            found = [tuple(row) for row in await conn.fetch(aggregate_sql, patient)]
        assert [r[:4] for r in found] == [r[:4] for r in expected]
        assert all(abs(a[4] - b[4]) < 1e-9 for a, b in zip(found, expected, strict=True))
    finally:
        await conn.execute("DELETE FROM temperature_readings WHERE patient_id = $1", patient)
        await conn.execute("DELETE FROM pump_status WHERE patient_id = $1", patient)
        await conn.execute("DELETE FROM pump_events WHERE patient_id = $1", patient)
        await conn.close()
