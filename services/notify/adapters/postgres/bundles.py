"""The bundle repository in PostgreSQL: ``notify_bundle_windows``, ``notify_bundles``,
``notify_bundle_members``, and the held escalations they page together.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from schemas.events import Alert
from services.notify.adapters.postgres.escalations import (
    record_from_row,
)
from services.notify.adapters.postgres.outbox import opened_detail, write_event
from services.notify.domain.bundling import BundleWindow
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    PolicySnapshot,
    TimelineEntry,
    snapshot_to_json,
)
from services.notify.service_layer.ports import (
    QUIET_DIGEST_KIND,
    TECHNICAL_HOLD_KIND,
)
from services.notify.service_layer.unit_of_work import (
    EscalationRecord,
    PendingBundle,
    TechnicalHold,
)

_RELEASE_HELD = """
UPDATE escalations SET due_at = $2
WHERE bundle_id = $1 AND status = 'open' AND due_at IS NULL
  AND acknowledged_by IS NULL
RETURNING *
"""

# The patient's window row inserted, or locked and replaced only if its window has closed by
# the new one's start (``PostgresBundles.claim_window``); a row is returned only when it was
# written.
_CLAIM_WINDOW = """
INSERT INTO notify_bundle_windows (patient_id, opened_at, closes_at, opened_by)
VALUES ($1, $2, $3, $4)
ON CONFLICT (patient_id) DO UPDATE
SET opened_at = EXCLUDED.opened_at, closes_at = EXCLUDED.closes_at,
    opened_by = EXCLUDED.opened_by
