"""PostgreSQL side of "after an outage" (migration 0028): the outages, the start phases held
for their end, and the care teams' summary pages.

Owns the SQL against ``pipeline_outages``, ``pipeline_outage_held`` and
``pipeline_outage_pages``, and reads ``alerts``, ``escalations``, ``patients`` and
``care_teams`` to say what happened during an outage. The end of an outage is written to the
audit log in the same transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from schemas.events import Alert, AlertPriority
from services.notify.domain.outage import Episode, OutageWindow
from vigil.audit.actions import AuditAction
from vigil.audit.store import append as audit_append


@dataclass(frozen=True, slots=True)
class Outage:
    outage_id: UUID
    source: str
    window: OutageWindow


@dataclass(frozen=True, slots=True)
class TeamAccount:
    care_team_id: str
    name: str
    zone: str
    oncall_email: str
    patients: tuple[str, ...]
    during: tuple[Episode, ...]
    open_before: tuple[Episode, ...]


@dataclass(frozen=True, slots=True)
class SummaryPage:
    page_id: UUID
    outage_id: UUID
    care_team_id: str
    channel: str
    recipient: str
    subject: str
    body: str
    short_text: str
    tries: int


_EPISODES = """
    WITH phases AS (
        SELECT a.dedup_key, a.patient_id, a.phase, a.priority, a.title, a.device_time,
               a.received_at
        FROM alerts a JOIN patients p ON p.patient_id = a.patient_id
        WHERE p.care_team_id = $1 AND a.code <> 'pipeline.heartbeat'
    ), starts AS (
        SELECT DISTINCT ON (dedup_key) dedup_key, patient_id, priority, title, device_time
        FROM phases WHERE phase IN ('start', 'escalate')
        ORDER BY dedup_key, device_time, received_at
    ), worst AS (
        SELECT dedup_key, title AS worst_title, priority AS worst_priority FROM (
            SELECT dedup_key, title, priority, row_number() OVER (
                PARTITION BY dedup_key ORDER BY CASE priority WHEN 'high' THEN 0
                WHEN 'medium' THEN 1 WHEN 'low' THEN 2 ELSE 3 END, device_time DESC) AS n
            FROM phases WHERE phase IN ('start', 'escalate')
        ) ranked WHERE n = 1
    ), ends AS (
        SELECT dedup_key, min(device_time) AS ended_at FROM phases WHERE phase = 'end'
        GROUP BY dedup_key
    )
    SELECT s.dedup_key, s.patient_id, w.worst_priority AS priority, w.worst_title AS title,
           s.device_time AS began_at, e.ended_at, x.escalation_id, x.status, x.acknowledged_by,
           x.resolved_at
    FROM starts s JOIN worst w USING (dedup_key)
    LEFT JOIN ends e USING (dedup_key)
    LEFT JOIN escalations x ON x.dedup_key = s.dedup_key
