"""PostgreSQL reads of the FHIR interface: rows for ``services.api.domain.fhir`` to map.

Every query that can reach a patient takes the caller's care teams and filters by them in SQL
(as ``ApiRepository`` does); the ones keyed by a patient id are called only after
:meth:`FhirRepository.patient` found that patient among the caller's teams. Time bounds are
always given (open ends as far-off instants), so TimescaleDB prunes chunks on device time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg

Row = dict[str, Any]
#: A row as the driver returns it (``asyncpg.Record``: read by column name, ``.get`` too).
Record = Mapping[str, Any]

#: The notification channel on which a replica asks for an export's files to be stored.
EXPORT_WANTED = "fhir_export_wanted"

#: Stand-ins for an open end of a time range (PostgreSQL's infinities do not map to Python).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def _rows(records: Sequence[asyncpg.Record]) -> list[Row]:
    return [dict(r) for r in records]


def _records(records: list[asyncpg.Record]) -> list[Record]:
    return cast(list[Record], records)


_TEMPERATURE_COLUMNS = (
    "device_time, ingest_time, patient_id, device_id, message_id, flags, value_c, "
    "original_value, original_unit, site"
)
_PUMP_COLUMNS = (
    "device_time, ingest_time, patient_id, device_id, message_id, flags, state, rate_ml_h, "
    "volume_remaining_ml, bag_volume_ml, battery_pct"
)

# The same columns for bulk export, cheaper for the driver to decode: the message id as text
# (not a UUID object to format again) and no flags as NULL (not an empty list per row).
_EXPORT_COLUMNS = {
    table: columns.replace("message_id, flags", "message_id::text, nullif(flags, '{}') AS flags")
    for table, columns in (
        ("temperature_readings", _TEMPERATURE_COLUMNS),
        ("pump_status", _PUMP_COLUMNS),
    )
}

_OBSERVATIONS_SQL = f"""
    WITH found AS (
        SELECT 'temperature' AS kind, {_TEMPERATURE_COLUMNS},
               NULL::text AS state, NULL::float8 AS rate_ml_h,
               NULL::float8 AS volume_remaining_ml, NULL::float8 AS bag_volume_ml,
               NULL::float8 AS battery_pct
        FROM temperature_readings
        WHERE $2::boolean AND patient_id = $1 AND device_time >= $4 AND device_time < $5
        UNION ALL
        SELECT 'pump_status', device_time, ingest_time, patient_id, device_id, message_id, flags,
               NULL, NULL, NULL, NULL,
               state, rate_ml_h, volume_remaining_ml, bag_volume_ml, battery_pct
        FROM pump_status
        WHERE $3::boolean AND patient_id = $1 AND device_time >= $4 AND device_time < $5
    )
    SELECT *, count(*) OVER () AS total FROM found
    ORDER BY device_time, message_id LIMIT $6 OFFSET $7
"""

# One row per alert episode (dedup key): the opening phase's id names the Flag. Acknowledged
# and cleared are separate facts: notify's escalation row says who acknowledged and when it was
# resolved; an end phase says the condition cleared.
_EPISODES_SQL = """
    SELECT a.dedup_key, a.patient_id,
           (array_agg(a.alert_id ORDER BY a.received_at, a.device_time))[1] AS flag_id,
           (array_agg(a.kind ORDER BY a.received_at))[1] AS kind,
           coalesce((array_agg(a.code ORDER BY a.received_at) FILTER (WHERE a.phase <> 'end'))[1],
                    (array_agg(a.code ORDER BY a.received_at))[1]) AS code,
           (array_agg(a.title ORDER BY a.received_at DESC))[1] AS title,
           coalesce((array_agg(a.priority ORDER BY a.received_at DESC)
                        FILTER (WHERE a.phase <> 'end'))[1], 'info') AS priority,
           (array_agg(a.device_id ORDER BY a.received_at))[1] AS device_id,
           (array_agg(a.evidence ORDER BY a.received_at))[1] AS evidence,
           min(a.device_time) AS opened_at,
           min(a.device_time) FILTER (WHERE a.phase = 'end') AS cleared_at,
           max(a.received_at) AS updated_at,
           e.acknowledged_by, e.acknowledged_at, e.resolved_at
    FROM alerts a
    JOIN patients p ON p.patient_id = a.patient_id AND p.care_team_id = ANY($1::text[])
    LEFT JOIN escalations e ON e.dedup_key = a.dedup_key
    WHERE {where}
    GROUP BY a.dedup_key, a.patient_id, e.acknowledged_by, e.acknowledged_at, e.resolved_at
    ORDER BY opened_at, a.dedup_key
