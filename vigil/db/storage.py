"""How long readings are kept and when they are compressed: TimescaleDB's policies from settings.

The migrator applies these after the migration files, on TimescaleDB only, each time it runs,
so a changed setting takes effect at the next ``vigil migrate`` (or stack start, or service
start that migrates). Only the readings hypertables and the hourly temperature aggregate ever
get a retention policy: alerts, escalations, pages, delivery attempts, the audit log and the
rules' config versions are never dropped by a job (docs/storage.md).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

READINGS_TABLES = ("temperature_readings", "pump_status", "pump_events")
#: The continuous aggregate behind the temperature plots (0013).
TEMPERATURE_HOURLY = "temperature_hourly"
#: The shortest retention accepted: one 28-day course, its replay warm-up and a margin.
MIN_RETENTION_DAYS = 35


class StorageSettings(BaseSettings):
    """Every field reads ``VIGIL_STORAGE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_STORAGE_", extra="ignore")

    # Chunks whose newest device time is older than this are compressed; 0: no policy.
    compress_after_days: int = Field(default=7, ge=0)
    # Chunks of readings (and of the hourly aggregate) older than this are dropped; 0: kept
    # for ever (the default: see docs/storage.md).
    readings_retention_days: int = Field(default=0, ge=0)
    # How often the hourly temperature aggregate is brought up to date, and how far back each
    # refresh looks for late readings (a device that was offline).
    aggregate_refresh_minutes: int = Field(default=15, ge=1)
    aggregate_lookback_days: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _retention_floor(self) -> StorageSettings:
        days = self.readings_retention_days
        if days and days < MIN_RETENTION_DAYS:
            raise ValueError(
                f"readings_retention_days={days}: below {MIN_RETENTION_DAYS} days a course "
                "could be dropped before it has been reviewed (0 keeps readings for ever)"
            )
        if days and self.compress_after_days and days <= self.compress_after_days:
            raise ValueError("readings_retention_days must exceed compress_after_days")
        return self


async def _hypertables(conn: Any) -> dict[str, bool]:
    """The readings hypertables and the aggregate's, by name: whether compression is on."""
    rows = await conn.fetch(
        """
        SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables
        WHERE hypertable_schema = current_schema() AND hypertable_name = ANY($1::text[])
        """,
        list(READINGS_TABLES),
    )
    return {row[0]: row[1] for row in rows}


async def _policy(
    conn: Any, proc: str, hypertable: str, key: str, value: timedelta
) -> tuple[int, bool] | None:
    """The job of policy ``proc`` on ``hypertable``, if any, and whether its config's ``key``
    is the interval ``value`` (compared as intervals, not as text)."""
    row = await conn.fetchrow(
        """
        SELECT job_id, coalesce((config ->> $3)::interval = $4::interval, false)
        FROM timescaledb_information.jobs
        WHERE proc_name = $1 AND hypertable_schema = current_schema() AND hypertable_name = $2
        """,
        proc,
        hypertable,
        key,
        value,
    )
    return None if row is None else (int(row[0]), bool(row[1]))


def _interval(days: int) -> timedelta:
    return timedelta(days=days)


async def _aggregate_exists(conn: Any) -> bool:
    """Whether the hourly aggregate is a continuous aggregate (its jobs name the view)."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                           WHERE view_schema = current_schema() AND view_name = $1)
            """,
            TEMPERATURE_HOURLY,
        )
    )


async def apply_storage_policies(conn: Any, settings: StorageSettings) -> dict[str, str]:
    """Make TimescaleDB's policies what ``settings`` say; returns what each relation now has.

    A policy that already matches is left as it is (its job, schedule and history kept)."""
    done: dict[str, str] = {}
    compress = _interval(settings.compress_after_days)
    retain = _interval(settings.readings_retention_days)
    for table, compressed in (await _hypertables(conn)).items():
        current = await _policy(conn, "policy_compression", table, "compress_after", compress)
        wanted = compressed and settings.compress_after_days > 0
        if current is not None and (not wanted or not current[1]):
            await conn.execute("SELECT remove_compression_policy($1::regclass)", table)
            current = None
        if wanted and current is None:
            await conn.execute(
                "SELECT add_compression_policy($1::regclass, compress_after => $2::interval)",
                table,
                compress,
            )
        done[table] = (
            f"compress after {settings.compress_after_days} d" if wanted else "no compression"
        )
        done[table] += await _retention(conn, table, retain, settings)
    if await _aggregate_exists(conn):
        schedule = timedelta(minutes=settings.aggregate_refresh_minutes)
        lookback = _interval(settings.aggregate_lookback_days)
        refresh = await _policy(
            conn,
            "policy_refresh_continuous_aggregate",
            TEMPERATURE_HOURLY,
            "start_offset",
            lookback,
        )
        first = refresh is None
        if refresh is not None and (
            not refresh[1]
            or await conn.fetchval(
                "SELECT schedule_interval FROM timescaledb_information.jobs WHERE job_id = $1",
                refresh[0],
            )
            != schedule
        ):
            await conn.execute(
                "SELECT remove_continuous_aggregate_policy($1::regclass)", TEMPERATURE_HOURLY
            )
            refresh = None
        if first:
            # The policy only ever looks back ``aggregate_lookback_days``: the hours before
            # that (the archive of a database that had readings before 0013) are materialized
            # once, here, before the policy exists and moves the materialized mark past them.
            await conn.execute(
                f"CALL refresh_continuous_aggregate('{TEMPERATURE_HOURLY}', NULL, "
                "now() - INTERVAL '1 hour')"
            )
        if refresh is None:
            await conn.execute(
                "SELECT add_continuous_aggregate_policy($1::regclass, "
                "start_offset => $2::interval, end_offset => INTERVAL '1 hour', "
                "schedule_interval => $3::interval)",
                TEMPERATURE_HOURLY,
                lookback,
                schedule,
            )
        done[TEMPERATURE_HOURLY] = (
            f"refresh every {settings.aggregate_refresh_minutes} min"
            f" over {settings.aggregate_lookback_days} d"
        )
        done[TEMPERATURE_HOURLY] += await _retention(conn, TEMPERATURE_HOURLY, retain, settings)
    return done


async def _retention(conn: Any, relation: str, retain: timedelta, settings: StorageSettings) -> str:
    current = await _policy(conn, "policy_retention", relation, "drop_after", retain)
    wanted = settings.readings_retention_days > 0
    if current is not None and (not wanted or not current[1]):
        await conn.execute("SELECT remove_retention_policy($1::regclass)", relation)
        current = None
    if wanted and current is None:
        await conn.execute(
            "SELECT add_retention_policy($1::regclass, drop_after => $2::interval)",
            relation,
            retain,
        )
    return f", drop after {settings.readings_retention_days} d" if wanted else ", kept"
