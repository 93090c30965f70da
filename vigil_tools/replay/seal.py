"""Sealed archive days: each patient's readings of a finished UTC day, stored once more as one
value in the replay's order, so that a replay reads the day without the server sorting and
sending its rows one by one (migration ``0011_archive_sealed_days``).

The readings tables stay the record. A sealed day is derived from them, and the triggers of
0011 mark it stale in the same transaction as any change to its rows, so a replay never reads a
sealed day that differs from the rows; it reads a stale day from the rows, and the next sealing
pass seals it again. ``verify_seals`` re-derives every sealed day from the rows and names any
that differ.

Sealing a patient holds the patient's exclusive advisory lock (the triggers take the shared
one) and reads in READ COMMITTED: a write of the patient's rows in flight is waited for and then
read; a write that comes during the seal waits, then sees the new ``sealed_until`` and marks its
day stale. The triggers read ``sealed_until`` with a fresh snapshot per statement, as writers
in READ COMMITTED do (ingest's do).

With TimescaleDB the readings tables are hypertables, compressed by TimescaleDB itself; 0011
makes no triggers there, and sealing refuses to run (``SealingUnavailable``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from vigil_tools.replay.sources import (
    SEAL_LOCK,
    SEALED_FORMAT,
    Selection,
    archive_patients,
    archive_query,
    day_of,
    day_start,
    encode_day,
    registered_patients,
)

#: How long after a day ends it is sealed: late readings of a day (a device that was offline)
#: mostly arrive within it, and each one that arrives later makes the day stale until the next
#: pass seals it again.
DEFAULT_SEAL_LAG = timedelta(hours=24)

# Every trigger of 0011: a write of any kind to any readings table must mark its days stale.
_TRIGGER_NAMES = [
    f"{table}_sealed_{op}"
    for table in ("temperature_readings", "pump_status", "pump_events")
    for op in ("insert", "update", "delete", "truncate")
]

_UPSERT_DAYS = """
INSERT INTO archive_days (patient_id, day, rows, format, body, sealed_at)
SELECT $1, d.day, d.rows, $5, d.body, now()
FROM unnest($2::date[], $3::integer[], $4::bytea[]) AS d(day, rows, body)
ON CONFLICT (patient_id, day) DO UPDATE
SET rows = excluded.rows, format = excluded.format, body = excluded.body,
    sealed_at = excluded.sealed_at
"""


class SealingUnavailable(RuntimeError):
    """The database has no triggers that keep sealed days true to the rows (TimescaleDB)."""


@dataclass
class SealStats:
    patients: int = 0
    days: int = 0  # days sealed by this pass, new ones and stale ones again
    rows: int = 0  # rows in those days
    emptied: int = 0  # stale days whose rows are all gone: their entry removed

    def describe(self) -> dict[str, int]:
        return asdict(self)

    def absorb(self, other: SealStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def seal_horizon(now: datetime, lag: timedelta = DEFAULT_SEAL_LAG) -> datetime:
    """The instant before which days are sealed: the start of the UTC day of ``now - lag``
    (every day before it ended at least ``lag`` ago)."""
    if now.tzinfo is None:
        raise ValueError("seal_horizon needs an aware datetime")
    cutoff = (now - lag).astimezone(UTC)
    return cutoff.replace(hour=0, minute=0, second=0, microsecond=0)


async def sealing_available(conn: Any) -> bool:
    """Whether the readings tables carry the triggers that mark sealed days stale. Only the
    tables the connection's search path names count (another schema may have copies)."""
    found = await conn.fetchval(
        """
        SELECT count(*) FROM pg_trigger
        WHERE tgname = ANY($1::text[])
          AND tgrelid IN (to_regclass('temperature_readings'), to_regclass('pump_status'),
                          to_regclass('pump_events'))
        """,
        _TRIGGER_NAMES,
    )
    return int(found) == len(_TRIGGER_NAMES)


def split_days(rows: Iterable[Any]) -> dict[date, list[Any]]:
    """Archive rows (``ArchivedObservation`` order, device order) grouped by their UTC day,
    each group in the rows' order."""
    days: dict[date, list[Any]] = {}
    for row in rows:
        days.setdefault(day_of(row[3]), []).append(row)
    return days


async def _rows(conn: Any, patient: str, since: datetime | None, until: datetime) -> list[Any]:
    sql, args = archive_query(
        Selection(patient_ids=frozenset({patient}), since=since, until=until), "device"
    )
    return list(await conn.fetch(sql, *args))