WHERE notify_bundle_windows.closes_at <= EXCLUDED.opened_at
RETURNING {returning}
"""
# Outside a unit of work the statement leaves the setting alone; inside one it turns
# ``synchronous_commit`` off for the transaction when it opens the window.
_CLAIM_WINDOW_ALONE = _CLAIM_WINDOW.format(returning="true")
_CLAIM_WINDOW_IN_UOW = _CLAIM_WINDOW.format(
    returning="set_config('synchronous_commit', 'off', true) IS NOT NULL"
)


class PostgresBundles:
    """Bundles: a patient's burst window and follow-up, quiet-hours digests, technical holds; held
    escalations opened into them, released from them, and flushed."""

    def __init__(
        self,
        db: Any,
        *,
        fallback_email: str = DEFAULT_FALLBACK_EMAIL,
        commit_without_flush: Callable[[], None] | None = None,
    ) -> None:
        # An asyncpg connection (inside a ``PostgresUnitOfWork``) or, for a single statement,
        # the pool; asyncpg ships no type information.
        self._db = db
        # Paged for a team that has no on-call address of its own (``PageWriter.fallback``).
        self._fallback_email = fallback_email
        # Told when a statement turned ``synchronous_commit`` off for the transaction (the
        # unit of work's, whose commit sets it back if it must wait for the disk after all).
        self._commit_without_flush = commit_without_flush

    async def claim_window(
        self, alert: Alert, opening: BundleWindow
    ) -> tuple[bool, BundleWindow | None, UUID | None]:
        """Open ``opening`` (the window ``alert`` opens if paged at once) as the patient's
        window unless one of theirs is still open at its start; placement stays serialised per
        patient until the unit of work ends. Returns whether this alert opened it; when it did
        not, the patient's latest window with the members of its pending follow-up, and the
        follow-up's id (None when there is none).

        One statement on the patient's row (one per patient, replaced by each new window): it
        inserts the row, or locks the existing one and replaces it only if that window had
        closed by ``opening``'s start, the rule of ``domain.bundling.place``. The row lock (or
        the uncommitted row, which a concurrent insert waits for) is held until the unit of
        work ends, so two notify instances receiving the same burst open one window, not two:
        the second waits for the first to commit, finds its window open, and reads it in a
        statement of its own, whose snapshot, taken after the lock, sees it. A follow-up being
        flushed holds its row lock; a placement waiting for it then finds no pending follow-up
        and opens a new one, due at the same window end (so at once), and never joins a bundle
        whose page has already been written.

        The alert that opens a window is paged at once, and that transaction commits without
        waiting for the disk (``EscalationService._commit_opening``): inside a unit of work the
        statement turns ``synchronous_commit`` off for the transaction when it opens the window
        (one round trip fewer than a ``SET LOCAL`` before the commit), and tells the unit of
        work, whose commit sets it back if it must wait for the disk after all."""
        conn = self._db
        opened = await conn.fetchval(
            _CLAIM_WINDOW_ALONE if self._commit_without_flush is None else _CLAIM_WINDOW_IN_UOW,
            alert.patient_id,
            opening.opened_at,
            opening.closes_at,
            alert.dedup_key,
        )
        if opened:
            if self._commit_without_flush is not None:
                self._commit_without_flush()
            return True, None, None
        window, follow_up_id = await _window_of(conn, alert.patient_id)
        return False, window, follow_up_id

    async def add_follow_up(
        self, alert: Alert, *, care_team_id: str, at: datetime, due_at: datetime
    ) -> UUID:
        """A new pending follow-up bundle of the alert's patient, paged at ``due_at``."""
        follow_up_id = uuid.uuid4()
        await self._db.execute(
            "INSERT INTO notify_bundles (bundle_id, patient_id, care_team_id, opened_at, "
            "due_at, status) VALUES ($1, $2, $3, $4, $5, 'pending')",
            follow_up_id,
            alert.patient_id,
            care_team_id,
            at,
            due_at,
        )
        return follow_up_id

    async def hold(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        bundle_id: UUID,
        due_at: datetime,
    ) -> UUID | None:
        """The alert's escalation opened held in the bundle (policy frozen now, no timer of its
        own: the bundle's ``due_at`` fires its first step); None when the dedup key already
        has an escalation."""
        return await hold_in(self._db, alert, care_team_id, snapshot, at, bundle_id, due_at)

    async def pending_bundle_of(self, dedup_key: str) -> UUID | None:
        value = await self._db.fetchval(
            """
            SELECT b.bundle_id FROM notify_bundle_members m
            JOIN notify_bundles b ON b.bundle_id = m.bundle_id
            WHERE m.dedup_key = $1 AND b.status = 'pending' AND b.kind = 'burst'
            LIMIT 1
            """,
            dedup_key,
        )
        return None if value is None else UUID(str(value))

    async def hold_for_quiet_hours(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        until: datetime,
    ) -> UUID | None:
        """Hold a low-priority alert for its team's digest due ``until`` (the end of the quiet
        hours it arrived in); None when the dedup key already has an escalation.

        The escalation is opened now (policy frozen, visible in the timeline, can be
        acknowledged or resolved) with no timer; the digest row and the membership commit in
        the same transaction, before the alert's offset is committed, so a restart during
        quiet hours still pages the digest. One digest per team and end, serialised per team
        with an advisory lock so two instances never open two.
        """
        conn = self._db
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"notify-quiet-digest:{care_team_id}",
        )
        if await conn.fetchval("SELECT 1 FROM escalations WHERE dedup_key = $1", alert.dedup_key):
            return None
        digest_id = await conn.fetchval(
            """
            SELECT bundle_id FROM notify_bundles
            WHERE kind = 'quiet_digest' AND status = 'pending'
              AND care_team_id = $1 AND due_at = $2
            FOR UPDATE
            """,
            care_team_id,
            until,
        )
        if digest_id is None:
            digest_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO notify_bundles (bundle_id, patient_id, care_team_id, opened_at, "
                "due_at, status, kind) VALUES ($1, NULL, $2, $3, $4, 'pending', $5)",
                digest_id,
                care_team_id,
                at,
                until,
                QUIET_DIGEST_KIND,
            )
        return await hold_in(
            conn,
            alert,
            care_team_id,
            snapshot,
            at,
            UUID(str(digest_id)),
            until,
            held_kind="held_for_quiet_hours",
        )

    async def hold_technical(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        until: datetime,
    ) -> UUID | None:
        """Hold a technical alert until ``until`` (the end of its technical hold); None when the
        dedup key already has an escalation.

        The escalation is opened now (policy frozen, on the timeline, can be acknowledged) with
        no timer, in a ``notify_bundles`` row of kind ``technical_hold`` with this one member,
        committed before the alert's offset: the ticker pages it at ``until`` if it is still
        open (``EscalationService._flush_bundles``), also after a restart; its end inside the hold
        closes it unpaged (``EscalationService._resolve_in_technical_hold``).
        """
        conn = self._db
        if await conn.fetchval("SELECT 1 FROM escalations WHERE dedup_key = $1", alert.dedup_key):
            return None
        hold_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO notify_bundles (bundle_id, patient_id, care_team_id, opened_at, "
            "due_at, status, kind) VALUES ($1, $2, $3, $4, $5, 'pending', $6)",
            hold_id,
            alert.patient_id,
            care_team_id,
            at,
            until,
            TECHNICAL_HOLD_KIND,
        )
        return await hold_in(
            conn,
            alert,
            care_team_id,
            snapshot,
            at,
            hold_id,
            until,
            held_kind="held_technical",
        )

    async def technical_hold_of(
        self, dedup_key: str, *, ended_at: datetime | None = None
    ) -> TechnicalHold | None:
        """The pending technical hold the alert is held in, locked; None when it is not held
        in one (never held, or already paged), or when, by the device's clock, the condition
        that ended at ``ended_at`` outlasted the hold."""
        conn = self._db
        hold = await conn.fetchrow(
            """
            SELECT b.bundle_id, b.opened_at, b.due_at FROM notify_bundles b
            JOIN notify_bundle_members m ON m.bundle_id = b.bundle_id
            WHERE m.dedup_key = $1 AND b.status = 'pending' AND b.kind = $2
            FOR UPDATE OF b
            """,
            dedup_key,
            TECHNICAL_HOLD_KIND,
        )
        if hold is None:
            return None
        started_at = await conn.fetchval(
            "SELECT a.device_time FROM notify_bundle_members m "
            "JOIN alerts a ON a.alert_id = m.alert_id WHERE m.bundle_id = $1",
            hold["bundle_id"],
        )
        hold_span = hold["due_at"] - hold["opened_at"]
        if ended_at is not None and started_at is not None and ended_at - started_at >= hold_span:
            # Start and end arrived together (a hub's buffer after a dropout): on the
            # device's clock the condition outlasted the hold, so it is no flap. Left for
            # the caller to release and page, then clear.
            return None
        return TechnicalHold(
            bundle_id=UUID(str(hold["bundle_id"])),
            opened_at=hold["opened_at"],
            due_at=hold["due_at"],
        )

    async def release(
        self, dedup_key: str, at: datetime, reason: str, *, kind: str = QUIET_DIGEST_KIND
    ) -> tuple[UUID, list[EscalationRecord]] | None:
        """Take a held alert out of its pending digest (or, with ``kind`` ``technical_hold``,
        its technical hold): its escalation leaves the bundle and, if nobody acknowledged it
        while held, is due at ``at``; the release is on its timeline. Returns the bundle and
        the escalations released (with their state now), None when the alert is not held in a
        pending one (paged already, or never held)."""
        conn = self._db
        digest = await conn.fetchrow(
            """
            SELECT b.bundle_id FROM notify_bundles b
            JOIN notify_bundle_members m ON m.bundle_id = b.bundle_id
            WHERE m.dedup_key = $1 AND b.status = 'pending' AND b.kind = $2
            FOR UPDATE OF b
            """,
            dedup_key,
            kind,
        )
        if digest is None:
            return None
        await conn.execute(
            "DELETE FROM notify_bundle_members WHERE bundle_id = $1 AND dedup_key = $2",
            digest["bundle_id"],
            dedup_key,
        )
        rows = await conn.fetch(
            """
            UPDATE escalations SET bundle_id = NULL,
                due_at = CASE WHEN status = 'open' AND due_at IS NULL
                               AND acknowledged_by IS NULL THEN $2 ELSE due_at END
            WHERE dedup_key = $1 AND bundle_id = $3
            RETURNING *
            """,
            dedup_key,
            at,
            digest["bundle_id"],
        )
        for row in rows:
            await write_event(
                conn,
                row["escalation_id"],
                at,
                TimelineEntry(
                    "released_from_quiet_hours"
                    if kind == QUIET_DIGEST_KIND
                    else "released_from_technical_hold",
                    {"bundle_id": str(digest["bundle_id"]), "reason": reason},
                ),
            )
        return UUID(str(digest["bundle_id"])), [record_from_row(row) for row in rows]

    async def close(self, bundle_id: UUID, at: datetime) -> None:
        """The bundle is done: nothing is left in it to page."""
        await self._db.execute(
            "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 WHERE bundle_id = $1",
            bundle_id,
            at,
        )

    async def next_due(self, now: datetime, *, only: UUID | None = None) -> PendingBundle | None:
        """The next pending bundle that is due (or bundle ``only``, due or not), locked; bundles
        another instance is flushing are skipped, not waited for. None when there is none."""
        conn = self._db
        if only is None:
            row = await conn.fetchrow(
                """
                SELECT * FROM notify_bundles
                WHERE status = 'pending' AND due_at <= $1
                ORDER BY due_at LIMIT 1
                FOR UPDATE SKIP LOCKED
                """,
                now,
            )
        else:
            row = await conn.fetchrow(
                "SELECT * FROM notify_bundles WHERE bundle_id = $1 AND status = 'pending' "
                "FOR UPDATE",
                only,
            )
        if row is None:
            return None
        return PendingBundle(
            bundle_id=UUID(str(row["bundle_id"])), kind=str(row["kind"]), opened_at=row["opened_at"]
        )

    async def release_all(self, bundle_id: UUID, now: datetime) -> list[EscalationRecord]:
        """The bundle's held escalations nobody acknowledged (still open, no timer), made due
        ``now``; one acknowledged, resolved or snoozed while it waited is left alone."""
        rows = await self._db.fetch(_RELEASE_HELD, bundle_id, now)
        return [record_from_row(row) for row in rows]

    async def resolved_unpaged(self, bundle_id: UUID) -> list[EscalationRecord]:
        """The bundle's escalations that resolved while held, paging nobody and acknowledged by
        nobody, locked."""
        rows = await self._db.fetch(
            """
            SELECT * FROM escalations
            WHERE bundle_id = $1 AND status = 'resolved' AND acknowledged_by IS NULL
              AND cardinality(paged) = 0
            ORDER BY escalation_id
            FOR UPDATE
            """,
            bundle_id,
        )
        return [record_from_row(row) for row in rows]

    async def members(self, bundle_id: UUID) -> list[str]:
        """The dedup keys of the bundle's alerts, in the order they joined."""
        rows = await self._db.fetch(
            "SELECT dedup_key FROM notify_bundle_members WHERE bundle_id = $1 "
            "ORDER BY joined_at, dedup_key",
            bundle_id,
        )
        return [str(m["dedup_key"]) for m in rows]


