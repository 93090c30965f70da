"""PostgreSQL queries of the API. Every patient-data query takes the caller's care teams and
filters by them in SQL, so a forgotten check in a route cannot leak another team's patient."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.api.domain.access import Principal, Role
from vigil.db.storage import StorageSettings

Row = dict[str, Any]


def _rows(records: Sequence[asyncpg.Record]) -> list[Row]:
    return [dict(r) for r in records]


# When a bound device (``b``, a row of device_bindings) was last heard from for that patient:
# its newest reading, pump status or pump event, by device time.
LAST_SEEN_SQL = """greatest(
    (SELECT max(device_time) FROM temperature_readings r
      WHERE r.device_id = b.device_id AND r.patient_id = b.patient_id),
    (SELECT max(device_time) FROM pump_status s
      WHERE s.device_id = b.device_id AND s.patient_id = b.patient_id),
    (SELECT max(device_time) FROM pump_events e
      WHERE e.device_id = b.device_id AND e.patient_id = b.patient_id)
) AS last_seen"""


class ApiRepository:
    def __init__(self, pool: asyncpg.Pool, *, aggregate_lookback: timedelta | None = None) -> None:
        """``aggregate_lookback``: how far back the hourly aggregate's refresh reaches
        (``VIGIL_STORAGE_AGGREGATE_LOOKBACK_DAYS``); hours that recent are read from the rows."""
        self._pool = pool
        self._lookback = aggregate_lookback or timedelta(
            days=StorageSettings().aggregate_lookback_days
        )

    # -- people -------------------------------------------------------------------------------

    async def user_by_username(self, username: str) -> Row | None:
        row = await self._pool.fetchrow(
            "SELECT user_id, username, password_hash, role, active FROM api_users "
            "WHERE username = $1",
            username,
        )
        return dict(row) if row else None

    async def principal(self, user_id: str) -> Principal | None:
        row = await self._pool.fetchrow(
            """
            SELECT u.user_id, u.username, u.role, u.active,
                   coalesce(array_agg(t.care_team_id) FILTER (WHERE t.care_team_id IS NOT NULL),
                            '{}') AS teams
            FROM api_users u LEFT JOIN api_user_care_teams t USING (user_id)
            WHERE u.user_id = $1 GROUP BY u.user_id
            """,
            user_id,
        )
        if row is None or not row["active"]:
            return None
        return Principal(
            row["user_id"], row["username"], Role(row["role"]), frozenset(row["teams"])
        )

    async def revoke_token(self, token_id: str, user_id: str, expires_at: datetime) -> None:
        """Refuse the token from now until it expires; rows of expired tokens are dropped."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM api_revoked_tokens WHERE expires_at < now()")
            await conn.execute(
                "INSERT INTO api_revoked_tokens (token_id, user_id, expires_at) "
                "VALUES ($1, $2, $3) ON CONFLICT (token_id) DO NOTHING",
                token_id,
                user_id,
                expires_at,
            )

    async def token_revoked(
        self, token_id: str | None, user_id: str, issued_at: datetime | None
    ) -> bool:
        """Whether the token is refused: logged out (revoked by its id), or issued at or
        before its user's sessions were ended (``vigil admin users deactivate`` /
        ``reset-password``; a token without an issue time counts as issued before)."""
        return bool(
            await self._pool.fetchval(
                """
                SELECT EXISTS (SELECT 1 FROM api_revoked_tokens WHERE token_id = $1)
                    OR EXISTS (SELECT 1 FROM api_users WHERE user_id = $2
                               AND sessions_revoked_at IS NOT NULL
                               AND ($3::timestamptz IS NULL OR sessions_revoked_at >= $3))
                """,
                token_id,
                user_id,
                issued_at,
            )
        )

    async def create_user(
        self,
        user_id: str,
        username: str,
        display_name: str,
        password_hash: str,
        role: Role,
        care_teams: Sequence[str],
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO api_users (user_id, username, display_name, password_hash, role)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (user_id) DO UPDATE SET username = EXCLUDED.username,
                    display_name = EXCLUDED.display_name, password_hash = EXCLUDED.password_hash,
                    role = EXCLUDED.role, active = true
                """,
                user_id,
                username,
                display_name,
                password_hash,
                role.value,
            )
            await conn.execute("DELETE FROM api_user_care_teams WHERE user_id = $1", user_id)
            await conn.executemany(
                "INSERT INTO api_user_care_teams (user_id, care_team_id) VALUES ($1, $2)",
                [(user_id, team) for team in care_teams],
            )

    # -- patients -----------------------------------------------------------------------------

    async def patients(
        self,
        teams: frozenset[str],
        limit: int,
        offset: int,
        *,
        monitored_only: frozenset[str] = frozenset(),
    ) -> tuple[list[Row], int]:
        """``monitored_only``: teams of ``teams`` whose discharged patients are left out (the
        teams seen through regional cover)."""
        records = await self._pool.fetch(
            """
            SELECT patient_id, care_team_id, weight_kg, count(*) OVER () AS total
            FROM patients WHERE care_team_id = ANY($1::text[])
              AND NOT (care_team_id = ANY($4::text[]) AND discharged_at IS NOT NULL)
            ORDER BY patient_id LIMIT $2 OFFSET $3
            """,
            list(teams),
            limit,
            offset,
            list(monitored_only),
        )
        total = int(records[0]["total"]) if records else 0
        return [{k: v for k, v in dict(r).items() if k != "total"} for r in records], total

    async def patient(self, teams: frozenset[str], patient_id: str) -> Row | None:
        row = await self._pool.fetchrow(
            "SELECT p.patient_id, p.care_team_id, p.weight_kg, t.timezone FROM patients p "
            "JOIN care_teams t USING (care_team_id) "
            "WHERE p.patient_id = $1 AND p.care_team_id = ANY($2::text[])",
            patient_id,
            list(teams),
        )
        return dict(row) if row else None

    async def discharge_of(self, patient_id: str) -> Row | None:
        """The patient's discharge (``discharged_at``, ``discharge_reason``, ``discharged_by``);
        None while they are monitored."""
        row = await self._pool.fetchrow(
            "SELECT discharged_at, discharge_reason, discharged_by FROM patients "
            "WHERE patient_id = $1 AND discharged_at IS NOT NULL",
            patient_id,
        )
        return dict(row) if row else None

    async def devices(self, patient_id: str) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                f"""
            SELECT b.device_id, d.kind, d.model, b.valid_from, b.valid_to,
                   {LAST_SEEN_SQL}
            FROM device_bindings b JOIN devices d USING (device_id)
            WHERE b.patient_id = $1 ORDER BY b.valid_from
            """,
                patient_id,
            )
        )

    async def temperatures(self, patient_id: str, since: datetime, limit: int) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                """
            SELECT device_time, ingest_time, device_id, value_c, original_value, original_unit,
                   site, flags
            FROM temperature_readings WHERE patient_id = $1 AND device_time >= $2
            ORDER BY device_time LIMIT $3
            """,
                patient_id,
                since,
                limit,
            )
        )

    async def temperature_hourly(
        self, patient_id: str, since: datetime, now: datetime
    ) -> list[Row]:
        """Hourly temperature (UTC hours of device time) from ``since`` on. Hours older than the
        aggregate's refresh look-back come from ``temperature_hourly`` (the continuous aggregate
        on TimescaleDB, a view on plain PostgreSQL); the recent ones from the rows, the same
        columns computed the same way. On TimescaleDB an hour already materialized does not
        show a reading that arrives late for it (a hub's buffer) until a refresh covers it, and
        the refresh policy reaches back only the look-back: reading those hours from the rows
        keeps them current (docs/storage.md)."""
        hour = now.replace(minute=0, second=0, microsecond=0)
        fresh_from = hour - self._lookback
        return _rows(
            await self._pool.fetch(
                """
            SELECT bucket, readings, min_c, max_c, mean_c FROM temperature_hourly
            WHERE patient_id = $1 AND bucket >= $2 AND bucket < $3
            UNION ALL
            SELECT date_bin(INTERVAL '1 hour', device_time, TIMESTAMPTZ '2000-01-03 00:00:00+00'),
                   count(*), min(value_c), max(value_c), avg(value_c)
            FROM temperature_readings
            WHERE patient_id = $1 AND device_time >= greatest($2, $3)
            GROUP BY 1
            ORDER BY 1
            """,
                patient_id,
                since,
                fresh_from,
            )
        )

    async def current_cycle_start(self, patient_id: str, now: datetime) -> datetime | None:
        """The start of the patient's current cycle: the newest ``cycle_start`` not after now."""
        value = await self._pool.fetchval(
            "SELECT max(cycle_start) FROM patient_cycles "
            "WHERE patient_id = $1 AND cycle_start <= $2",
            patient_id,
            now,
        )
        return value if isinstance(value, datetime) else None

    async def pump_reports(self, patient_id: str, since: datetime) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                """
            SELECT device_time, device_id, state, rate_ml_h, volume_remaining_ml,
                   bag_volume_ml, battery_pct
            FROM pump_status WHERE patient_id = $1 AND device_time >= $2
            ORDER BY device_time
            """,
                patient_id,
                since,
            )
        )

    async def pump_events(self, patient_id: str, since: datetime, limit: int) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                """
            SELECT device_time, device_id, event, alarm, detail FROM pump_events
            WHERE patient_id = $1 AND device_time >= $2 ORDER BY device_time DESC LIMIT $3
            """,
                patient_id,
                since,
                limit,
            )
        )

    # -- protocols ----------------------------------------------------------------------------

    async def care_teams(self, teams: frozenset[str]) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                """
            SELECT t.care_team_id, t.name, t.timezone,
                   (SELECT max(version) FROM rule_protocols p
                     WHERE p.care_team_id = t.care_team_id) AS protocol_version
            FROM care_teams t WHERE t.care_team_id = ANY($1::text[]) ORDER BY t.care_team_id
            """,
                list(teams),
            )
        )

    async def protocol_versions(self, care_team_id: str) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                "SELECT version, overrides, signed_off_by, signed_off_at FROM rule_protocols "
                "WHERE care_team_id = $1 ORDER BY version",
                care_team_id,
            )
        )

    async def override_versions(self, patient_id: str) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                "SELECT version, overrides, signed_off_by, signed_off_at, reason "
                "FROM patient_rule_overrides WHERE patient_id = $1 ORDER BY version",
                patient_id,
            )
        )

    # -- alerts -------------------------------------------------------------------------------

    async def alert_episodes(
        self,
        teams: frozenset[str],
        *,
        state: str | None,
        priority: str | None,
        patient_id: str | None,
        limit: int,
        offset: int,
        monitored_only: frozenset[str] = frozenset(),
    ) -> tuple[list[Row], int]:
        """One row per alert episode (dedup key): its opening, latest phase and status;
        ``monitored_only``: teams whose discharged patients' episodes are left out (the teams
        seen through regional cover)."""
        records = await self._pool.fetch(
            f"""
            WITH episodes AS ({_EPISODES_SQL})
            SELECT *, count(*) OVER () AS total FROM episodes
            WHERE ($2::text IS NULL OR status = $2)
              AND ($3::text IS NULL OR priority = $3)
              AND ($4::text IS NULL OR patient_id = $4)
              AND NOT EXISTS (SELECT 1 FROM patients d
                              WHERE d.patient_id = episodes.patient_id
                                AND d.care_team_id = ANY($7::text[])
                                AND d.discharged_at IS NOT NULL)
            ORDER BY (status = 'resolved'), priority_rank, opened_at DESC
            LIMIT $5 OFFSET $6
            """,
            list(teams),
            state,
            priority,
            patient_id,
            limit,
            offset,
            list(monitored_only),
        )
        total = int(records[0]["total"]) if records else 0
        return [{k: v for k, v in dict(r).items() if k != "total"} for r in records], total

    async def alert_episode(self, teams: frozenset[str], dedup_key: str) -> Row | None:
        row = await self._pool.fetchrow(
            f"WITH episodes AS ({_EPISODES_SQL}) SELECT * FROM episodes WHERE dedup_key = $2",
            list(teams),
            dedup_key,
        )
        return dict(row) if row else None

    async def alert_phases(self, dedup_key: str) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                """
            SELECT alert_id, phase, state, priority, code, title, device_time, ingest_time,
                   received_at, evidence, rule_id, rule_version
            FROM alerts WHERE dedup_key = $1 ORDER BY received_at, device_time
            """,
                dedup_key,
            )
        )

    async def pages_for(self, dedup_key: str) -> list[Row]:
        return _rows(
            await self._pool.fetch(
                """
            SELECT p.page_id, p.alert_id, p.channel, p.recipient, p.status, p.created_at,
                   coalesce(json_agg(json_build_object(
                       'attempt', d.attempt, 'status', d.status, 'at', d.at, 'detail', d.detail)
                       ORDER BY d.attempt) FILTER (WHERE d.page_id IS NOT NULL), '[]') AS attempts
            FROM pages p LEFT JOIN delivery_attempts d USING (page_id)
            WHERE p.dedup_key = $1 GROUP BY p.page_id ORDER BY p.created_at
            """,
                dedup_key,
            )
        )

    async def latest_alert_received_at(self, teams: frozenset[str]) -> datetime | None:
        value = await self._pool.fetchval(
            """
            SELECT max(a.received_at) FROM alerts a JOIN patients p USING (patient_id)
            WHERE p.care_team_id = ANY($1::text[])
            """,
            list(teams),
        )
        return value if isinstance(value, datetime) else None


