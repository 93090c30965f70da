"""The escalation repository in PostgreSQL: ``escalations`` and their timeline
(``escalation_events``), ``used_ack_tokens``. Every state change of an escalation happens in the
caller's transaction with its row locked: the pure ``advance`` runs and the new state, its
timeline entries and the pages its commands ask for are written together, so a command is never
lost between deciding and queueing, and an acknowledgement that committed first is seen by every
later tick.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from schemas.events import Alert
from services.notify.adapters.postgres.alerts import alert_from_row
from services.notify.adapters.postgres.outbox import (
    PageWriter,
    people_of,
    upstream_sync,
    write_event,
)
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    Acknowledge,
    EscalationEvent,
    EscalationState,
    EscalationStatus,
    PolicySnapshot,
    Resolve,
    Tick,
    TimelineEntry,
    Transition,
    advance,
    early_cycle_to_json,
    opened,
    snapshot_from_json,
    snapshot_to_json,
)
from services.notify.domain.routing import (
    PagePurpose,
)
from services.notify.service_layer.ports import (
    PageJob,
)


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

    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
        conn = self._db
        await write_event(conn, escalation_id, at, entry)

    async def open_and_fire(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        lease_s: float,
    ) -> tuple[UUID | None, list[PageJob]]:
        """Start the episode's escalation and fire its first step in the same transaction.

        Returns the escalation id (None when the dedup key already has one) and the first
        step's pages, already claimed for this caller to send, so the first attempt does not
        wait for a ticker.
        """
        conn = self._db
        writer = PageWriter(conn, at, self._fallback_email)
        escalation_id = await open_in(conn, writer, alert, care_team_id, snapshot, at)
        if escalation_id is None:
            return None, []
        jobs = await writer.flush(claim_until=at + timedelta(seconds=lease_s))
        return escalation_id, jobs

    async def apply(
        self,
        escalation_id: UUID,
        event: EscalationEvent,
        *,
        at: datetime,
        whole_bundle: bool = False,
    ) -> Transition | None:
        """Run one event through the engine under the escalation's row lock.

        With ``whole_bundle`` the event goes to every escalation of the escalation's bundle
        (an acknowledgement from a bundled page acknowledges every alert it listed); the
        transition returned is the named escalation's. Acknowledge and resolve queue the
        PagerDuty acknowledge / resolve events in the same transaction.
        """
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
        if not rows:
            return None
        transitions = await apply_rows(
            conn, [(row, event) for row in rows], at, self._fallback_email
        )
        found = None
        for row, transition in zip(rows, transitions, strict=True):
            await self._after_event(conn, row, event, transition, at)
            if row["escalation_id"] == escalation_id:
                found = transition
        if isinstance(event, Acknowledge | Resolve):
            writer = PageWriter(conn, at, self._fallback_email)
            await upstream_sync(conn, writer, [row["escalation_id"] for row in rows])
            await writer.flush(claim_until=None)
        return found

    async def _after_event(
        self, conn: Any, row: Any, event: EscalationEvent, transition: Transition, at: datetime
    ) -> None:
        if not isinstance(event, Acknowledge) or any(
            entry.kind == "ack_repeated" for entry in transition.timeline
        ):
            return
        # Whoever acknowledged, by whatever channel (API, signed link, SMS reply), goes into the
        # tamper-evident audit log in the same transaction as the ack itself.
        from vigil.audit import append as audit_append
        from vigil.audit.actions import AuditAction

        await audit_append(
            conn,
            event.by,
            AuditAction.ALERT_ACKNOWLEDGED.value,
            f"patient:{row['patient_id']}",
            {
                "dedup_key": row["dedup_key"],
                "via": event.via,
                "escalation_id": str(row["escalation_id"]),
            },
            at=at,
        )

    async def tick_due(
        self, now: datetime, *, limit: int, event_for: Callable[[datetime], EscalationEvent]
    ) -> int:
        """Fire the steps that are due; escalations another ticker holds are skipped, not waited."""
        conn = self._db
        rows = await conn.fetch(
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
        if rows:
            await apply_rows(
                conn, [(row, event_for(now)) for row in rows], now, self._fallback_email
            )
        return len(rows)

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
              AND e.status IN ('open', 'exhausted') AND p.purpose <> 'all_clear'
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


async def open_in(
    conn: Any,
    writer: PageWriter,
    alert: Alert,
    care_team_id: str,
    snapshot: PolicySnapshot,
    at: datetime,
) -> UUID | None:
    """Insert the episode's escalation and fire its first step into ``writer``; None when the
    dedup key already has an escalation."""
    escalation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:escalation:{alert.dedup_key}")
    transition = advance(snapshot, opened(at), Tick(now=at))
    state = transition.state
    inserted = await conn.fetchval(
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
    if inserted is None:
        return None
    if snapshot.early_cycle is not None:
        writer.early_cycle[escalation_id] = snapshot.early_cycle
    writer.event(
        escalation_id,
        TimelineEntry("opened", opened_detail(alert, snapshot, care_team_id)),
    )
    for entry in transition.timeline:
        writer.event(escalation_id, entry)
    await writer.pages_for(alert, escalation_id, care_team_id, transition.commands)
    return escalation_id


async def apply_rows(
    conn: Any,
    items: list[tuple[Any, EscalationEvent]],
    at: datetime,
    fallback_email: str,
    *,
    alert_purpose: PagePurpose = PagePurpose.ALERT,
) -> list[Transition]:
    """Run events through the engine for locked escalation rows and write everything back."""
    transitions: list[Transition] = []
    updates: list[tuple[Any, ...]] = []
    for row, event in items:
        snapshot = snapshot_from_json(json.loads(row["snapshot"]))
        transition = advance(snapshot, state_from_row(row), event)
        transitions.append(transition)
        state = transition.state
        updates.append(
            (
                row["escalation_id"],
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
    writer = PageWriter(conn, at, fallback_email)
    needed = [row["alert_id"] for (row, _), t in zip(items, transitions, strict=True) if t.commands]
    alerts: dict[Any, Alert] = {}
    if needed:
        for alert_row in await conn.fetch(
            "SELECT * FROM alerts WHERE alert_id = ANY($1::uuid[])", needed
        ):
            alerts[alert_row["alert_id"]] = alert_from_row(alert_row)
        await writer.prefetch_contacts(people_of(c for t in transitions for c in t.commands))
    for (row, _), transition in zip(items, transitions, strict=True):
        for entry in transition.timeline:
            writer.event(row["escalation_id"], entry)
        if transition.commands:
            await writer.pages_for(
                alerts[row["alert_id"]],
                row["escalation_id"],
                str(row["care_team_id"]),
                transition.commands,
                row["bundle_id"],
                _round_tag(transition.state.round_no),
                alert_purpose=alert_purpose,
            )
    await writer.flush(claim_until=None)
    return transitions


async def load_alert(conn: Any, alert_id: UUID) -> Alert:
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert_id)
    return alert_from_row(row)


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


def opened_detail(alert: Alert, snapshot: PolicySnapshot, care_team_id: str) -> dict[str, Any]:
    """The timeline's ``opened`` entry: the alert, the policy frozen for it and, for an alert in
    the CRS window, why that policy (``early_cycle``: cycle day, override or the usual chain)."""
    detail: dict[str, Any] = {
        "alert_id": str(alert.alert_id),
        "policy_id": snapshot.policy_id,
        "care_team_id": care_team_id,
    }
    if snapshot.early_cycle is not None:
        detail["early_cycle"] = early_cycle_to_json(snapshot.early_cycle)
    return detail


def _round_tag(round_no: int) -> str:
    """Tells apart the pages of a chain that restarted from its first step after a snooze:
    without it they would carry the first round's keys and fold into pages already sent."""
    return "" if round_no == 0 else f"~round{round_no}"


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()