async def _window_of(conn: Any, patient_id: str) -> tuple[BundleWindow | None, UUID | None]:
    """The patient's latest window with the members of its pending follow-up (locked, so a
    concurrent flush is waited for) and the follow-up's id (None when there is none)."""
    row = await conn.fetchrow(
        "SELECT opened_at, closes_at FROM notify_bundle_windows WHERE patient_id = $1",
        patient_id,
    )
    if row is None:
        return None, None
    members = await conn.fetch(
        """
        SELECT b.bundle_id, m.dedup_key
        FROM notify_bundles b JOIN notify_bundle_members m ON m.bundle_id = b.bundle_id
        WHERE b.patient_id = $1 AND b.status = 'pending' AND b.due_at = $2
          AND b.kind = 'burst'
        ORDER BY m.joined_at, m.dedup_key
        FOR UPDATE OF b
        """,
        patient_id,
        row["closes_at"],
    )
    window = BundleWindow(
        opened_at=row["opened_at"],
        closes_at=row["closes_at"],
        follow_up=tuple(str(m["dedup_key"]) for m in members),
    )
    return window, (UUID(str(members[0]["bundle_id"])) if members else None)


async def hold_in(
    conn: Any,
    alert: Alert,
    care_team_id: str,
    snapshot: PolicySnapshot,
    at: datetime,
    bundle_id: UUID,
    due_at: datetime,
    held_kind: str = "held_for_bundle",
) -> UUID | None:
    """Add the alert to the bundle and open its escalation held there (no timer of its own);
    None when the dedup key already has an escalation. ``held_kind`` names the timeline entry."""
    escalation_id = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:escalation:{alert.dedup_key}")
    inserted = await conn.fetchval(
        """
        INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                                 care_team_id, snapshot, status, step_index, pass_no,
                                 due_at, paged, opened_at, bundle_id)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, 'open', 0, 0, NULL, '{}', $7, $8)
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
        bundle_id,
    )
    if inserted is None:
        return None
    await conn.execute(
        "INSERT INTO notify_bundle_members (bundle_id, dedup_key, alert_id, joined_at) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        bundle_id,
        alert.dedup_key,
        alert.alert_id,
        at,
    )
    await conn.executemany(
        "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
        "VALUES ($1, $2, $3, $4::jsonb)",
        [
            (
                escalation_id,
                at,
                "opened",
                json.dumps(opened_detail(alert, snapshot, care_team_id)),
            ),
            (
                escalation_id,
                at,
                held_kind,
                json.dumps({"bundle_id": str(bundle_id), "due_at": due_at.isoformat()}),
            ),
        ],
    )
    return escalation_id