# Episode status: "open" until acknowledged, "acknowledged" once someone has, "resolved" once the
# condition cleared (the END phase) — acknowledged and cleared are separate facts, both shown.
_EPISODES_SQL = """
    SELECT a.dedup_key, a.patient_id, p.care_team_id, t.timezone,
           (array_agg(a.code ORDER BY a.received_at) FILTER (WHERE a.phase <> 'end'))[1] AS code,
           (array_agg(a.title ORDER BY a.received_at DESC))[1] AS title,
           (array_agg(a.priority ORDER BY a.received_at DESC)
                FILTER (WHERE a.phase <> 'end'))[1] AS priority,
           CASE (array_agg(a.priority ORDER BY a.received_at DESC)
                     FILTER (WHERE a.phase <> 'end'))[1]
                WHEN 'high' THEN 0 WHEN 'medium' THEN 1 WHEN 'low' THEN 2 ELSE 3 END
               AS priority_rank,
           (array_agg(a.phase ORDER BY a.received_at DESC))[1] AS latest_phase,
           (array_agg(a.device_id ORDER BY a.received_at))[1] AS device_id,
           min(a.device_time) AS opened_at,
           max(a.received_at) AS updated_at,
           bool_or(a.phase = 'end') AS cleared,
           e.acknowledged_by, e.acknowledged_at, e.resolved_at,
           CASE WHEN bool_or(a.phase = 'end') OR e.resolved_at IS NOT NULL THEN 'resolved'
                WHEN e.acknowledged_at IS NOT NULL THEN 'acknowledged'
                ELSE 'open' END AS status
    FROM alerts a
    JOIN patients p ON p.patient_id = a.patient_id AND p.care_team_id = ANY($1::text[])
    JOIN care_teams t ON t.care_team_id = p.care_team_id
    -- notify keeps one escalation per episode, with who acknowledged and when it was resolved.
    LEFT JOIN escalations e ON e.dedup_key = a.dedup_key
    GROUP BY a.dedup_key, a.patient_id, p.care_team_id, t.timezone, e.acknowledged_by,
             e.acknowledged_at, e.resolved_at
"""


