"""The escalation repository in PostgreSQL: ``escalations`` and their timeline
(``escalation_events``), ``used_ack_tokens``. Every state change of an escalation happens in the
caller's transaction with its row locked (``lock``, ``lock_held``, ``lock_due``, or a bundle's
release): the service layer runs the pure ``advance`` and writes the new state (``save``), its
timeline entries and the pages its commands ask for (the outbox) in the same unit of work, so a
command is never lost between deciding and queueing, and an acknowledgement that committed
first is seen by every later tick.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from schemas.events import Alert
from services.notify.adapters.postgres.outbox import (
    write_event,
)
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    Acknowledge,
    EscalationState,
    EscalationStatus,
    PolicySnapshot,
    TimelineEntry,
    snapshot_from_json,
    snapshot_to_json,
)
from services.notify.service_layer.unit_of_work import Change, EscalationRecord

# Acknowledgements that answer a page (its signed link, an SMS reply): they act under the cover
# the page was sent under. One through the care-team API is audited there with the caller's own
# cover (services/api/adapters/audit.py).
_PAGE_REPLIES = frozenset({"link", "sms"})


class PostgresEscalations:
    """Escalation rows: opened with their first step, events applied under the row lock, due
    steps ticked, state and timeline read."""

    def __init__(self, db: Any, *, fallback_email: str = DEFAULT_FALLBACK_EMAIL) -> None:
        # An asyncpg connection (inside a ``PostgresUnitOfWork``) or, for a single statement,
        # the pool; asyncpg ships no type information.
        self._db = db
        # Paged for a team that has no on-call address of its own (``PageWriter.fallback``).
        self._fallback_email = fallback_email

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        value = await self._db.fetchval(
            "SELECT escalation_id FROM escalations WHERE dedup_key = $1", dedup_key
        )
        return None if value is None else UUID(str(value))

    async def note_all(self, entries: Sequence[tuple[UUID, TimelineEntry]], at: datetime) -> None:
        """Timeline entries of several escalations, written together."""
        if entries:
            await self._db.executemany(
                "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
                "VALUES ($1, $2, $3, $4::jsonb)",
                [
                    (escalation_id, at, entry.kind, json.dumps(entry.detail, default=str))
                    for escalation_id, entry in entries
                ],
            )

    async def under_cover(self) -> list[tuple[UUID, str, str]]:
        rows = await self._db.fetch(
            """
            SELECT e.escalation_id, e.patient_id, e.care_team_id
            FROM escalations e JOIN patients p ON p.patient_id = e.patient_id
            WHERE e.status IN ('open', 'exhausted', 'acknowledged')
              AND e.care_team_id <> p.care_team_id
              AND EXISTS (SELECT 1 FROM cover_agreements c
                          WHERE c.covering_team_id = e.care_team_id
                            AND c.covered_team_id = p.care_team_id)
              AND NOT EXISTS (SELECT 1 FROM escalation_events v
                              WHERE v.escalation_id = e.escalation_id
                                AND v.kind = 'handed_back')
            """
        )
        return [(r["escalation_id"], r["patient_id"], r["care_team_id"]) for r in rows]

    async def refile(
        self, escalation_id: UUID, *, care_team_id: str, snapshot: PolicySnapshot
    ) -> None:
        await self._db.execute(
            "UPDATE escalations SET care_team_id = $2, snapshot = $3::jsonb "
            "WHERE escalation_id = $1",
            escalation_id,
            care_team_id,
            json.dumps(snapshot_to_json(snapshot)),
        )

    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
        conn = self._db
        await write_event(conn, escalation_id, at, entry)

    async def add(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        state: EscalationState,
        at: datetime,
    ) -> UUID | None:
        """Insert the episode's escalation in ``state`` (its first step fired); None when the
        dedup key already has an escalation."""
        escalation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:escalation:{alert.dedup_key}")
        inserted = await self._db.fetchval(
            """
            INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                                     care_team_id, snapshot, status, step_index, pass_no,
                                     due_at, paged, opened_at)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12)
            ON CONFLICT (dedup_key) DO NOTHING
            RETURNING escalation_id
            """,
            escalation_id,
            alert.dedup_key,
            alert.alert_id,
            alert.patient_id,
            care_team_id,
            json.dumps(snapshot_to_json(snapshot)),
            state.status.value,
            state.step_index,
            state.pass_no,
            state.due_at,
            list(state.paged),
            at,
        )
        return None if inserted is None else escalation_id

    async def add_not_paged(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        reason: str,
        at: datetime,
    ) -> UUID | None:
        """Record an alert that must page nobody (``domain.monitoring_end``): its escalation
        row written already resolved, no step fired and nobody paged, so the episode's later
        phases find it and page nothing, with the timeline's ``not_paged`` entry and the audit
        entry ``notify.alert_not_paged``; None when the dedup key already has an escalation."""
        from vigil.audit import append as audit_append
        from vigil.audit.actions import AuditAction

        escalation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:escalation:{alert.dedup_key}")
        inserted = await self._db.fetchval(
            """
            INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                                     care_team_id, snapshot, status, due_at, resolved_at,
                                     opened_at)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb, 'resolved', NULL, $7, $7)
            ON CONFLICT (dedup_key) DO NOTHING
            RETURNING escalation_id
            """,
            escalation_id,
            alert.dedup_key,
            alert.alert_id,
            alert.patient_id,
            care_team_id,
            json.dumps(snapshot_to_json(snapshot)),
            at,
        )
        if inserted is None:
            return None
        detail = {"reason": reason, "alert_id": str(alert.alert_id), "rule_id": alert.rule_id}
        await write_event(self._db, escalation_id, at, TimelineEntry("not_paged", detail))
        await audit_append(
            self._db,
            "notify",
            AuditAction.ALERT_NOT_PAGED.value,
            f"patient:{alert.patient_id}",
            {
                "dedup_key": alert.dedup_key,
                "reason": reason,
                "device_time": alert.device_time.isoformat(),
                "escalation_id": str(escalation_id),
            },
            at=at,
        )
        return escalation_id

    async def lock(
        self, escalation_id: UUID, *, whole_bundle: bool = False
    ) -> list[EscalationRecord]:
        """The escalation under its row lock; with ``whole_bundle``, every escalation of its
        bundle (an acknowledgement from a bundled page acknowledges every alert it listed)."""
        conn = self._db
        bundle_id = None
        if whole_bundle:
            bundle_id = await conn.fetchval(
                "SELECT bundle_id FROM escalations WHERE escalation_id = $1", escalation_id
            )
        if bundle_id is None:
            rows = await conn.fetch(
                "SELECT * FROM escalations WHERE escalation_id = $1 FOR UPDATE",
                escalation_id,
            )
        else:
            # Locked in one order by every caller, so two bundle acks cannot deadlock.
            rows = await conn.fetch(
                "SELECT * FROM escalations WHERE bundle_id = $1 ORDER BY escalation_id FOR UPDATE",
                bundle_id,
            )
        return [record_from_row(row) for row in rows]

    async def lock_held(self, dedup_key: str, bundle_id: UUID) -> list[EscalationRecord]:
        """The episode's escalation held in bundle ``bundle_id``, locked (none once released)."""
        rows = await self._db.fetch(
            "SELECT * FROM escalations WHERE dedup_key = $1 AND bundle_id = $2 FOR UPDATE",
            dedup_key,
            bundle_id,
        )
        return [record_from_row(row) for row in rows]

    async def lock_due(self, now: datetime, *, limit: int) -> list[EscalationRecord]:
        """The escalations whose next step is due; those another ticker holds are skipped, not
        waited for."""
        rows = await self._db.fetch(
            """
            SELECT * FROM escalations
            WHERE status = 'open' AND due_at <= $1
            ORDER BY due_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
            """,
            now,
            limit,
        )
        return [record_from_row(row) for row in rows]

    async def save(self, changes: Sequence[Change]) -> None:
        await save_states(self._db, changes)

    async def record_acknowledged(
        self, record: EscalationRecord, event: Acknowledge, *, at: datetime
    ) -> None:
        # Whoever acknowledged, by whatever channel (API, signed link, SMS reply), goes into the
        # tamper-evident audit log in the same transaction as the ack itself.
        from vigil.audit import append as audit_append
        from vigil.audit.actions import AuditAction

        details: dict[str, Any] = {
            "dedup_key": record.dedup_key,
            "via": event.via,
            "escalation_id": str(record.escalation_id),
        }
        if event.via in _PAGE_REPLIES:
            cover = await self._cover_of(record)
            if cover is not None:
                details["cover"] = [cover]
        await audit_append(
            self._db,
            event.by,
            AuditAction.ALERT_ACKNOWLEDGED.value,
            f"patient:{record.patient_id}",
            details,
            at=at,
        )

    async def _cover_of(self, record: EscalationRecord) -> dict[str, Any] | None:
        """The cover agreement a reply to this escalation's page acts under: the one its
        ``paged_under_cover`` entry names, while the escalation is still filed under that
        entry's covering team (once handed back it is the home team's own). The same shape as
        the care-team API's ``details.cover`` entries."""
        value = await self._db.fetchval(
            """
            SELECT detail FROM escalation_events
            WHERE escalation_id = $1 AND kind = 'paged_under_cover'
              AND detail ->> 'care_team_id' = $2
            ORDER BY event_id DESC LIMIT 1
            """,
            record.escalation_id,
            record.care_team_id,
        )
        if value is None:
            return None
        detail = json.loads(value) if isinstance(value, str) else value
        return {
            "covered_team": detail.get("covered_team_id"),
            "agreement": detail.get("agreement_id"),
            "version": detail.get("agreement_version"),
        }

    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None:
        """Make ``alert_id`` (a newer phase of the episode, already recorded) the alert that
        the episode's escalation and bundle memberships page about."""
        conn = self._db
        await conn.execute(
            "UPDATE escalations SET alert_id = $2 WHERE dedup_key = $1", dedup_key, alert_id
        )
        await conn.execute(
            "UPDATE notify_bundle_members SET alert_id = $2 WHERE dedup_key = $1",
            dedup_key,
            alert_id,
        )

    async def open_paged_to(self, channel: str, address: str) -> UUID | None:
        """The most recent unacknowledged escalation that paged this address on this channel."""
        value = await self._db.fetchval(
            """
            SELECT e.escalation_id FROM pages p JOIN escalations e
                ON e.escalation_id = p.escalation_id
            WHERE p.channel = $1 AND p.recipient = $2
              AND e.status IN ('open', 'exhausted')
              -- A caregiver's number never acknowledges for the care team.
              AND p.purpose NOT IN ('all_clear', 'caregiver')
            ORDER BY p.created_at DESC
            LIMIT 1
            """,
            channel,
            address,
        )
        return None if value is None else UUID(str(value))

    async def spend_token(self, digest: str, at: datetime) -> bool:
        """True the first time a token is used, False every time after."""
        status = await self._db.execute(
            "INSERT INTO used_ack_tokens (token_digest, used_at) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING",
            digest,
            at,
        )
        return bool(status == "INSERT 0 1")

    async def state_of(self, escalation_id: UUID) -> EscalationState | None:
        row = await self._db.fetchrow(
            "SELECT * FROM escalations WHERE escalation_id = $1", escalation_id
        )
        return None if row is None else state_from_row(row)

    async def timeline(self, dedup_key: str) -> dict[str, Any] | None:
        conn = self._db
        row = await conn.fetchrow("SELECT * FROM escalations WHERE dedup_key = $1", dedup_key)
        if row is None:
            return None
        events = await conn.fetch(
            "SELECT event_id, at, kind, detail FROM escalation_events "
            "WHERE escalation_id = $1 ORDER BY event_id",
            row["escalation_id"],
        )
        phases = await conn.fetch(
            "SELECT alert_id, phase, priority, received_at FROM alerts WHERE dedup_key = $1 "
            "ORDER BY received_at, alert_id",
            dedup_key,
        )
        attempts = await conn.fetch(
            """
            SELECT d.page_id, d.attempt, d.channel, d.recipient, d.status, d.at, d.detail,
                   d.provider_message_id, d.started_at, p.recipient_ref, p.purpose
            FROM delivery_attempts d JOIN pages p ON p.page_id = d.page_id
            WHERE p.escalation_id = $1
            ORDER BY d.at, p.created_at, p.contact_rank, d.page_id, d.attempt
            """,
            row["escalation_id"],
        )
        state = state_from_row(row)
        return {
            "escalation_id": str(row["escalation_id"]),
            "dedup_key": dedup_key,
            "patient_id": row["patient_id"],
            "care_team_id": row["care_team_id"],
            "status": state.status.value,
            "opened_at": row["opened_at"].isoformat(),
            "acknowledged_by": state.acknowledged_by,
            "acknowledged_at": _iso(state.acknowledged_at),
            "resolved_at": _iso(state.resolved_at),
            "next_step_due_at": _iso(state.due_at),
            "alert_phases": [
                {
                    "alert_id": str(p["alert_id"]),
                    "phase": p["phase"],
                    "priority": p["priority"],
                    "received_at": p["received_at"].isoformat(),
                }
                for p in phases
            ],
            "events": [
                {
                    "seq": e["event_id"],
                    "at": e["at"].isoformat(),
                    "kind": e["kind"],
                    "detail": json.loads(e["detail"]),
                }
                for e in events
            ],
            "attempts": [
                {
                    "page_id": str(a["page_id"]),
                    "attempt": a["attempt"],
                    "channel": a["channel"],
                    "recipient": a["recipient"],
                    "recipient_ref": a["recipient_ref"],
                    "purpose": a["purpose"],
                    "status": a["status"],
                    "started_at": _iso(a["started_at"]),
                    "at": a["at"].isoformat(),
                    "detail": a["detail"],
                    "provider_message_id": a["provider_message_id"],
                }
                for a in attempts
            ],
        }


