"""The bundle repository in PostgreSQL: ``notify_bundle_windows``, ``notify_bundles``,
``notify_bundle_members``, and the held escalations they page together.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from schemas.events import Alert
from services.notify.adapters.postgres.escalations import (
    apply_rows,
    load_alert,
    open_in,
)
from services.notify.adapters.postgres.outbox import PageWriter, opened_detail, write_event
from services.notify.domain.bundling import BundleWindow, Placement, is_bundled, place
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    EscalationEvent,
    PolicySnapshot,
    Resolve,
    Tick,
    TimelineEntry,
    advance,
    opened,
    snapshot_from_json,
    snapshot_to_json,
)
from services.notify.domain.routing import (
    PagePurpose,
)
from services.notify.service_layer.ports import (
    QUIET_DIGEST_KIND,
    TECHNICAL_HOLD_KIND,
    PageJob,
)

_RELEASE_HELD = """
UPDATE escalations SET due_at = $2
WHERE bundle_id = $1 AND status = 'open' AND due_at IS NULL
  AND acknowledged_by IS NULL
RETURNING *
"""


class PostgresBundles:
    """Bundles: a patient's burst window and follow-up, quiet-hours digests, technical holds; held
    escalations opened into them, released from them, and flushed."""

    def __init__(self, db: Any, *, fallback_email: str = DEFAULT_FALLBACK_EMAIL) -> None:
        # An asyncpg connection (inside a ``PostgresUnitOfWork``) or, for a single statement,
        # the pool; asyncpg ships no type information.
        self._db = db
        # Paged for a team that has no on-call address of its own (``PageWriter.fallback``).
        self._fallback_email = fallback_email

    async def open_in_window(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        group_wait_s: float,
        lease_s: float,
    ) -> tuple[Placement, UUID | None, list[PageJob], datetime]:
        """Page the alert at once or hold it for its patient's follow-up bundle (pure ``place``).

        Returns the placement, the escalation opened (None when the dedup key already had one),
        the pages to send now and when the alert is paged.

        Paged at once: exactly ``open_and_fire`` (the first step fires in this transaction and
        its pages are claimed for the caller), plus the patient's new window in
        ``notify_bundle_windows``. Held: the escalation exists from now on (it can be
        acknowledged, snoozed or resolved at once, its policy is frozen now) with no timer of
        its own; the follow-up bundle's ``due_at`` (the window's end) fires the first step of
        every held escalation of it together.

        Placement is serialised per patient with a transaction-scoped advisory lock, so two
        notify instances receiving the same burst open one window, not two. A follow-up being
        flushed holds its row lock; a placement waiting for it then finds no pending follow-up
        and opens a new one, due at the same window end (so at once), and never joins a
        bundle whose page has already been written.
        """
        conn = self._db
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"notify-bundle:{alert.patient_id}",
        )
        window, follow_up_id = await _window_of(conn, alert.patient_id)
        decision = place(window, dedup_key=alert.dedup_key, at=at, group_wait_s=group_wait_s)
        if decision.placement is Placement.ALREADY:
            return decision.placement, None, [], decision.due_at
        if decision.placement is Placement.PAGE_NOW:
            writer = PageWriter(conn, at, self._fallback_email)
            escalation_id = await open_in(conn, writer, alert, care_team_id, snapshot, at)
            if escalation_id is None:
                return Placement.ALREADY, None, [], at
            if decision.window != window:
                await conn.execute(
                    """
                    INSERT INTO notify_bundle_windows (patient_id, opened_at, closes_at,
                                                       opened_by)
                    VALUES ($1, $2, $3, $4)
                    ON CONFLICT (patient_id) DO UPDATE
                    SET opened_at = EXCLUDED.opened_at, closes_at = EXCLUDED.closes_at,
                        opened_by = EXCLUDED.opened_by
                    """,
                    alert.patient_id,
                    decision.window.opened_at,
                    decision.window.closes_at,
                    alert.dedup_key,
                )
                writer.event(
                    escalation_id,
                    TimelineEntry(
                        "bundle_window_opened",
                        {"closes_at": decision.window.closes_at.isoformat()},
                    ),
                )
            jobs = await writer.flush(claim_until=at + timedelta(seconds=lease_s))
            return decision.placement, escalation_id, jobs, at
        if await conn.fetchval("SELECT 1 FROM escalations WHERE dedup_key = $1", alert.dedup_key):
            # Another instance opened this alert's escalation first (a redelivery race).
            return Placement.ALREADY, None, [], decision.due_at
        if follow_up_id is None:
            follow_up_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO notify_bundles (bundle_id, patient_id, care_team_id, opened_at, "
                "due_at, status) VALUES ($1, $2, $3, $4, $5, 'pending')",
                follow_up_id,
                alert.patient_id,
                care_team_id,
                at,
                decision.due_at,
            )
        escalation_id = await hold_in(
            conn, alert, care_team_id, snapshot, at, follow_up_id, decision.due_at
        )
        return decision.placement, escalation_id, [], decision.due_at

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
        open (``flush_bundles``), also after a restart; ``resolve_in_technical_hold`` ends it
        unpaged.
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

    async def resolve_in_technical_hold(
        self, dedup_key: str, at: datetime, *, ended_at: datetime | None = None
    ) -> bool:
        """The alert's end arrived while it was held by the technical hold: resolve its
        escalation (nobody was paged, so no all clear), record why in the timeline
        (``technical_hold_ended``, paged false) and close the hold, in one transaction. False
        when it is not held in a pending technical hold (never held, or already paged)."""
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
            return False
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
            return False
        rows = await conn.fetch(
            "SELECT * FROM escalations WHERE dedup_key = $1 AND bundle_id = $2 FOR UPDATE",
            dedup_key,
            hold["bundle_id"],
        )
        if rows:
            await apply_rows(
                conn, [(row, Resolve(at=at)) for row in rows], at, self._fallback_email
            )
            for row in rows:
                await write_event(
                    conn,
                    row["escalation_id"],
                    at,
                    TimelineEntry(
                        "technical_hold_ended",
                        {
                            "paged": False,
                            "open_s": round((at - hold["opened_at"]).total_seconds(), 3),
                            "hold_s": round(
                                (hold["due_at"] - hold["opened_at"]).total_seconds(), 3
                            ),
                            "reason": "ended inside the technical hold: not paged",
                        },
                    ),
                )
        await conn.execute(
            "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 WHERE bundle_id = $1",
            hold["bundle_id"],
            at,
        )
        return True

    async def release_from_quiet_hours(
        self,
        dedup_key: str,
        at: datetime,
        reason: str,
        *,
        kind: str = QUIET_DIGEST_KIND,
    ) -> bool:
        """Take a held alert out of its pending digest (or, with ``kind`` ``technical_hold``,
        its technical hold) and fire its first step now (it became urgent: HIGH and MEDIUM are
        never held by quiet hours, a worsened alert is not flapping). False when it is not held
        in a pending one (paged already, or never held)."""
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
            return False
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
        due: list[tuple[Any, EscalationEvent]] = [
            (row, Tick(now=at)) for row in rows if row["due_at"] == at
        ]
        if due:
            await apply_rows(conn, due, at, self._fallback_email)
        if kind != QUIET_DIGEST_KIND:
            # The hold had this one alert: nothing is left for it to page.
            await conn.execute(
                "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 "
                "WHERE bundle_id = $1",
                digest["bundle_id"],
                at,
            )
        return True

    async def next_due(self, now: datetime, *, only: UUID | None = None) -> Any:
        """The next pending bundle that is due (or bundle ``only``, due or not), locked; bundles
        another instance is flushing are skipped, not waited for. None when there is none."""
        conn = self._db
        if only is None:
            return await conn.fetchrow(
                """
                SELECT * FROM notify_bundles
                WHERE status = 'pending' AND due_at <= $1
                ORDER BY due_at LIMIT 1
                FOR UPDATE SKIP LOCKED
                """,
                now,
            )
        return await conn.fetchrow(
            "SELECT * FROM notify_bundles WHERE bundle_id = $1 AND status = 'pending' FOR UPDATE",
            only,
        )

    async def flush(self, bundle: Any, now: datetime) -> None:
        """Fire the first step of every held escalation of the bundle, in this transaction.

        Held means still open with no timer: one acknowledged, resolved or snoozed while it
        waited is left alone. Their alert pages share the bundle's keys, so each recipient
        gets one page; which alerts it lists is read when it is sent.
        """
        conn = self._db
        if bundle["kind"] == QUIET_DIGEST_KIND:
            await flush_digest(conn, bundle, now, self._fallback_email)
            return
        bundle_id = UUID(str(bundle["bundle_id"]))
        rows = await conn.fetch(
            _RELEASE_HELD,
            bundle_id,
            now,
        )
        if rows:
            await apply_rows(
                conn, [(row, Tick(now=now)) for row in rows], now, self._fallback_email
            )
        if bundle["kind"] == TECHNICAL_HOLD_KIND:
            for row in rows:
                await write_event(
                    conn,
                    row["escalation_id"],
                    now,
                    TimelineEntry(
                        "technical_hold_ended",
                        {
                            "paged": True,
                            "open_s": round((now - bundle["opened_at"]).total_seconds(), 3),
                            "reason": "still open when the technical hold ended",
                        },
                    ),
                )
        members = await conn.fetch(
            "SELECT dedup_key FROM notify_bundle_members WHERE bundle_id = $1 "
            "ORDER BY joined_at, dedup_key",
            bundle_id,
        )
        if is_bundled(tuple(str(m["dedup_key"]) for m in members)):
            writer = PageWriter(conn, now, self._fallback_email)
            for row in rows:
                writer.event(
                    row["escalation_id"],
                    TimelineEntry(
                        "bundled",
                        {
                            "bundle_id": str(bundle_id),
                            "dedup_keys": [str(m["dedup_key"]) for m in members],
                            "opened_at": bundle["opened_at"].isoformat(),
                        },
                    ),
                )
            await writer.flush(claim_until=None)
        await conn.execute(
            "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 WHERE bundle_id = $1",
            bundle_id,
            now,
        )


async def flush_digest(conn: Any, digest: Any, now: datetime, fallback_email: str) -> None:
    """Page a quiet-hours digest, in the caller's transaction (the digest row is locked).

    Each member nobody acknowledged is listed: a held alert still open fires its first step
    now (its chain runs on from here, later steps keyed on the digest so they fold into one
    page per recipient too); one that resolved while held does not restart a chain, but whom
    its first step would page now is paged too, so it is still told ("resolved at ...").
    Every such page is a ``quiet_digest`` page keyed on the digest, so each recipient gets one.
    """
    digest_id = UUID(str(digest["bundle_id"]))
    opened_rows = await conn.fetch(
        _RELEASE_HELD,
        digest_id,
        now,
    )
    resolved_rows = await conn.fetch(
        """
        SELECT * FROM escalations
        WHERE bundle_id = $1 AND status = 'resolved' AND acknowledged_by IS NULL
          AND cardinality(paged) = 0
        ORDER BY escalation_id
        FOR UPDATE
        """,
        digest_id,
    )
    listed = [str(r["dedup_key"]) for r in [*opened_rows, *resolved_rows]]
    writer = PageWriter(conn, now, fallback_email)
    for row in [*opened_rows, *resolved_rows]:
        writer.event(
            row["escalation_id"],
            TimelineEntry(
                "quiet_digest",
                {
                    "bundle_id": str(digest_id),
                    "dedup_keys": listed,
                    "held_since": digest["opened_at"].isoformat(),
                },
            ),
        )
    if opened_rows:
        await apply_rows(
            conn,
            [(row, Tick(now=now)) for row in opened_rows],
            now,
            fallback_email,
            alert_purpose=PagePurpose.QUIET_DIGEST,
        )
    for row in resolved_rows:
        # Pure: whom the frozen policy's first step names now. The resolved chain stays
        # resolved; only the digest page is written.
        snapshot = snapshot_from_json(json.loads(row["snapshot"]))
        commands = advance(snapshot, opened(now), Tick(now=now)).commands
        await writer.pages_for(
            await load_alert(conn, row["alert_id"]),
            row["escalation_id"],
            str(row["care_team_id"]),
            commands,
            digest_id,
            alert_purpose=PagePurpose.QUIET_DIGEST,
        )
    await writer.flush(claim_until=None)
    await conn.execute(
        "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 WHERE bundle_id = $1",
        digest_id,
        now,
    )


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