async def seal_patient(conn: Any, patient: str, horizon: datetime) -> SealStats:
    """Seal one patient's days before ``horizon`` not sealed yet, and its stale days."""
    stats = SealStats(patients=1)
    async with conn.transaction():  # READ COMMITTED: each statement sees what is committed
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", SEAL_LOCK, patient)
        current = await conn.fetchval(
            "SELECT sealed_until FROM archive_seal WHERE patient_id = $1", patient
        )
        days: dict[date, list[Any]] = {}
        if current is None or current < horizon:
            days.update(split_days(await _rows(conn, patient, current, horizon)))
        stale = [
            row[0]
            for row in await conn.fetch(
                "SELECT day FROM archive_days "
                "WHERE patient_id = $1 AND (body IS NULL OR format <> $2)",
                patient,
                SEALED_FORMAT,
            )
        ]
        emptied: list[date] = []
        for day in stale:
            rows = await _rows(conn, patient, day_start(day), day_start(day + timedelta(days=1)))
            if rows:
                days[day] = rows
            else:
                emptied.append(day)
        if days:
            ordered = sorted(days)
            await conn.execute(
                _UPSERT_DAYS,
                patient,
                ordered,
                [len(days[day]) for day in ordered],
                [encode_day(days[day]) for day in ordered],
                SEALED_FORMAT,
            )
        if emptied:
            await conn.execute(
                "DELETE FROM archive_days WHERE patient_id = $1 AND day = ANY($2::date[])",
                patient,
                emptied,
            )
        await conn.execute(
            """
            INSERT INTO archive_seal (patient_id, sealed_until) VALUES ($1, $2)
            ON CONFLICT (patient_id) DO UPDATE
            SET sealed_until = greatest(archive_seal.sealed_until, excluded.sealed_until)
            """,
            patient,
            horizon,
        )
    stats.days = len(days)
    stats.rows = sum(len(rows) for rows in days.values())
    stats.emptied = len(emptied)
    return stats


async def seal_archive(
    conn: Any, horizon: datetime, patients: Iterable[str] | None = None
) -> SealStats:
    """Seal the days before ``horizon`` of ``patients`` (None: every patient the archive holds
    rows of, and every registered one), one patient per transaction. ``conn``: an asyncpg
    connection outside a transaction."""
    if not await sealing_available(conn):
        raise SealingUnavailable(
            "the readings tables have no sealing triggers (TimescaleDB compresses the archive "
            "itself); nothing sealed"
        )
    if patients is None:
        names = sorted(set(await archive_patients(conn)) | set(await registered_patients(conn)))
    else:
        names = sorted(set(patients))
    total = SealStats()
    for patient in names:
        total.absorb(await seal_patient(conn, patient, horizon))
    return total


@dataclass(frozen=True)
class SealProblem:
    patient_id: str
    day: date
    problem: str

    def describe(self) -> str:
        return f"{self.patient_id} {self.day.isoformat()}: {self.problem}"


# Days below a patient's sealed_until that have rows but no entry in archive_days: a seal that
# missed rows (or a trigger that did not run) would leave them.
_UNSEALED_DAYS = """
SELECT DISTINCT r.patient_id, (r.device_time AT TIME ZONE 'UTC')::date AS day
FROM (
    SELECT patient_id, device_time FROM temperature_readings
    UNION ALL SELECT patient_id, device_time FROM pump_status
    UNION ALL SELECT patient_id, device_time FROM pump_events
) AS r JOIN archive_seal AS s USING (patient_id)
WHERE r.device_time < s.sealed_until AND s.patient_id = ANY($1::text[])
  AND NOT EXISTS (
      SELECT 1 FROM archive_days AS a
      WHERE a.patient_id = r.patient_id AND a.day = (r.device_time AT TIME ZONE 'UTC')::date)
ORDER BY 1, 2
"""


async def verify_seals(conn: Any, patients: Iterable[str] | None = None) -> list[SealProblem]:
    """Every sealed day of ``patients`` (None: all) derived again from the rows and compared
    byte for byte with what is stored; and every day with rows that should be sealed and is
    not. Runs in one repeatable-read snapshot. Empty: the sealed days are the rows."""
    problems: list[SealProblem] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if patients is None:
            names = sorted(
                row[0] for row in await conn.fetch("SELECT patient_id FROM archive_seal")
            )
        else:
            names = sorted(set(patients))
        for patient in names:
            sealed = await conn.fetch(
                "SELECT day, rows, body FROM archive_days "
                "WHERE patient_id = $1 AND format = $2 ORDER BY day",
                patient,
                SEALED_FORMAT,
            )
            if not sealed:
                continue
            # The patient's rows up to the last sealed day, read once and split by day.
            by_day = split_days(
                await _rows(conn, patient, None, day_start(sealed[-1]["day"] + timedelta(days=1)))
            )
            for day, count, body in sealed:
                rows = by_day.get(day, [])
                if count != len(rows) or encode_day(rows) != body:
                    problems.append(
                        SealProblem(
                            patient, day, f"sealed {count} rows differ from the {len(rows)} rows"
                        )
                    )
        for patient, day in await conn.fetch(_UNSEALED_DAYS, names):
            problems.append(SealProblem(patient, day, "has rows but is not sealed"))
    return problems
