"""Sealed archive days against the real PostgreSQL: a replay through sealed days decides exactly
what the rows decide; the triggers make a changed day stale in the writer's transaction; a seal
waits for a write in flight; ``verify_seals`` finds a sealed day that differs from its rows.

The module's patients are its own (sealing is per patient), four of them over three days five
days ago: two share an engine lane and report at the same device and ingest times, so merging
their sealed days relies on the device id to break the ties.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from schemas.events import Telemetry
from services.ingest.adapters.postgres import store_telemetry
from tests.polling import eventually
from vigil.db.migrate import timescaledb_enabled
from vigil_tools.replay import seal
from vigil_tools.replay.cli import main as replay_main
from vigil_tools.replay.engine_port import PinnedRules
from vigil_tools.replay.service import ReplayOutcome, ReplayRequest, RulesChoice, run_replay
from vigil_tools.replay.sources import day_of, day_start
from vigil_tools.replay.synthetic import FeverEpisode, PumpPause, course

pytestmark = pytest.mark.stack

PARTITIONS = 6


@dataclass
class Archive:
    dsn: str
    patients: tuple[str, ...]
    start: datetime
    events: list[Telemetry]


def lane_mates(run: str) -> tuple[str, ...]:
    """Four patient ids, the first two on one engine lane, the other two on lanes of their own."""
    lane = PinnedRules.partitioner(PARTITIONS)
    names = [f"sd-{run}-{n}" for n in range(1000)]
    first = names[0]
    mate = next(n for n in names[1:] if lane(n) == lane(first))
    others: dict[int, str] = {}
    for name in names[1:]:
        if lane(name) != lane(first):
            others.setdefault(lane(name), name)
    two = list(others.values())[:2]
    return (first, mate, *two)


@pytest.fixture(scope="module")
async def archive(stack_env: dict[str, str]) -> AsyncIterator[Archive]:
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        if await timescaledb_enabled(conn):
            pytest.skip(
                "TimescaleDB: the readings are hypertables without sealing triggers; "
                "compression replaces sealed days there (tests/integration/test_storage.py)"
            )
    finally:
        await conn.close()
    run = uuid.uuid4().hex[:8]
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=5)
    patients = lane_mates(run)
    fevers = (
        FeverEpisode(timedelta(days=1, hours=2), timedelta(minutes=100), 38.1),
        FeverEpisode(timedelta(days=1, hours=23, minutes=30), timedelta(minutes=70), 38.7),
    )
    events: list[Telemetry] = []
    for n, patient in enumerate(patients):
        shift = timedelta(0) if n < 2 else timedelta(minutes=7 * n)  # the mates tie
        # The mates' devices sort the other way round from the mates themselves, so the
        # device id, not the order the sealed days are read in, must break their ties.
        rank = f"{2 - n}-" if n < 2 else ""
        events += course(
            patient,
            start + shift,
            thermometer_id=f"th-{rank}{patient}",
            pump_id=f"pu-{rank}{patient}",
            days=3,
            fevers=fevers,
            pauses=(PumpPause(timedelta(days=1, hours=9), timedelta(minutes=45)),),
        )
    events.sort(key=lambda e: (e.ingest_time, e.patient_id))
    pool = await asyncpg.create_pool(stack_env["VIGIL_PG_DSN"], min_size=1, max_size=2)
    assert pool is not None
    try:
        for offset in range(0, len(events), 5000):
            await store_telemetry(pool, events[offset : offset + 5000])
    finally:
        await pool.close()
    yield Archive(stack_env["VIGIL_PG_DSN"], patients, start, events)


def reading(patient: str, moment: datetime, ingest: datetime, celsius: float) -> Telemetry:
    device = f"th-{patient}"
    return Telemetry.model_validate(
        {
            "patient_id": patient,
            "device_id": device,
            "mqtt_topic": f"vigil/v1/dev/{device}/temperature",
            "ingest_time": ingest,
            "message": {
                "schema": "vigil.device.temperature.v1",
                "message_id": str(uuid.uuid4()),
                "device_id": device,
                "seq": 10**9,
                "device_time": moment,
                "value": celsius,
                "unit": "C",
                "site": "axillary",
            },
            "temperature_c": celsius,
        }
    )


def decisions(outcome: ReplayOutcome) -> dict[str, object]:
    return {
        "alerts": [(i.alert.model_dump_json(), i.position) for i in outcome.primary.alerts],
        "warmup": [(i.alert.model_dump_json(), i.position) for i in outcome.primary.warmup_alerts],
        "candidate": (
            [(i.alert.model_dump_json(), i.position) for i in outcome.candidate.alerts]
            if outcome.candidate
            else None
        ),
        "events": outcome.primary.events,
        "span": (outcome.primary.first_device_time, outcome.primary.last_device_time),
        "stats": (outcome.stats.read, outcome.stats.admitted, outcome.stats.warmup_read),
    }


def request(archive: Archive, **changes: object) -> ReplayRequest:
    base = ReplayRequest(
        source="archive",
        patient_ids=frozenset(archive.patients),
        partitions=PARTITIONS,
        context_time=False,
        candidate=RulesChoice(what_if=(("fever_single_c", 38.0),)),
        audit=False,
        progress=False,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def sealed_and_not(replay: ReplayRequest) -> tuple[ReplayOutcome, ReplayOutcome]:
    sealed = await run_replay(replace(replay, sealed=True))
    rows = await run_replay(replace(replay, sealed=False))
    assert rows.stats.sealed == 0
    return sealed, rows


async def seal_now(conn: asyncpg.Connection, archive: Archive) -> seal.SealStats:
    return await seal.seal_archive(conn, seal.seal_horizon(datetime.now(UTC)), archive.patients)


async def test_sealed_days_replay_to_exactly_what_the_rows_decide(archive: Archive) -> None:
    """Whole, from mid-stream with warm-up, cut mid-day at both ends, in one process and in
    workers: alert for alert, position for position, what the rows decide, and every event
    read from a sealed day."""
    conn = await asyncpg.connect(archive.dsn)
    try:
        stats = await seal_now(conn, archive)
        days = {(e.patient_id, e.device_time.astimezone(UTC).date()) for e in archive.events}
        assert (stats.rows, stats.days) == (len(archive.events), len(days))
        assert await seal.verify_seals(conn, archive.patients) == []
        again = await seal_now(conn, archive)
        assert (again.days, again.rows) == (0, 0)  # nothing new to seal
    finally:
        await conn.close()
    fever = archive.start + timedelta(days=1, hours=3)
    requests = (
        request(archive),
        request(archive, since=fever),
        request(archive, since=fever, until=archive.start + timedelta(days=2, hours=1)),
        request(archive, since=fever, warmup=False),
    )
    for replay in requests:
        for workers in (1, 3):
            sealed, rows = await sealed_and_not(replace(replay, workers=workers))
            assert decisions(sealed) == decisions(rows)
            assert sealed.stats.sealed == sealed.stats.read + sealed.stats.warmup_read > 0
            assert sealed.primary.alerts and sealed.candidate and sealed.candidate.alerts
    # The two lane mates share device and ingest times: the ties are there to break.
    mates = [e for e in archive.events if e.patient_id in archive.patients[:2]]
    assert len({(e.device_time, e.ingest_time) for e in mates}) < len(mates)


async def test_a_late_reading_makes_its_day_stale_until_sealed_again(archive: Archive) -> None:
    """A fever reading stored late for a sealed day marks that day stale in its own
    transaction; the replay reads the day from the rows (and so sees the new fever), and the
    next pass seals it again with the reading."""
    conn = await asyncpg.connect(archive.dsn)
    try:
        await seal_now(conn, archive)
        patient = archive.patients[2]
        before = await run_replay(request(archive, patient_ids=frozenset({patient})))
        moment = archive.start + timedelta(days=2, hours=12, minutes=1)
        late = reading(patient, moment, datetime.now(UTC), 39.4)
        pool = await asyncpg.create_pool(archive.dsn, min_size=1, max_size=1)
        assert pool is not None
        try:
            await store_telemetry(pool, [late])
        finally:
            await pool.close()
        stale = await conn.fetch(
            "SELECT day FROM archive_days WHERE patient_id = $1 AND body IS NULL", patient
        )
        assert [row["day"] for row in stale] == [moment.date()]
        sealed, rows = await sealed_and_not(request(archive, patient_ids=frozenset({patient})))
        assert decisions(sealed) == decisions(rows)
        assert 0 < sealed.stats.sealed < sealed.stats.read
        assert len(sealed.primary.alerts) > len(before.primary.alerts)
        assert any(
            i.alert.device_time == moment and i.alert.code.startswith("fever")
            for i in sealed.primary.alerts
        )
        again = await seal_now(conn, archive)
        that_day = [
            e
            for e in archive.events
            if e.patient_id == patient and e.device_time.date() == moment.date()
        ]
        assert (again.days, again.rows) == (1, len(that_day) + 1)
        assert await seal.verify_seals(conn, [patient]) == []
        resealed = await run_replay(request(archive, patient_ids=frozenset({patient})))
        assert resealed.stats.sealed == resealed.stats.read
        assert decisions(resealed) == decisions(rows)
    finally:
        await conn.close()


async def test_deleted_rows_make_their_day_stale_and_an_emptied_day_goes(
    archive: Archive,
) -> None:
    """Deleting a sealed day's rows (as retention would) marks it stale; once every row of
    the day is gone the next pass removes its entry; the replay never reads deleted rows."""
    conn = await asyncpg.connect(archive.dsn)
    try:
        await seal_now(conn, archive)
        patient = archive.patients[3]
        first_day = day_of(
            min(e.device_time for e in archive.events if e.patient_id == patient).timestamp()
        )
        deleted = 0
        for table in ("temperature_readings", "pump_status", "pump_events"):
            status = await conn.execute(
                f"DELETE FROM {table} WHERE patient_id = $1 AND device_time < $2",
                patient,
                day_start(first_day + timedelta(days=1)),
            )
            deleted += int(status.split()[-1])
        assert deleted > 0
        assert await conn.fetchval(
            "SELECT body IS NULL FROM archive_days WHERE patient_id = $1 AND day = $2",
            patient,
            first_day,
        )
        sealed, rows = await sealed_and_not(request(archive, patient_ids=frozenset({patient})))
        assert decisions(sealed) == decisions(rows)
        assert (
            rows.stats.read == sum(1 for e in archive.events if e.patient_id == patient) - deleted
        )
        again = await seal_now(conn, archive)
        assert (again.days, again.emptied) == (0, 1)
        assert not await conn.fetchval(
            "SELECT count(*) FROM archive_days WHERE patient_id = $1 AND day = $2",
            patient,
            first_day,
        )
        assert await seal.verify_seals(conn, [patient]) == []
    finally:
        await conn.close()


async def test_verify_names_a_sealed_day_that_differs_from_its_rows(archive: Archive) -> None:
    """A body swapped for another day's (written around the triggers), and a sealed day's
    entry removed, are both named; the other days are not."""
    conn = await asyncpg.connect(archive.dsn)
    try:
        await seal_now(conn, archive)
        patient = archive.patients[0]
        days: list[date] = [
            row["day"]
            for row in await conn.fetch(
                "SELECT day FROM archive_days WHERE patient_id = $1 AND body IS NOT NULL "
                "ORDER BY day",
                patient,
            )
        ]
        assert len(days) == 3
        body, count = await conn.fetchrow(
            "SELECT body, rows FROM archive_days WHERE patient_id = $1 AND day = $2",
            patient,
            days[0],
        )
        await conn.execute(
            "UPDATE archive_days SET body = $3, rows = $4 WHERE patient_id = $1 AND day = $2",
            patient,
            days[1],
            body,
            count,
        )
        await conn.execute(
            "DELETE FROM archive_days WHERE patient_id = $1 AND day = $2", patient, days[2]
        )
        problems = await seal.verify_seals(conn, [patient])
        assert [(p.day, p.problem.split()[-1]) for p in problems] == [
            (days[1], "rows"),
            (days[2], "sealed"),
        ]
        # Mended by marking both days stale: the next pass seals them again from the rows.
        await conn.execute(
            "INSERT INTO archive_days (patient_id, day) SELECT $1, unnest($2::date[]) "
            "ON CONFLICT (patient_id, day) DO UPDATE "
            "SET rows = NULL, format = NULL, body = NULL",
            patient,
            days[1:],
        )
        assert (await seal_now(conn, archive)).days == 2
        assert await seal.verify_seals(conn, [patient]) == []
    finally:
        await conn.close()


async def test_a_seal_waits_for_a_write_in_flight_and_reads_it(archive: Archive) -> None:
    """A patient's first seal, while a transaction that wrote one of the patient's rows is
    still open: the seal waits for it (the trigger holds the patient's shared lock) and seals
    the row once it is committed."""
    patient = f"sd-late-{uuid.uuid4().hex[:8]}"
    moment = archive.start + timedelta(hours=5)
    device = f"th-{patient}"
    writer = await asyncpg.connect(archive.dsn)
    sealer = await asyncpg.connect(archive.dsn)
    try:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute(
            "INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id, "
            "message_id, seq, value_c, original_value, original_unit, site) "
            "VALUES ($1, $2, $3, $4, $5, 1, 36.9, 36.9, 'C', 'axillary')",
            moment,
            moment + timedelta(seconds=2),
            patient,
            device,
            uuid.uuid4(),
        )
        sealing = asyncio.ensure_future(
            seal.seal_archive(sealer, seal.seal_horizon(datetime.now(UTC)), [patient])
        )
        # The sealer is seen waiting on a lock (the writer's), not merely not finished yet.
        sealer_pid = sealer.get_server_pid()
        watcher = await asyncpg.connect(archive.dsn)
        try:
            await eventually(
                lambda: watcher.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    sealer_pid,
                ),
                timeout_s=30,
                what="the seal to wait for the writer's lock",
            )
        finally:
            await watcher.close()
        assert not sealing.done()
        await transaction.commit()
        stats = await asyncio.wait_for(sealing, 30)
        assert (stats.days, stats.rows) == (1, 1)
        assert await seal.verify_seals(sealer, [patient]) == []
    finally:
        await writer.execute("DELETE FROM temperature_readings WHERE patient_id = $1", patient)
        await sealer.execute("DELETE FROM archive_days WHERE patient_id = $1", patient)
        await sealer.execute("DELETE FROM archive_seal WHERE patient_id = $1", patient)
        await writer.close()
        await sealer.close()


async def test_the_seal_command_seals_and_verifies(
    archive: Archive, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vigil replay seal`` seals a patient's finished days (here: none left to seal, the
    others' passes sealed them) and ``--verify`` exits 0 on days that match their rows, 1 on
    one that does not."""
    patient = archive.patients[0]
    assert await asyncio.to_thread(replay_main, ["seal", "--patient", patient]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["patients"] == 1 and summary["sealed_until"]
    assert await asyncio.to_thread(replay_main, ["seal", "--verify", "--patient", patient]) == 0
    conn = await asyncpg.connect(archive.dsn)
    try:
        day = await conn.fetchval(
            "SELECT min(day) FROM archive_days WHERE patient_id = $1 AND body IS NOT NULL",
            patient,
        )
        await conn.execute(
            "UPDATE archive_days SET rows = rows + 1 WHERE patient_id = $1 AND day = $2",
            patient,
            day,
        )
        verify = ["seal", "--verify", "--patient", patient]
        assert await asyncio.to_thread(replay_main, verify) == 1
        assert f"{patient} {day.isoformat()}:" in capsys.readouterr().out
        await conn.execute(
            "UPDATE archive_days SET rows = NULL, format = NULL, body = NULL "
            "WHERE patient_id = $1 AND day = $2",
            patient,
            day,
        )
        assert await asyncio.to_thread(replay_main, ["seal", "--patient", patient]) == 0
        assert await asyncio.to_thread(replay_main, verify) == 0
    finally:
        await conn.close()
