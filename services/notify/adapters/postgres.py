"""The notify service's PostgreSQL repository: alert log, pages, delivery attempts, care teams.

Owns the SQL against ``alerts``, ``pages`` and ``delivery_attempts`` (and reads ``patients`` and
``care_teams``); every write is idempotent so a redelivered alert is harmless. It does not decide
whom to page and does not send anything.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

from schemas.events import Alert, DeliveryStatus, Evidence, Page
from services.notify.domain import OnCall, Route, ThreadRoot
from services.notify.service_layer.ports import PageInsert, UndeliveredPage

_DONE = ("sent", "delivered", "read", "accepted")


class PostgresNotifyRepository:
    """Implements ``service_layer.ports.NotifyRepository`` over an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        # asyncpg ships no type information; the pool is an asyncpg.Pool.
        self._pool = pool

    async def record_alert(self, alert: Alert) -> bool:
        evidence = json.dumps([item.model_dump(mode="json") for item in alert.evidence])
        status = await self._pool.execute(
            """
            INSERT INTO alerts (alert_id, dedup_key, patient_id, device_id, kind, code, priority,
                                phase, state, title, device_time, ingest_time, evidence,
                                rule_id, rule_version)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15)
            ON CONFLICT (alert_id) DO NOTHING
            """,
            alert.alert_id,
            alert.dedup_key,
            alert.patient_id,
            alert.device_id,
            alert.kind.value,
            alert.code,
            alert.priority.value,
            alert.phase.value,
            alert.state.value,
            alert.title,
            alert.device_time,
            alert.ingest_time,
            evidence,
            alert.rule_id,
            alert.rule_version,
        )
        return bool(status == "INSERT 0 1")

    async def find_oncall(self, patient_id: str) -> OnCall | None:
        row = await self._pool.fetchrow(
            """
            SELECT p.care_team_id, ct.oncall_email
            FROM patients p LEFT JOIN care_teams ct ON ct.care_team_id = p.care_team_id
            WHERE p.patient_id = $1
            """,
            patient_id,
        )
        if row is None:
            return None
        return OnCall(care_team_id=str(row["care_team_id"]), email=str(row["oncall_email"] or ""))

    async def find_thread_root(self, dedup_key: str) -> ThreadRoot | None:
        row = await self._pool.fetchrow(
            """
            SELECT p.idempotency_key, p.recipient, p.care_team_id, p.route
            FROM pages p JOIN alerts a ON a.alert_id = p.alert_id
            WHERE p.dedup_key = $1 AND a.phase = 'start'
            ORDER BY p.created_at, p.page_id
            LIMIT 1
            """,
            dedup_key,
        )
        if row is None:
            return None
        return ThreadRoot(
            idempotency_key=str(row["idempotency_key"]),
            recipient=str(row["recipient"]),
            care_team_id=str(row["care_team_id"]),
            route=Route(row["route"]),
        )

    async def insert_page(
        self, page: Page, *, route: Route, route_detail: str | None
    ) -> PageInsert:
        async with self._pool.acquire() as conn:
            inserted = await conn.fetchval(
                """
                INSERT INTO pages (page_id, alert_id, dedup_key, patient_id, care_team_id, channel,
                                   recipient, idempotency_key, status, created_at, route,
                                   route_detail, updated_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11, $9)
                ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING page_id
                """,
                page.page_id,
                page.alert_id,
                page.dedup_key,
                page.patient_id,
                page.care_team_id,
                page.channel,
                page.recipient,
                page.idempotency_key,
                page.created_at,
                route.value,
                route_detail,
            )
            if inserted is not None:
                return PageInsert(new=True, page_id=page.page_id, status=DeliveryStatus.QUEUED)
            row = await conn.fetchrow(
                "SELECT page_id, status FROM pages WHERE idempotency_key = $1",
                page.idempotency_key,
            )
        return PageInsert(new=False, page_id=row["page_id"], status=DeliveryStatus(row["status"]))

    async def record_attempt(
        self,
        page_id: UUID,
        *,
        channel: str,
        recipient: str,
        status: DeliveryStatus,
        at: datetime,
        detail: str | None,
        provider_message_id: str | None,
    ) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            # The page row lock serialises attempt numbering between concurrent senders.
            await conn.execute("SELECT 1 FROM pages WHERE page_id = $1 FOR UPDATE", page_id)
            number = await conn.fetchval(
                """
                INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, status, at,
                                               detail, provider_message_id)
                SELECT $1, COALESCE(MAX(attempt), 0) + 1, $2, $3, $4, $5, $6, $7
                FROM delivery_attempts WHERE page_id = $1
                RETURNING attempt
                """,
                page_id,
                channel,
                recipient,
                status.value,
                at,
                detail,
                provider_message_id,
            )
            # A late failure must not hide that an earlier attempt already got through.
            await conn.execute(
                """
                UPDATE pages
                SET status = CASE WHEN status = ANY($3::text[]) AND $2::text = 'failed'
                                  THEN status ELSE $2::text END,
                    updated_at = $4
                WHERE page_id = $1
                """,
                page_id,
                status.value,
                list(_DONE),
                at,
            )
        return int(number)

    async def page_status(self, page_id: UUID) -> DeliveryStatus | None:
        status = await self._pool.fetchval("SELECT status FROM pages WHERE page_id = $1", page_id)
        return None if status is None else DeliveryStatus(status)

    async def undelivered_pages(self) -> list[UndeliveredPage]:
        rows = await self._pool.fetch(
            """
            SELECT p.page_id, p.alert_id, p.dedup_key, p.patient_id, p.care_team_id, p.channel,
                   p.recipient, p.idempotency_key, p.created_at AS page_created_at, p.route,
                   p.route_detail,
                   a.device_id, a.kind, a.code, a.priority, a.phase, a.state, a.title,
                   a.device_time, a.ingest_time, a.evidence, a.rule_id, a.rule_version,
                   (SELECT count(*) FROM delivery_attempts d WHERE d.page_id = p.page_id)
                       AS attempts_made
            FROM pages p JOIN alerts a ON a.alert_id = p.alert_id
            WHERE p.status IN ('queued', 'failed') AND p.escalation_id IS NULL
            ORDER BY p.created_at, p.page_id
            """
        )
        return [_undelivered(row) for row in rows]


def _undelivered(row: Any) -> UndeliveredPage:
    page = Page.model_validate(
        {
            "page_id": row["page_id"],
            "alert_id": row["alert_id"],
            "dedup_key": row["dedup_key"],
            "patient_id": row["patient_id"],
            "care_team_id": row["care_team_id"],
            "channel": row["channel"],
            "recipient": row["recipient"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["page_created_at"],
        }
    )
    alert = alert_from_row(row)
    return UndeliveredPage(
        page=page,
        alert=alert,
        route=Route(row["route"]),
        route_detail=row["route_detail"],
        attempts_made=int(row["attempts_made"]),
    )


def alert_from_row(row: Any) -> Alert:
    """An ``alerts`` row (or a join carrying its columns) as the Alert it recorded."""
    return Alert.model_validate(
        {
            "alert_id": row["alert_id"],
            "dedup_key": row["dedup_key"],
            "patient_id": row["patient_id"],
            "device_id": row["device_id"],
            "kind": row["kind"],
            "code": row["code"],
            "priority": row["priority"],
            "phase": row["phase"],
            "state": row["state"],
            "title": row["title"],
            "device_time": row["device_time"],
            "ingest_time": row["ingest_time"],
            "evidence": tuple(Evidence.model_validate(e) for e in json.loads(row["evidence"])),
            "rule_id": row["rule_id"],
            "rule_version": row["rule_version"],
        }
    )