"""

# Pages to people (PagerDuty's upstream acknowledge/resolve calls are not pages), each with its
# alert's priority and title and what its delivery attempts recorded.
_PAGES_SQL = """
    SELECT p.page_id, p.dedup_key, p.patient_id, p.channel, p.recipient, p.recipient_ref,
           p.status, p.purpose, p.created_at, p.next_attempt_at, a.priority, a.title,
           d.sent_at, d.delivered_at, d.last_detail
    FROM pages p
    JOIN alerts a ON a.alert_id = p.alert_id
    LEFT JOIN LATERAL (
        SELECT min(at) FILTER (WHERE status IN ('sent', 'delivered')) AS sent_at,
               min(at) FILTER (WHERE status = 'delivered') AS delivered_at,
               (array_agg(detail ORDER BY attempt DESC, at DESC))[1] AS last_detail
        FROM delivery_attempts WHERE page_id = p.page_id
    ) d ON true
    WHERE p.patient_id = $1 AND p.dedup_key = ANY($2::text[])
      AND coalesce(p.purpose, 'alert') NOT LIKE 'upstream%'
    ORDER BY p.created_at, p.page_id
"""


class FhirRepository:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def patient(self, teams: frozenset[str], patient_id: str) -> Row | None:
        row = await self._pool.fetchrow(
            "SELECT patient_id, care_team_id FROM patients "
            "WHERE patient_id = $1 AND care_team_id = ANY($2::text[])",
            patient_id,
            list(teams),
        )
        return dict(row) if row else None

    async def patient_ids(self, teams: frozenset[str]) -> list[str]:
        records = await self._pool.fetch(
            "SELECT patient_id FROM patients WHERE care_team_id = ANY($1::text[]) "
            "ORDER BY patient_id",
            list(teams),
        )
        return [r["patient_id"] for r in records]

    async def device(self, teams: frozenset[str], device_id: str) -> Row | None:
        """A device ever bound to a patient of ``teams``; ``patient_id`` is its newest binding's
        patient when that patient is of ``teams`` too, else None (it serves someone else now)."""
        row = await self._pool.fetchrow(
            """
            SELECT d.device_id, d.kind, d.model, d.reporting,
                   CASE WHEN np.care_team_id = ANY($2::text[]) THEN nb.patient_id END
                       AS patient_id
            FROM devices d
            LEFT JOIN LATERAL (
                SELECT patient_id FROM device_bindings WHERE device_id = d.device_id
                ORDER BY valid_from DESC LIMIT 1
            ) nb ON true
            LEFT JOIN patients np ON np.patient_id = nb.patient_id
            WHERE d.device_id = $1 AND EXISTS (
                SELECT 1 FROM device_bindings b JOIN patients p USING (patient_id)
                WHERE b.device_id = d.device_id AND p.care_team_id = ANY($2::text[]))
            """,
            device_id,
            list(teams),
        )
        return dict(row) if row else None

    async def devices_of(self, patient_id: str) -> list[Row]:
        """Devices ever bound to the patient; ``patient_id`` set where the newest binding is
        still this patient."""
        return _rows(
            await self._pool.fetch(
                """
                SELECT d.device_id, d.kind, d.model, d.reporting,
                       CASE WHEN nb.patient_id = $1 THEN $1 END AS patient_id
                FROM devices d
                LEFT JOIN LATERAL (
                    SELECT patient_id FROM device_bindings WHERE device_id = d.device_id
                    ORDER BY valid_from DESC LIMIT 1
                ) nb ON true
                WHERE d.device_id IN (SELECT device_id FROM device_bindings WHERE patient_id = $1)
                ORDER BY d.device_id
                """,
                patient_id,
            )
        )

    async def observations(
        self,
        patient_id: str,
        *,
        temperature: bool,
        pump_status: bool,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        offset: int,
    ) -> tuple[list[Row], int]:
        """Readings of both kinds in device-time order, one page of them, and how many match."""
        records = await self._pool.fetch(
            _OBSERVATIONS_SQL,
            patient_id,
            temperature,
            pump_status,
            since or EARLIEST,
            until or LATEST,
            limit,
            offset,
        )
        total = int(records[0]["total"]) if records else 0
        return [dict(r) for r in records], total

    async def observation(self, teams: frozenset[str], kind: str, message_id: str) -> Row | None:
        table, columns = (
            ("temperature_readings", _TEMPERATURE_COLUMNS)
            if kind == "temperature"
            else ("pump_status", _PUMP_COLUMNS)
        )
        row = await self._pool.fetchrow(
            f"""
            SELECT {columns} FROM {table}
            WHERE message_id = $1::uuid AND patient_id IN (
                SELECT patient_id FROM patients WHERE care_team_id = ANY($2::text[]))
            ORDER BY device_time LIMIT 1
            """,
            message_id,
            list(teams),
        )
        return dict(row) if row else None

    async def temperatures(self, patient_id: str, since: datetime | None) -> list[Record]:
        """Every temperature reading of the patient (ingested at or after ``since``), as the
        driver's records: a course's readings are mapped once, copying them into dicts first
        would only add to the export's time. ``message_id`` is text, ``flags`` None when
        there are none."""
        return _records(
            await self._pool.fetch(
                f"SELECT {_EXPORT_COLUMNS['temperature_readings']} FROM temperature_readings "
                "WHERE patient_id = $1 AND ingest_time >= $2 ORDER BY device_time",
                patient_id,
                since or EARLIEST,
            )
        )

    async def pump_statuses(self, patient_id: str, since: datetime | None) -> list[Record]:
        """Every pump status of the patient (ingested at or after ``since``), as records
        (``message_id`` text, ``flags`` None when there are none)."""
        return _records(
            await self._pool.fetch(
                f"SELECT {_EXPORT_COLUMNS['pump_status']} FROM pump_status "
                "WHERE patient_id = $1 AND ingest_time >= $2 ORDER BY device_time",
                patient_id,
                since or EARLIEST,
            )
        )

    async def episodes(
        self,
        teams: frozenset[str],
        patient_id: str | None = None,
        *,
        alert_id: str | None = None,
    ) -> list[Row]:
        """Alert episodes of a patient, or the episode an alert id belongs to."""
        if alert_id is not None:
            where = "a.dedup_key = (SELECT dedup_key FROM alerts WHERE alert_id = $2::uuid)"
            key: str = alert_id
        elif patient_id is not None:
            where, key = "a.patient_id = $2", patient_id
        else:
            raise ValueError("episodes of a patient or of an alert id")
        return _rows(await self._pool.fetch(_EPISODES_SQL.format(where=where), list(teams), key))

    async def pages(self, patient_id: str, dedup_keys: Sequence[str]) -> list[Row]:
        if not dedup_keys:
            return []
        return _rows(await self._pool.fetch(_PAGES_SQL, patient_id, list(dedup_keys)))

    async def page_episode(self, teams: frozenset[str], page_id: str) -> tuple[str, str] | None:
        """(patient id, dedup key) of a page of ``teams``' patients."""
        row = await self._pool.fetchrow(
            "SELECT p.patient_id, p.dedup_key FROM pages p JOIN patients t USING (patient_id) "
            "WHERE p.page_id = $1::uuid AND t.care_team_id = ANY($2::text[])",
            page_id,
            list(teams),
        )
        return (row["patient_id"], row["dedup_key"]) if row else None

    # -- bulk export jobs (migration 0036): shared by the API replicas --------------------------

    async def create_export(self, job: Row) -> None:
        await self._pool.execute(
            """
            INSERT INTO fhir_export_jobs (job_id, owner, scope_patient, request_url,
                transaction_time, patient_ids, types, status, alive_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, 'running', $5)
            """,
            job["job_id"],
            job["owner"],
            job["scope_patient"],
            job["request_url"],
            job["transaction_time"],
            job["patient_ids"],
            list(job["types"]),
        )

    async def export_alive(self, job_id: str, done_patients: int, at: datetime) -> None:
        await self._pool.execute(
            "UPDATE fhir_export_jobs SET alive_at = $2, done_patients = $3 "
            "WHERE job_id = $1 AND status = 'running'",
            job_id,
            at,
            done_patients,
        )

    async def export_files_made(self, job_id: str, counts: Mapping[str, int], at: datetime) -> None:
        """Mark a running job's files made (``finished_at`` set, still ``running``): they are
        being stored, and a replica asked for one waits for them."""
        await self._pool.execute(
            "UPDATE fhir_export_jobs SET counts = $2::jsonb, finished_at = $3, "
            "done_patients = cardinality(patient_ids) WHERE job_id = $1 AND status = 'running'",
            job_id,
            json.dumps(dict(counts)),
            at,
        )

    async def finish_export(
        self,
        job_id: str,
        pieces: Sequence[tuple[str, int, bytes | memoryview]],
        counts: Mapping[str, int],
        at: datetime,
    ) -> None:
        """Store the files (``(type, piece number, bytes)``) and mark the job complete, at once."""
        async with self._pool.acquire() as conn, conn.transaction():
            for resource_type, piece, content in pieces:
                await conn.execute(
                    "INSERT INTO fhir_export_files (job_id, resource_type, piece, content) "
                    "VALUES ($1, $2, $3, $4)",
                    job_id,
                    resource_type,
                    piece,
                    content,
                )
            await conn.execute(
                "UPDATE fhir_export_jobs SET status = 'complete', counts = $2::jsonb, "
                "done_patients = cardinality(patient_ids), finished_at = $3 "
                "WHERE job_id = $1 AND status = 'running'",
                job_id,
                json.dumps(dict(counts)),
                at,
            )

    async def fail_exports(
        self,
        error: str,
        at: datetime,
        *,
        job_ids: Sequence[str] = (),
        silent_since: datetime | None = None,
    ) -> int:
        """Mark failed the running jobs named, and every running job not touched since
        ``silent_since`` (its replica stopped). Returns how many."""
        result = await self._pool.execute(
            "UPDATE fhir_export_jobs SET status = 'failed', error = $1, finished_at = $2 "
            "WHERE status = 'running' AND (job_id = ANY($3::text[]) OR alive_at < $4)",
            error,
            at,
            list(job_ids),
            silent_since,
        )
        return int(result.split()[-1])

    async def export_job(self, job_id: str) -> Row | None:
        row = await self._pool.fetchrow(
            "SELECT job_id, owner, scope_patient, request_url, transaction_time, patient_ids, "
            "types, status, done_patients, counts, error, finished_at "
            "FROM fhir_export_jobs WHERE job_id = $1",
            job_id,
        )
        if row is None:
            return None
        found = dict(row)
        found["counts"] = json.loads(found["counts"])
        return found

    async def export_exists(self, job_id: str) -> bool:
        return bool(
            await self._pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM fhir_export_jobs WHERE job_id = $1)", job_id
            )
        )

    async def running_exports(self, owner: str) -> int:
        """The owner's jobs still making their files (not those made and held unsaved)."""
        return int(
            await self._pool.fetchval(
                "SELECT count(*) FROM fhir_export_jobs "
                "WHERE owner = $1 AND status = 'running' AND finished_at IS NULL",
                owner,
            )
        )

    async def want_export(self, job_id: str) -> None:
        """Ask every replica (the one holding the job's files stores them)."""
        await self._pool.execute("SELECT pg_notify($1, $2)", EXPORT_WANTED, job_id)

    async def listen_for_wanted(
        self, callback: Callable[[str], None]
    ) -> Callable[[], Awaitable[None]]:
        """Call ``callback(job id)`` for every ``want_export``, on a connection held for it;
        returns the function that stops listening and gives the connection back."""
        conn = await self._pool.acquire()

        def wanted(connection: object, pid: int, channel: str, payload: object) -> None:
            callback(str(payload))

        await conn.add_listener(EXPORT_WANTED, wanted)

        async def stop() -> None:
            try:
                await conn.remove_listener(EXPORT_WANTED, wanted)
            finally:
                await self._pool.release(conn)

        return stop

    async def export_file(self, job_id: str, resource_type: str) -> AsyncIterator[bytes]:
        """A stored file, piece by piece (one piece in memory at a time)."""
        piece = 0
        while True:
            content = await self._pool.fetchval(
                "SELECT content FROM fhir_export_files "
                "WHERE job_id = $1 AND resource_type = $2 AND piece = $3",
                job_id,
                resource_type,
                piece,
            )
            if content is None:
                return
            yield bytes(content)
            piece += 1

    async def delete_exports(self, *, job_id: str | None = None, finished_before: datetime) -> None:
        """Delete a job (and its files), and every job finished before ``finished_before``."""
        await self._pool.execute(
            "DELETE FROM fhir_export_jobs WHERE job_id = $1 OR finished_at < $2",
            job_id,
            finished_before,
        )