"""


def _episode(row: Any) -> Episode:
    return Episode(
        patient_id=str(row["patient_id"]),
        dedup_key=str(row["dedup_key"]),
        title=str(row["title"]),
        priority=AlertPriority(row["priority"]),
        began_at=row["began_at"],
        ended_at=row["ended_at"]
        if row["ended_at"] is not None
        else (row["resolved_at"] if row["status"] == "resolved" else None),
        paged=row["escalation_id"] is not None,
        acknowledged_by=None if row["acknowledged_by"] is None else str(row["acknowledged_by"]),
    )


class PostgresOutageStore:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    # -- the outage itself --------------------------------------------------------------------

    async def opened(self, source: str, started_at: datetime, detected_at: datetime) -> None:
        await self._pool.execute(
            "INSERT INTO pipeline_outages (outage_id, source, started_at, detected_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (source, started_at) DO NOTHING",
            _outage_id(source, started_at),
            source,
            started_at,
            detected_at,
        )

    async def closed(
        self,
        source: str,
        started_at: datetime,
        ended_at: datetime,
        recovered_at: datetime,
        summary_due_at: datetime,
    ) -> UUID:
        """Record the outage's end (first heartbeat back) and when its summaries fall due, and
        audit it, in one transaction. An outage whose start was not recorded (the silence began
        before migration 0028) is recorded whole here."""
        outage_id = _outage_id(source, started_at)
        async with self._pool.acquire() as conn, conn.transaction():
            ended = await conn.fetchval(
                """
                INSERT INTO pipeline_outages (outage_id, source, started_at, ended_at, detected_at,
                                              recovered_at, summary_due_at)
                VALUES ($1, $2, $3, $4, $5, $5, $6)
                ON CONFLICT (source, started_at) DO UPDATE
                    SET ended_at = EXCLUDED.ended_at, recovered_at = EXCLUDED.recovered_at,
                        summary_due_at = EXCLUDED.summary_due_at
                    WHERE pipeline_outages.ended_at IS NULL
                RETURNING outage_id
                """,
                outage_id,
                source,
                started_at,
                max(ended_at, started_at),
                recovered_at,
                summary_due_at,
            )
            if ended is not None:
                await audit_append(
                    conn,
                    "notify",
                    AuditAction.PIPELINE_OUTAGE_RECORDED,
                    f"pipeline:{source}",
                    {
                        "outage_id": str(outage_id),
                        "started_at": started_at.isoformat(),
                        "ended_at": max(ended_at, started_at).isoformat(),
                        "recovered_at": recovered_at.isoformat(),
                    },
                    at=recovered_at,
                )
        return outage_id

    async def outage_covering(self, device_time: datetime) -> UUID | None:
        """The ended outage, not yet summarised, whose window holds ``device_time``."""
        value = await self._pool.fetchval(
            """
            SELECT outage_id FROM pipeline_outages
            WHERE ended_at IS NOT NULL AND summarised_at IS NULL
              AND started_at <= $1 AND ended_at >= $1
            ORDER BY started_at LIMIT 1
            """,
            device_time,
        )
        return None if value is None else UUID(str(value))

    async def outages(self, *, since: datetime | None, limit: int) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            """
            SELECT o.outage_id, o.source, o.started_at, o.ended_at, o.detected_at,
                   o.recovered_at, o.summarised_at,
                   (SELECT count(DISTINCT care_team_id) FROM pipeline_outage_pages p
                    WHERE p.outage_id = o.outage_id) AS teams_told
            FROM pipeline_outages o
            WHERE $1::timestamptz IS NULL OR coalesce(o.ended_at, 'infinity') >= $1
            ORDER BY o.started_at DESC LIMIT $2
            """,
            since,
            limit,
        )
        return [dict(r) for r in rows]

    # -- start phases held for their end ------------------------------------------------------

    async def hold(self, alert: Alert, outage_id: UUID, at: datetime, due_at: datetime) -> bool:
        """Hold ``alert`` (True), or say it was held and released before (False: page it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            released = await conn.fetchval(
                "SELECT released_at IS NOT NULL FROM pipeline_outage_held WHERE dedup_key = $1",
                alert.dedup_key,
            )
            if released is not None:
                return not bool(released)
            await conn.execute(
                "INSERT INTO pipeline_outage_held (dedup_key, outage_id, alert, held_at, due_at) "
                "VALUES ($1, $2, $3::jsonb, $4, $5) ON CONFLICT (dedup_key) DO NOTHING",
                alert.dedup_key,
                outage_id,
                alert.model_dump_json(),
                at,
                due_at,
            )
            return True

    async def release(self, dedup_key: str, at: datetime) -> bool:
        """Release a held alert early (it worsened); False when it was not held."""
        status = await self._pool.execute(
            "UPDATE pipeline_outage_held SET released_at = $2, outcome = 'paged' "
            "WHERE dedup_key = $1 AND released_at IS NULL",
            dedup_key,
            at,
        )
        return str(status).endswith(" 1")

    async def due_held(self, now: datetime) -> list[tuple[Alert, bool]]:
        """Held alerts whose wait is over, each with whether its end has arrived."""
        rows = await self._pool.fetch(
            """
            SELECT h.alert::text AS alert,
                   EXISTS (SELECT 1 FROM alerts a WHERE a.dedup_key = h.dedup_key
                           AND a.phase = 'end') AS ended
            FROM pipeline_outage_held h
            WHERE h.released_at IS NULL AND h.due_at <= $1
            ORDER BY h.due_at, h.dedup_key
            """,
            now,
        )
        return [(Alert.model_validate_json(r["alert"]), bool(r["ended"])) for r in rows]

    async def mark_released(self, dedup_key: str, at: datetime, outcome: str) -> None:
        await self._pool.execute(
            "UPDATE pipeline_outage_held SET released_at = $2, outcome = $3 "
            "WHERE dedup_key = $1 AND released_at IS NULL",
            dedup_key,
            at,
            outcome,
        )

    async def next_held_due(self) -> datetime | None:
        value: datetime | None = await self._pool.fetchval(
            "SELECT min(due_at) FROM pipeline_outage_held WHERE released_at IS NULL"
        )
        return value

    # -- summaries ----------------------------------------------------------------------------

    async def due_outages(self, now: datetime) -> list[Outage]:
        """Ended outages whose summaries are due and none of whose held alerts still waits."""
        rows = await self._pool.fetch(
            """
            SELECT o.outage_id, o.source, o.started_at, o.ended_at FROM pipeline_outages o
            WHERE o.summarised_at IS NULL AND o.summary_due_at <= $1 AND o.ended_at IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM pipeline_outage_held h
                              WHERE h.outage_id = o.outage_id AND h.released_at IS NULL)
            ORDER BY o.started_at
            """,
            now,
        )
        return [
            Outage(
                UUID(str(r["outage_id"])),
                str(r["source"]),
                OutageWindow(r["started_at"], r["ended_at"]),
            )
            for r in rows
        ]

    async def accounts(
        self, window: OutageWindow, *, exclude: set[str], only: frozenset[str] | None = None
    ) -> list[TeamAccount]:
        """Each care team with monitored patients, with its episodes during ``window`` and its
        episodes from before it still open and unacknowledged."""
        teams = await self._pool.fetch(
            """
            SELECT t.care_team_id, t.name, t.timezone, t.oncall_email,
                   array_agg(p.patient_id ORDER BY p.patient_id) AS patients
            FROM care_teams t JOIN patients p ON p.care_team_id = t.care_team_id
            WHERE $1::text[] IS NULL OR t.care_team_id = ANY($1::text[])
            GROUP BY t.care_team_id ORDER BY t.care_team_id
            """,
            None if only is None else sorted(only),
        )
        accounts: list[TeamAccount] = []
        for team in teams:
            team_id = str(team["care_team_id"])
            if team_id in exclude:
                continue
            rows = await self._pool.fetch(_EPISODES, team_id)
            episodes = [_episode(r) for r in rows]
            during = tuple(e for e in episodes if window.covers(e.began_at))
            before = tuple(
                e
                for e in episodes
                if e.began_at < window.started_at
                and e.needs_action
                and any(
                    r["dedup_key"] == e.dedup_key and r["status"] in ("open", "exhausted")
                    for r in rows
                )
            )
            accounts.append(
                TeamAccount(
                    care_team_id=team_id,
                    name=str(team["name"]),
                    zone=str(team["timezone"] or "UTC"),
                    oncall_email=str(team["oncall_email"] or ""),
                    patients=tuple(str(p) for p in team["patients"]),
                    during=during,
                    open_before=before,
                )
            )
        return accounts

    async def contacts(self, person_id: str) -> list[tuple[str, str]]:
        rows = await self._pool.fetch(
            "SELECT channel, address FROM contact_methods WHERE person_id = $1 ORDER BY rank",
            person_id,
        )
        return [(str(r["channel"]), str(r["address"])) for r in rows]

    async def write_summaries(
        self,
        outage_id: UUID,
        pages: list[tuple[str, str, str, str, str, str, str]],
        at: datetime,
    ) -> bool:
        """Queue the summary pages (care team, recipient ref, channel, address, subject, body,
        short text) and mark the outage summarised, in one transaction; False when another
        instance did it first."""
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                "SELECT outage_id FROM pipeline_outages WHERE outage_id = $1 "
                "AND summarised_at IS NULL FOR UPDATE SKIP LOCKED",
                outage_id,
            )
            if claimed is None:
                return False
            await conn.executemany(
                """
                INSERT INTO pipeline_outage_pages (page_id, outage_id, care_team_id, recipient_ref,
                    channel, recipient, subject, body, short_text, status, next_attempt_at,
                    created_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', $10, $10)
                ON CONFLICT (outage_id, care_team_id, channel, recipient) DO NOTHING
                """,
                [
                    (
                        uuid.uuid5(
                            uuid.NAMESPACE_URL,
                            f"urn:vigil:outage-summary:{outage_id}:{team}:{channel}:{address}",
                        ),
                        outage_id,
                        team,
                        ref,
                        channel,
                        address,
                        subject,
                        body,
                        short,
                        at,
                    )
                    for team, ref, channel, address, subject, body, short in pages
                ],
            )
            await conn.execute(
                "UPDATE pipeline_outages SET summarised_at = $2 WHERE outage_id = $1",
                outage_id,
                at,
            )
            return True

    async def due_pages(self, now: datetime, limit: int = 100) -> list[SummaryPage]:
        rows = await self._pool.fetch(
            """
            SELECT * FROM pipeline_outage_pages
            WHERE status = 'queued' AND next_attempt_at <= $1
            ORDER BY next_attempt_at, page_id LIMIT $2
            """,
            now,
            limit,
        )
        return [
            SummaryPage(
                page_id=UUID(str(r["page_id"])),
                outage_id=UUID(str(r["outage_id"])),
                care_team_id=str(r["care_team_id"]),
                channel=str(r["channel"]),
                recipient=str(r["recipient"]),
                subject=str(r["subject"]),
                body=str(r["body"]),
                short_text=str(r["short_text"]),
                tries=int(r["tries"]),
            )
            for r in rows
        ]

    async def record_page(
        self, page: SummaryPage, *, sent: bool, detail: str, at: datetime, retry_in_s: float | None
    ) -> None:
        """Record one try: sent, to be retried after ``retry_in_s``, or failed for good."""
        status = "sent" if sent else ("queued" if retry_in_s is not None else "failed")
        await self._pool.execute(
            """
            UPDATE pipeline_outage_pages
            SET status = $2, tries = tries + 1, detail = $3,
                sent_at = CASE WHEN $2 = 'sent' THEN $4 ELSE sent_at END,
                next_attempt_at = $5
            WHERE page_id = $1 AND status = 'queued'
            """,
            page.page_id,
            status,
            detail,
            at,
            None if retry_in_s is None or sent else at + timedelta(seconds=retry_in_s),
        )


def _outage_id(source: str, started_at: datetime) -> UUID:
    return uuid.uuid5(
        uuid.NAMESPACE_URL, f"urn:vigil:pipeline-outage:{source}:{started_at.isoformat()}"
    )