async def save_states(conn: Any, changes: Sequence[Change]) -> None:
    updates: list[tuple[Any, ...]] = []
    for record, transition in changes:
        state = transition.state
        updates.append(
            (
                record.escalation_id,
                state.status.value,
                state.step_index,
                state.pass_no,
                state.due_at,
                list(state.paged),
                state.acknowledged_by,
                state.acknowledged_at,
                state.resolved_at,
                state.snoozed_until,
                state.round_no,
            )
        )
    await conn.executemany(
        """
        UPDATE escalations
        SET status = $2, step_index = $3, pass_no = $4, due_at = $5, paged = $6,
            acknowledged_by = $7, acknowledged_at = $8, resolved_at = $9, snoozed_until = $10,
            round_no = $11
        WHERE escalation_id = $1
        """,
        updates,
    )


def record_from_row(row: Any) -> EscalationRecord:
    """An ``escalations`` row as the engine's input."""
    return EscalationRecord(
        escalation_id=UUID(str(row["escalation_id"])),
        dedup_key=str(row["dedup_key"]),
        alert_id=UUID(str(row["alert_id"])),
        patient_id=str(row["patient_id"]),
        care_team_id=str(row["care_team_id"]),
        bundle_id=None if row["bundle_id"] is None else UUID(str(row["bundle_id"])),
        opened_at=row["opened_at"],
        snapshot=snapshot_from_json(json.loads(row["snapshot"])),
        state=state_from_row(row),
    )


def state_from_row(row: Any) -> EscalationState:
    return EscalationState(
        status=EscalationStatus(row["status"]),
        step_index=int(row["step_index"]),
        pass_no=int(row["pass_no"]),
        due_at=row["due_at"],
        paged=tuple(row["paged"]),
        acknowledged_by=row["acknowledged_by"],
        acknowledged_at=row["acknowledged_at"],
        resolved_at=row["resolved_at"],
        snoozed_until=row["snoozed_until"],
        round_no=int(row["round_no"]),
    )


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()