async def lock_versions(
    conn: asyncpg.Connection, table: str, key: str, value: str
) -> asyncpg.Record | None:
    """Hold off the other writers of one protocol's (or override's) versions until the
    transaction ends, so two sign-offs cannot claim the same version; returns its newest
    version (``version``, ``overrides``), None before the first."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"{table}:{value}")
    return await conn.fetchrow(
        f"SELECT version, overrides FROM {table} WHERE {key} = $1 ORDER BY version DESC LIMIT 1",
        value,
    )


def previous_overrides(previous: asyncpg.Record | None) -> dict[str, Any]:
    if previous is None:
        return {}
    value = previous["overrides"]
    return dict(json.loads(value) if isinstance(value, str) else value)


async def append_version(
    conn: asyncpg.Connection,
    table: str,
    key: str,
    value: str,
    previous: asyncpg.Record | None,
    overrides: dict[str, Any],
    by: str,
    at: datetime,
    reason: str | None,
) -> Row:
    """Append the next version after ``previous`` (from ``lock_versions``, same transaction)."""
    reason_column = ", reason" if reason is not None else ""
    reason_value = ", $6" if reason is not None else ""
    version = (previous["version"] + 1) if previous else 1
    args: list[Any] = [value, version, json.dumps(overrides), by, at]
    if reason is not None:
        args.append(reason)
    row = await conn.fetchrow(
        f"INSERT INTO {table} ({key}, version, overrides, signed_off_by, signed_off_at"
        f"{reason_column}) VALUES ($1, $2, $3::jsonb, $4, $5{reason_value}) "
        "RETURNING version, overrides, signed_off_by, signed_off_at"
        + (", reason" if reason is not None else ""),
        *args,
    )
    return dict(row)
