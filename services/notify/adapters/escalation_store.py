"""PostgreSQL side of escalation: policies and schedules, escalation timers, page jobs, audit.

Owns the SQL against ``people``, ``contact_methods``, ``oncall_*``, ``escalation_policies``,
``escalations``, ``escalation_events``, ``used_ack_tokens``, ``pipeline_heartbeats``, the
bundling tables (``notify_bundle_windows``, ``notify_bundles``, ``notify_bundle_members``) and
the escalation columns of ``pages``. Every state change of an escalation happens in one transaction
that locks its row, runs the pure ``advance`` and writes the new state, its timeline entries and
the pages its commands ask for together: a command is never lost between deciding and queueing,
and an acknowledgement that committed first is seen by every later tick. Sending is not done here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from schemas.events import Alert, Page
from services.notify.adapters.postgres import alert_from_row
from services.notify.domain.bundling import BundleWindow, Placement, is_bundled, place
from services.notify.domain.channel_failover import (
    AttemptVerdict,
    Delivered,
    NextChannel,
    OutcomeUnknown,
    RetryLater,
)
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    DEFAULT_POLICY_REPEATS,
    DEFAULT_POLICY_WAIT_S,
    Acknowledge,
    EarlyCycle,
    EscalationEvent,
    EscalationState,
    EscalationStatus,
    NotifyFallback,
    NotifyRecipient,
    PageCommand,
    PolicySnapshot,
    Resolve,
    StepSnapshot,
    Target,
    Tick,
    TimelineEntry,
    Transition,
    advance,
    early_cycle_from_json,
    early_cycle_to_json,
    opened,
    page_until_acknowledged,
    snapshot_from_json,
    snapshot_to_json,
)
from services.notify.domain.message import PageContext
from services.notify.domain.quiet_hours import QuietHours, all_clear_deferred_until
from services.notify.domain.routing import (
    EMAIL,
    UNDELIVERABLE,
    ContactMethod,
    Deliver,
    PagePurpose,
    Recipient,
    RecipientKind,
    ResolveUpstream,
    SentPage,
    ToFallback,
    after_failure,
    last_paged_at,
    page_id_for,
    route,
)
from services.notify.domain.schedule import Override, Rotation
from services.notify.service_layer.ports import (
    FALLBACK_PREFIX,
    QUIET_DIGEST_KIND,
    TECHNICAL_HOLD_KIND,
    PageJob,
    SendOutcome,
)

_JOB_SELECT = """
    SELECT p.*,
           -- A quiet-hours digest page lists resolved alerts too ("resolved at ..."): it stops
           -- only when every alert of the digest is acknowledged.
           CASE WHEN p.purpose = 'quiet_digest' THEN
                    CASE WHEN EXISTS (SELECT 1 FROM escalations o
                                      WHERE o.bundle_id = p.bundle_id
                                        AND o.acknowledged_by IS NULL) THEN 'open'
                         ELSE 'acknowledged' END
           -- A shared bundle page stops only when every escalation of its bundle has stopped.
                WHEN p.bundle_id IS NULL OR p.purpose <> 'alert' THEN e.status
                WHEN EXISTS (SELECT 1 FROM escalations o
                             WHERE o.bundle_id = p.bundle_id
                               AND o.status IN ('open', 'exhausted')) THEN 'open'
                ELSE 'acknowledged' END AS escalation_status,
           EXISTS (SELECT 1 FROM contact_methods c
                   WHERE p.recipient_ref = 'person:' || c.person_id
                     AND c.rank > p.contact_rank) AS has_next_channel,
           a.device_id, a.kind, a.code, a.priority, a.phase, a.state, a.title,
           a.device_time, a.ingest_time, a.evidence, a.rule_id, a.rule_version,
           (SELECT nb.kind FROM notify_bundles nb WHERE nb.bundle_id = p.bundle_id)
               AS bundle_kind,
           -- The alert (a bundle page: one of its alerts) ended with nobody acknowledging it:
           -- the first page about it is still sent, then its all clear (claim_pages).
           CASE WHEN p.bundle_id IS NULL
                    THEN e.status = 'resolved' AND e.acknowledged_by IS NULL
                ELSE EXISTS (SELECT 1 FROM escalations o
                             WHERE o.bundle_id = p.bundle_id AND o.status = 'resolved'
                               AND o.acknowledged_by IS NULL) END
               AS resolved_unacknowledged,
           e.bundle_id AS escalation_bundle_id,
           e.snapshot -> 'early_cycle' AS early_cycle
    FROM pages p
    JOIN escalations e ON e.escalation_id = p.escalation_id
    JOIN alerts a ON a.alert_id = p.alert_id
"""


_INSERT_PAGE = """
    INSERT INTO pages (page_id, alert_id, dedup_key, patient_id, care_team_id, channel,
                       recipient, idempotency_key, status, created_at, route,
                       route_detail, updated_at, escalation_id, recipient_ref,
                       contact_rank, purpose, tries, next_attempt_at, bundle_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $10, $13, $14, $15, $16,
            0, $17, $18)
    ON CONFLICT (idempotency_key) DO NOTHING
"""


# The held members of a bundle or digest nobody acknowledged, made due now (their first step
# fires in the same transaction).
_RELEASE_HELD = """
UPDATE escalations SET due_at = $2
WHERE bundle_id = $1 AND status = 'open' AND due_at IS NULL
  AND acknowledged_by IS NULL
RETURNING *
"""


class PostgresEscalationStore:
    def __init__(
        self,
        pool: Any,
        *,
        default_wait_s: int = DEFAULT_POLICY_WAIT_S,
        default_repeats: int = DEFAULT_POLICY_REPEATS,
        fallback_email: str = DEFAULT_FALLBACK_EMAIL,
    ) -> None:
        # asyncpg ships no type information; the pool is an asyncpg.Pool.
        self._pool = pool
        self._default_wait_s = default_wait_s
        self._default_repeats = default_repeats
        # Paged for a team that has no on-call address of its own (``_Writer.fallback``).
        self._fallback_email = fallback_email

    # -- who to page --------------------------------------------------------------------------

    async def team_of_patient(self, patient_id: str) -> str | None:
        value = await self._pool.fetchval(
            "SELECT care_team_id FROM patients WHERE patient_id = $1", patient_id
        )
        return None if value is None else str(value)

    async def load_policy(self, care_team_id: str) -> PolicySnapshot | None:
        """The team's policy with every schedule it names, as it stands now (to be frozen)."""
        async with self._pool.acquire() as conn:
            return await self._load_policy(conn, care_team_id)

    async def _load_policy(self, conn: Any, care_team_id: str) -> PolicySnapshot | None:
        row = await conn.fetchrow(
            "SELECT policy_id, steps, repeat_count FROM escalation_policies "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        if row is None:
            return await self._default_policy(conn, care_team_id)
        steps = tuple(
            StepSnapshot(
                wait_s=int(s["wait_s"]),
                targets=tuple(Target(kind=t["kind"], ref=str(t["ref"])) for t in s["targets"]),
            )
            for s in json.loads(row["steps"])
        )
        schedules = await _schedules(conn, [t for s in steps for t in s.targets])
        # A step naming a deleted schedule keeps its place: it pages the fallback instead.
        steps = tuple(
            StepSnapshot(wait_s=s.wait_s, targets=_known(s.targets, schedules)) for s in steps
        )
        return PolicySnapshot(
            policy_id=str(row["policy_id"]),
            steps=steps,
            repeat_count=int(row["repeat_count"]),
            schedules=schedules,
        )

    async def _default_policy(self, conn: Any, care_team_id: str) -> PolicySnapshot | None:
        """The implicit policy of a team that has none: page its on-call address until someone
        acknowledges. Without it, such a team's alerts could be paged once and never again."""
        address = await conn.fetchval(
            "SELECT oncall_email FROM care_teams WHERE care_team_id = $1", care_team_id
        )
        if not address:
            return None
        return page_until_acknowledged(
            f"default:{care_team_id}",
            str(address),
            wait_s=self._default_wait_s,
            repeats=self._default_repeats,
        )

    async def early_cycle_override(self, care_team_id: str) -> EarlyCycleOverride | None:
        """The team's early-cycle override (migration 0025) with the schedules its extra
        targets name, as it stands now (to be frozen); None when the team has none."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT ack_wait_s, extra_targets FROM escalation_early_cycle "
                "WHERE care_team_id = $1",
                care_team_id,
            )
            if row is None:
                return None
            targets = tuple(
                Target(kind=t["kind"], ref=str(t["ref"])) for t in json.loads(row["extra_targets"])
            )
            schedules = await _schedules(conn, list(targets))
        wait = row["ack_wait_s"]
        return EarlyCycleOverride(
            ack_wait_s=None if wait is None else int(wait),
            # A target naming a deleted schedule pages the fallback instead, as in a policy.
            extra_targets=_known(targets, schedules),
            schedules=schedules,
        )

    async def rotation(self, schedule_id: str) -> Rotation | None:
        async with self._pool.acquire() as conn:
            schedule = await conn.fetchrow(
                "SELECT * FROM oncall_schedules WHERE schedule_id = $1", schedule_id
            )
            if schedule is None:
                return None
            overrides = await conn.fetch(
                "SELECT person_id, starts_at, ends_at FROM oncall_overrides "
                "WHERE schedule_id = $1 ORDER BY starts_at, override_id",
                schedule_id,
            )
            return _rotation(schedule, overrides)

    # -- escalations --------------------------------------------------------------------------

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
        async with self._pool.acquire() as conn, conn.transaction():
            writer = _Writer(conn, at, self._fallback_email)
            escalation_id = await _open_in(conn, writer, alert, care_team_id, snapshot, at)
            if escalation_id is None:
                return None, []
            jobs = await writer.flush(claim_until=at + timedelta(seconds=lease_s))
        return escalation_id, jobs

    # -- bundles ------------------------------------------------------------------------------

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
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"notify-bundle:{alert.patient_id}",
            )
            window, follow_up_id = await _window_of(conn, alert.patient_id)
            decision = place(window, dedup_key=alert.dedup_key, at=at, group_wait_s=group_wait_s)
            if decision.placement is Placement.ALREADY:
                return decision.placement, None, [], decision.due_at
            if decision.placement is Placement.PAGE_NOW:
                writer = _Writer(conn, at, self._fallback_email)
                escalation_id = await _open_in(conn, writer, alert, care_team_id, snapshot, at)
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
            if await conn.fetchval(
                "SELECT 1 FROM escalations WHERE dedup_key = $1", alert.dedup_key
            ):
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
            escalation_id = await _hold_in(
                conn, alert, care_team_id, snapshot, at, follow_up_id, decision.due_at
            )
            return decision.placement, escalation_id, [], decision.due_at

    async def pending_bundle_of(self, dedup_key: str) -> UUID | None:
        value = await self._pool.fetchval(
            """
            SELECT b.bundle_id FROM notify_bundle_members m
            JOIN notify_bundles b ON b.bundle_id = m.bundle_id
            WHERE m.dedup_key = $1 AND b.status = 'pending' AND b.kind = 'burst'
            LIMIT 1
            """,
            dedup_key,
        )
        return None if value is None else UUID(str(value))

    # -- quiet hours --------------------------------------------------------------------------

    async def quiet_hours(self, care_team_id: str) -> QuietHours | None:
        row = await self._pool.fetchrow(
            "SELECT timezone, starts_local, ends_local FROM notify_quiet_hours "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        if row is None:
            return None
        return QuietHours(
            timezone=str(row["timezone"]), start=row["starts_local"], end=row["ends_local"]
        )

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
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"notify-quiet-digest:{care_team_id}",
            )
            if await conn.fetchval(
                "SELECT 1 FROM escalations WHERE dedup_key = $1", alert.dedup_key
            ):
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
            return await _hold_in(
                conn,
                alert,
                care_team_id,
                snapshot,
                at,
                UUID(str(digest_id)),
                until,
                held_kind="held_for_quiet_hours",
            )

    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None:
        """Make ``alert_id`` (a newer phase of the episode, already recorded) the alert that
        the episode's escalation and bundle memberships page about."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE escalations SET alert_id = $2 WHERE dedup_key = $1", dedup_key, alert_id
            )
            await conn.execute(
                "UPDATE notify_bundle_members SET alert_id = $2 WHERE dedup_key = $1",
                dedup_key,
                alert_id,
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
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(
                "SELECT 1 FROM escalations WHERE dedup_key = $1", alert.dedup_key
            ):
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
            return await _hold_in(
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
        async with self._pool.acquire() as conn, conn.transaction():
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
            if (
                ended_at is not None
                and started_at is not None
                and ended_at - started_at >= hold_span
            ):
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
                await _apply_rows(
                    conn, [(row, Resolve(at=at)) for row in rows], at, self._fallback_email
                )
                for row in rows:
                    await _event(
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
                "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 "
                "WHERE bundle_id = $1",
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
        async with self._pool.acquire() as conn, conn.transaction():
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
                await _event(
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
                await _apply_rows(conn, due, at, self._fallback_email)
            if kind != QUIET_DIGEST_KIND:
                # The hold had this one alert: nothing is left for it to page.
                await conn.execute(
                    "UPDATE notify_bundles SET status = 'flushed', flushed_at = $2 "
                    "WHERE bundle_id = $1",
                    digest["bundle_id"],
                    at,
                )
            return True

    async def flush_bundles(self, now: datetime, *, limit: int, only: UUID | None = None) -> int:
        """Page the bundles that are due (or bundle ``only``, due or not): one transaction each.

        Every member gets its own escalation (its own state, acknowledgement and all-clear),
        opened together from the same frozen policy; a bundle of two or more shares its alert
        pages through an idempotency key on the bundle, so each recipient gets one page listing
        every alert. Bundles another instance is flushing are skipped, not waited for.
        """
        flushed = 0
        while flushed < limit:
            async with self._pool.acquire() as conn, conn.transaction():
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
                    return flushed
                await self._flush_one(conn, row, now)
                flushed += 1
            if only is not None:
                return flushed
        return flushed

    async def _flush_one(self, conn: Any, bundle: Any, now: datetime) -> None:
        """Fire the first step of every held escalation of the bundle, in this transaction.

        Held means still open with no timer: one acknowledged, resolved or snoozed while it
        waited is left alone. Their alert pages share the bundle's keys, so each recipient
        gets one page; which alerts it lists is read when it is sent.
        """
        if bundle["kind"] == QUIET_DIGEST_KIND:
            await _flush_digest(conn, bundle, now, self._fallback_email)
            return
        bundle_id = UUID(str(bundle["bundle_id"]))
        rows = await conn.fetch(
            _RELEASE_HELD,
            bundle_id,
            now,
        )
        if rows:
            await _apply_rows(
                conn, [(row, Tick(now=now)) for row in rows], now, self._fallback_email
            )
        if bundle["kind"] == TECHNICAL_HOLD_KIND:
            for row in rows:
                await _event(
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
            writer = _Writer(conn, now, self._fallback_email)
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

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        value = await self._pool.fetchval(
            "SELECT escalation_id FROM escalations WHERE dedup_key = $1", dedup_key
        )
        return None if value is None else UUID(str(value))

    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
        async with self._pool.acquire() as conn:
            await _event(conn, escalation_id, at, entry)

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
        async with self._pool.acquire() as conn, conn.transaction():
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
                    "SELECT * FROM escalations WHERE bundle_id = $1 "
                    "ORDER BY escalation_id FOR UPDATE",
                    bundle_id,
                )
            if not rows:
                return None
            transitions = await _apply_rows(
                conn, [(row, event) for row in rows], at, self._fallback_email
            )
            found = None
            for row, transition in zip(rows, transitions, strict=True):
                await self._after_event(conn, row, event, transition, at)
                if row["escalation_id"] == escalation_id:
                    found = transition
            if isinstance(event, Acknowledge | Resolve):
                writer = _Writer(conn, at, self._fallback_email)
                await _upstream_sync(conn, writer, [row["escalation_id"] for row in rows])
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
        async with self._pool.acquire() as conn, conn.transaction():
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
                await _apply_rows(
                    conn, [(row, event_for(now)) for row in rows], now, self._fallback_email
                )
            return len(rows)

    async def open_paged_to(self, channel: str, address: str) -> UUID | None:
        """The most recent unacknowledged escalation that paged this address on this channel."""
        value = await self._pool.fetchval(
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

    async def person_for_address(self, channel: str, address: str) -> str | None:
        value = await self._pool.fetchval(
            "SELECT person_id FROM contact_methods WHERE channel = $1 AND address = $2 LIMIT 1",
            channel,
            address,
        )
        return None if value is None else str(value)

    async def spend_token(self, digest: str, at: datetime) -> bool:
        """True the first time a token is used, False every time after."""
        status = await self._pool.execute(
            "INSERT INTO used_ack_tokens (token_digest, used_at) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING",
            digest,
            at,
        )
        return bool(status == "INSERT 0 1")

    async def state_of(self, escalation_id: UUID) -> EscalationState | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM escalations WHERE escalation_id = $1", escalation_id
        )
        return None if row is None else _state(row)

    async def timeline(self, dedup_key: str) -> dict[str, Any] | None:
        async with self._pool.acquire() as conn:
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
        state = _state(row)
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

    # -- page jobs ----------------------------------------------------------------------------

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]:
        """Take due escalation pages for sending; pages of an acknowledged chain are cancelled.

        A claimed page is marked ``sending`` with a lease and gets a delivery attempt
        ``in_flight``, in the claim's transaction: durable before the page is handed to the
        provider. If this process dies before it records the outcome, the page falls due again
        when the lease runs out; that claim records the attempt ``unknown`` (the provider may
        have taken it) and returns the page for resolving (``was_sending``), whatever happened
        to its chain meanwhile: a page in flight is never cancelled.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                _JOB_SELECT
                + """
                WHERE p.escalation_id IS NOT NULL
                  AND p.status IN ('queued', 'failed', 'sending')
                  AND p.next_attempt_at <= $1
                ORDER BY p.next_attempt_at
                LIMIT $2
                FOR UPDATE OF p SKIP LOCKED
                """,
                now,
                limit,
            )
            jobs: list[PageJob] = []
            cancelled: list[UUID] = []
            taken = []
            for row in rows:
                chain_stopped = (
                    row["escalation_status"] in ("acknowledged", "resolved")
                    and row["purpose"] in _CANCELLABLE
                    # The first page about an alert that ended before anyone acknowledged it (a
                    # held alarm whose follow-up was written, then its end arrived before the
                    # page was sent) is still sent: its all clear follows it, and an all clear
                    # of an alarm never told would be the only word of it. A page in flight
                    # when notify stopped is not such a page: it may have reached the person,
                    # and the all clear went there (``_all_clear_where_reached``); it is left
                    # unknown, never sent again after the end.
                    and not (
                        row["status"] != "sending"
                        and row["purpose"] == PagePurpose.ALERT.value
                        and row["resolved_unacknowledged"]
                        and _first_step(str(row["idempotency_key"]))
                    )
                )
                if row["status"] == "sending":
                    taken.append((row, replace(_job(row, now), chain_stopped=chain_stopped)))
                elif chain_stopped:
                    cancelled.append(row["page_id"])
                else:
                    taken.append((row, _job(row, now)))
            # An all clear claimed together with a page about its alert waits for the next
            # claim, so it is never handed over before (or beside) the alarm it clears.
            told = {j.escalation_id for _, j in taken if j.purpose in _TRIGGERS}
            told_bundles = {
                j.bundle_id for _, j in taken if j.purpose in _TRIGGERS and j.bundle_id is not None
            }
            for row, job in taken:
                if (
                    job.purpose is PagePurpose.ALL_CLEAR
                    and row["status"] != "sending"
                    and (
                        job.escalation_id in told
                        or (
                            row["escalation_bundle_id"] is not None
                            and UUID(str(row["escalation_bundle_id"])) in told_bundles
                        )
                    )
                ):
                    continue
                jobs.append(job)
            jobs = await _with_bundles(conn, jobs)
            jobs = await _with_context(conn, jobs)
            if cancelled:
                await conn.execute(
                    "UPDATE pages SET status = 'cancelled', next_attempt_at = NULL, "
                    "updated_at = $2 WHERE page_id = ANY($1::uuid[])",
                    cancelled,
                    now,
                )
            if not jobs:
                return jobs
            await conn.execute(
                "UPDATE pages SET status = 'sending', next_attempt_at = $2, updated_at = $3 "
                "WHERE page_id = ANY($1::uuid[])",
                [j.page.page_id for j in jobs],
                now + timedelta(seconds=lease_s),
                now,
            )
            unknown = await _attempts_cut_short(conn, [j for j in jobs if j.was_sending], now)
            opened = await _open_attempts(
                conn, [j.page.page_id for j in jobs if not j.was_sending], now
            )
            return [
                replace(j, attempt=opened.get(j.page.page_id))
                if not j.was_sending
                else replace(
                    j,
                    attempt=unknown[j.page.page_id][0],
                    resolving=True,
                    tries=j.tries + unknown[j.page.page_id][1],
                )
                for j in jobs
            ]

    async def begin_attempt(self, job: PageJob, *, at: datetime) -> PageJob:
        """Open a new attempt ``in_flight`` for a page about to be handed to its provider again
        (one found in flight after a stop, its first attempt left ``unknown``); durable before
        the send. Returns the job with the new attempt."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT 1 FROM pages WHERE page_id = $1 FOR UPDATE", job.page.page_id
            )
            opened = await _open_attempts(conn, [job.page.page_id], at)
        return replace(job, attempt=opened.get(job.page.page_id), resolving=False)

    async def record_outcome(
        self,
        job: PageJob,
        outcome: SendOutcome,
        verdict: AttemptVerdict,
        *,
        at: datetime,
        status: str,
    ) -> None:
        await self.record_outcomes([(job, outcome, verdict, status)], at=at)

    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None:
        """Store attempts, each page's next state and, on failover, the next channel's page.

        One transaction for the batch. A claimed page is held by its lease, so no row lock is
        needed to number its attempts.
        """
        attempts, delivered, retries, finished, unresolved = [], [], [], [], []
        async with self._pool.acquire() as conn, conn.transaction():
            # Page rows first, then their attempts, in one order: the order of a claim (which
            # may be recording a page of a stopped run unknown at this moment), so the two never
            # deadlock.
            await conn.execute(
                "SELECT 1 FROM pages WHERE page_id = ANY($1::uuid[]) ORDER BY page_id FOR UPDATE",
                sorted({job.page.page_id for job, _, _, _ in outcomes}),
            )
            writer = _Writer(conn, at, self._fallback_email)
            for job, outcome, verdict, status in outcomes:
                page = job.page
                # An outcome that resolves the attempt left unknown adds no try.
                counted = 0 if job.resolving else 1
                attempts.append(
                    (
                        page.page_id,
                        page.channel,
                        page.recipient,
                        status,
                        at,
                        outcome.detail,
                        outcome.provider_id,
                        job.attempt,
                    )
                )
                detail: dict[str, Any] = {
                    "page_id": str(page.page_id),
                    "channel": page.channel,
                    "recipient_ref": job.recipient_ref,
                    "status": status,
                    "detail": outcome.detail,
                }
                if job.attempt is not None:
                    detail["attempt"] = job.attempt
                if job.resolving:
                    detail["resolves"] = "unknown"
                writer.event(job.escalation_id, TimelineEntry("attempt", detail))
                if isinstance(verdict, Delivered):
                    delivered.append((page.page_id, status, outcome.provider_id, at, counted))
                    continue
                if isinstance(verdict, OutcomeUnknown):
                    unresolved.append((page.page_id, at, counted))
                    continue
                if isinstance(verdict, RetryLater):
                    retries.append((page.page_id, at + timedelta(seconds=verdict.delay_s), at))
                    continue
                finished.append((page.page_id, at))
                if job.purpose in _UPSTREAM:
                    # A lost upstream acknowledge / resolve leaves a stale incident in PagerDuty;
                    # it is recorded, but paging a person about it would be noise.
                    writer.event(
                        job.escalation_id,
                        TimelineEntry(
                            "upstream_sync_failed",
                            {"page_id": str(page.page_id), "reason": outcome.detail},
                        ),
                    )
                    continue
                await writer.after_channel_failed(job, verdict)
            # The attempt opened in flight (or left unknown) takes its outcome; an outcome
            # without one (a provider's failure receipt) is a new row.
            await conn.executemany(
                """
                WITH recorded AS (
                    UPDATE delivery_attempts
                    SET status = $4, at = $5, detail = $6, provider_message_id = $7
                    WHERE page_id = $1 AND attempt = $8::integer
                      AND status IN ('in_flight', 'unknown')
                    RETURNING attempt
                )
                INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, status, at,
                                               detail, provider_message_id)
                SELECT $1, COALESCE(MAX(attempt), 0) + 1, $2, $3, $4, $5, $6, $7
                FROM delivery_attempts WHERE page_id = $1
                HAVING NOT EXISTS (SELECT 1 FROM recorded)
                """,
                attempts,
            )
            if delivered:
                await conn.executemany(
                    "UPDATE pages SET status = $2, next_attempt_at = NULL, tries = tries + $5, "
                    "provider_ref = $3, updated_at = $4 WHERE page_id = $1",
                    delivered,
                )
            if unresolved:
                await conn.executemany(
                    "UPDATE pages SET status = 'unknown', next_attempt_at = NULL, "
                    "tries = tries + $3, updated_at = $2 WHERE page_id = $1",
                    unresolved,
                )
            if retries:
                await conn.executemany(
                    "UPDATE pages SET status = 'failed', tries = tries + 1, "
                    "next_attempt_at = $2, updated_at = $3 WHERE page_id = $1",
                    retries,
                )
            if finished:
                await conn.executemany(
                    "UPDATE pages SET status = 'failed', tries = tries + 1, "
                    "next_attempt_at = NULL, updated_at = $2 WHERE page_id = $1",
                    finished,
                )
            triggered = [
                job.escalation_id
                for job, _, verdict, _ in outcomes
                if isinstance(verdict, Delivered | OutcomeUnknown)
                and job.page.channel == "webhook"
                and job.purpose not in _UPSTREAM
            ]
            if triggered:
                # A trigger accepted after its alert was acknowledged or resolved (it was in
                # flight when the ack committed) is followed by the acknowledge / resolve at once;
                # so is one whose outcome stays unknown (PagerDuty ignores the event for an
                # incident it never opened).
                await _upstream_sync(conn, writer, triggered)
            await writer.flush(claim_until=None)

    async def job_for_provider_ref(self, provider_ref: str, now: datetime) -> PageJob | None:
        """The page a provider's delivery receipt is about (Twilio's MessageSid)."""
        row = await self._pool.fetchrow(
            _JOB_SELECT + " WHERE p.provider_ref = $1 AND p.escalation_id IS NOT NULL",
            provider_ref,
        )
        return None if row is None else _job(row, now)

    async def record_receipt(self, job: PageJob, *, status: str, at: datetime) -> None:
        """A delivered receipt: one more row in the delivery log and the page's status."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT 1 FROM pages WHERE page_id = $1 FOR UPDATE", job.page.page_id
            )
            await conn.execute(
                """
                INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, status, at,
                                               detail, provider_message_id)
                SELECT $1, COALESCE(MAX(attempt), 0) + 1, $2, $3, $4, $5, 'provider receipt', $6
                FROM delivery_attempts WHERE page_id = $1
                """,
                job.page.page_id,
                job.page.channel,
                job.page.recipient,
                status,
                at,
                None,
            )
            await conn.execute(
                "UPDATE pages SET status = $2, updated_at = $3 WHERE page_id = $1",
                job.page.page_id,
                status,
                at,
            )
            await _event(
                conn,
                job.escalation_id,
                at,
                TimelineEntry(
                    "receipt",
                    {
                        "page_id": str(job.page.page_id),
                        "channel": job.page.channel,
                        "status": status,
                    },
                ),
            )

    # -- pipeline heartbeat -------------------------------------------------------------------

    async def watch_source(self, source: str, at: datetime) -> None:
        """Start watching a heartbeat source; its silence counts from ``at`` if never seen."""
        await self._pool.execute(
            "INSERT INTO pipeline_heartbeats (source, last_seen_at) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING",
            source,
            at,
        )

    async def heartbeat_seen(self, source: str, at: datetime) -> None:
        await self._pool.execute(
            """
            INSERT INTO pipeline_heartbeats (source, last_seen_at) VALUES ($1, $2)
            ON CONFLICT (source) DO UPDATE
                SET last_seen_at = GREATEST(pipeline_heartbeats.last_seen_at, EXCLUDED.last_seen_at)
            """,
            source,
            at,
        )

    async def heartbeats(self) -> list[tuple[str, datetime, datetime | None]]:
        rows = await self._pool.fetch(
            "SELECT source, last_seen_at, silent_since FROM pipeline_heartbeats ORDER BY source"
        )
        return [(str(r["source"]), r["last_seen_at"], r["silent_since"]) for r in rows]

    async def mark_silent(self, source: str, since: datetime | None) -> None:
        await self._pool.execute(
            "UPDATE pipeline_heartbeats SET silent_since = $2 WHERE source = $1", source, since
        )


# -- inside a transaction ---------------------------------------------------------------------

_UPSTREAM = (PagePurpose.UPSTREAM_ACKNOWLEDGE, PagePurpose.UPSTREAM_RESOLVE)
# Pages asking someone to act, dropped when claimed after the chain stopped; all-clears are not.
_CANCELLABLE = (PagePurpose.ALERT.value, PagePurpose.QUIET_DIGEST.value)
# Pages that open a PagerDuty incident (the all-clear goes upstream as its resolve).
_TRIGGERS = (PagePurpose.ALERT, PagePurpose.ESCALATION, PagePurpose.QUIET_DIGEST)


async def _upstream_sync(conn: Any, writer: _Writer, escalation_ids: list[Any]) -> None:
    """Queue PagerDuty acknowledge / resolve events for the incidents these escalations opened.

    The incidents are the webhook pages PagerDuty accepted (status sent or delivered), or may
    have accepted (unknown: in flight when a process stopped), each
    with the routing key it went to and the dedup_key its trigger used. A shared bundle page's
    incident follows the whole bundle: acknowledged when no escalation of it is still open,
    resolved when all are resolved. Keys ``pd:<action>:<page>`` make a repeated sync a no-op.
    """
    # Most calls come from recording a trigger of a chain still open: one primary-key lookup
    # answers that nothing is to be synced.
    stopped = await conn.fetch(
        """
        SELECT escalation_id, bundle_id FROM escalations
        WHERE escalation_id = ANY($1::uuid[])
          AND (status IN ('acknowledged', 'resolved') OR bundle_id IS NOT NULL)
        """,
        list(escalation_ids),
    )
    if not stopped:
        return
    rows = await conn.fetch(
        """
        WITH triggers AS (
            SELECT * FROM pages WHERE escalation_id = ANY($1::uuid[])
            UNION
            SELECT * FROM pages WHERE bundle_id = ANY($2::uuid[])
        )
        SELECT p.page_id, p.alert_id, p.dedup_key, p.patient_id, p.care_team_id, p.recipient,
               p.escalation_id, p.recipient_ref, p.contact_rank, p.bundle_id,
               CASE WHEN p.bundle_id IS NULL THEN e.status
                    ELSE (SELECT CASE
                              WHEN bool_and(o.status = 'resolved') THEN 'resolved'
                              WHEN bool_or(o.status IN ('open', 'exhausted')) THEN 'open'
                              ELSE 'acknowledged' END
                          FROM escalations o WHERE o.bundle_id = p.bundle_id)
               END AS incident_status
        FROM triggers p JOIN escalations e ON e.escalation_id = p.escalation_id
        WHERE p.channel = 'webhook' AND p.purpose IN ('alert', 'escalation', 'quiet_digest')
          AND p.status IN ('sent', 'delivered', 'unknown')
        ORDER BY p.created_at, p.page_id
        """,
        [r["escalation_id"] for r in stopped],
        sorted({r["bundle_id"] for r in stopped if r["bundle_id"] is not None}, key=str),
    )
    for row in rows:
        status = row["incident_status"]
        if status == "acknowledged":
            purpose = PagePurpose.UPSTREAM_ACKNOWLEDGE
        elif status == "resolved":
            purpose = PagePurpose.UPSTREAM_RESOLVE
        else:
            continue
        writer.upstream(row, purpose)


async def _flush_digest(conn: Any, digest: Any, now: datetime, fallback_email: str) -> None:
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
    writer = _Writer(conn, now, fallback_email)
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
        await _apply_rows(
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
            await _alert(conn, row["alert_id"]),
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


async def _hold_in(
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
                json.dumps(_opened_detail(alert, snapshot, care_team_id)),
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


async def _open_in(
    conn: Any,
    writer: _Writer,
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
        TimelineEntry("opened", _opened_detail(alert, snapshot, care_team_id)),
    )
    for entry in transition.timeline:
        writer.event(escalation_id, entry)
    await writer.pages_for(alert, escalation_id, care_team_id, transition.commands)
    return escalation_id


async def _apply_rows(
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
        transition = advance(snapshot, _state(row), event)
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
    writer = _Writer(conn, at, fallback_email)
    needed = [row["alert_id"] for (row, _), t in zip(items, transitions, strict=True) if t.commands]
    alerts: dict[Any, Alert] = {}
    if needed:
        for alert_row in await conn.fetch(
            "SELECT * FROM alerts WHERE alert_id = ANY($1::uuid[])", needed
        ):
            alerts[alert_row["alert_id"]] = alert_from_row(alert_row)
        await writer.prefetch_contacts(_people_of(c for t in transitions for c in t.commands))
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


def _people_of(commands: Iterable[PageCommand]) -> set[str]:
    """The people the commands page (whose contact methods their routing needs)."""
    recipients = (Recipient.parse(c.recipient) for c in commands if isinstance(c, NotifyRecipient))
    return {r.id for r in recipients if r.kind is RecipientKind.PERSON}


@dataclass(frozen=True, slots=True)
class _NewPage:
    alert: Alert
    escalation_id: UUID
    care_team_id: str
    recipient_ref: str
    rank: int
    channel: str
    address: str
    purpose: PagePurpose
    key: str
    route_detail: str | None
    has_next_channel: bool
    bundle_id: UUID | None = None
    # An all clear deferred to the end of quiet hours (``_all_clear_due``); None: due now.
    due_at: datetime | None = None


class _Writer:
    """Collects timeline entries and pages inside one transaction and writes them in batches."""

    def __init__(self, conn: Any, at: datetime, fallback_email: str) -> None:
        self._conn = conn
        self._at = at
        self._fallback_email = fallback_email
        self._events: list[tuple[Any, ...]] = []
        self._pages: list[_NewPage] = []
        self._contacts: dict[str, list[ContactMethod]] = {}
        self._fallbacks: dict[str, str] = {}
        self._keys: set[str] = set()
        self._upstream: list[tuple[Any, ...]] = []
        # The bundle the page being added belongs to (set per command by pages_for).
        self._bundle_id: UUID | None = None
        # When the page being added is due, if later than now (a deferred all clear).
        self._due: datetime | None = None
        self._quiet: dict[str, QuietHours | None] = {}
        # The frozen ``early_cycle`` of each escalation opened here, for the pages sent at once.
        self.early_cycle: dict[UUID, EarlyCycle] = {}

    def event(self, escalation_id: UUID, entry: TimelineEntry) -> None:
        self._events.append(
            (escalation_id, self._at, entry.kind, json.dumps(entry.detail, default=str))
        )

    async def prefetch_contacts(self, people: set[str]) -> None:
        missing = sorted(p for p in people if p not in self._contacts)
        if not missing:
            return
        for person in missing:
            self._contacts[person] = []
        rows = await self._conn.fetch(
            "SELECT person_id, rank, channel, address FROM contact_methods "
            "WHERE person_id = ANY($1::text[]) ORDER BY person_id, rank",
            missing,
        )
        for row in rows:
            self._contacts[row["person_id"]].append(
                ContactMethod(int(row["rank"]), str(row["channel"]), str(row["address"]))
            )

    async def _fallback_address(self, care_team_id: str) -> str:
        if care_team_id not in self._fallbacks:
            address = await self._conn.fetchval(
                "SELECT oncall_email FROM care_teams WHERE care_team_id = $1", care_team_id
            )
            self._fallbacks[care_team_id] = str(address or "").strip() or self._fallback_email
        return self._fallbacks[care_team_id]

    async def pages_for(
        self,
        alert: Alert,
        escalation_id: UUID,
        care_team_id: str,
        commands: tuple[PageCommand, ...],
        bundle_id: UUID | None = None,
        round_tag: str = "",
        alert_purpose: PagePurpose = PagePurpose.ALERT,
    ) -> None:
        """Pages for the engine's commands. The alert pages of a bundled escalation are keyed on
        the bundle, so the escalations of one bundle write one page per recipient between them
        (whichever writes first; the others' inserts fold on the key). ``alert_purpose`` names
        the alert pages differently (a quiet-hours digest)."""
        self._bundle_id = bundle_id
        await self.prefetch_contacts(_people_of(commands))
        for command in commands:
            if isinstance(command, NotifyRecipient) and command.purpose is PagePurpose.ALERT:
                command = replace(command, purpose=alert_purpose)
            purpose = alert_purpose if isinstance(command, NotifyFallback) else command.purpose
            shared = bundle_id is not None and purpose in (
                PagePurpose.ALERT,
                PagePurpose.QUIET_DIGEST,
            )
            owner = (f"bundle:{bundle_id}" if shared else f"esc:{escalation_id}") + round_tag
            self._bundle_id = bundle_id if shared else None
            if isinstance(command, NotifyFallback):
                await self.fallback(
                    alert,
                    escalation_id,
                    care_team_id,
                    alert_purpose,
                    f"{owner}:{command.pass_no}:{command.step_index}:fallback",
                    command.reason,
                )
                continue
            key_base = (
                f"{owner}:{command.purpose.value}:{command.pass_no}"
                f":{command.step_index}:{command.recipient}"
            )
            recipient = Recipient.parse(command.recipient)
            self._due = None
            sent: list[SentPage] = []
            if command.purpose is PagePurpose.ALL_CLEAR:
                quiet = await self._quiet_hours_of(alert, care_team_id)
                # Read only when something decides from them: a person's routing, or a
                # deferral in quiet hours.
                if recipient.kind is RecipientKind.PERSON or quiet is not None:
                    sent = await self._sent_pages(escalation_id, bundle_id, recipient)
                if quiet is not None:
                    self._due = self._all_clear_due(
                        alert, escalation_id, care_team_id, recipient, quiet, sent
                    )
            contacts = (
                self._contacts.get(recipient.id, [])
                if recipient.kind is RecipientKind.PERSON
                else []
            )
            for step in route(recipient, command.purpose, contacts, sent):
                if isinstance(step, ResolveUpstream):
                    # Queued by ``_upstream_sync`` with the dedup_key its trigger used.
                    continue
                if isinstance(step, ToFallback):
                    await self.fallback(
                        alert, escalation_id, care_team_id, command.purpose, key_base, step.reason
                    )
                    continue
                self._add(
                    alert,
                    escalation_id,
                    care_team_id,
                    step.recipient.ref,
                    step.rank,
                    step.channel,
                    step.address,
                    command.purpose,
                    key_base + step.key_suffix,
                    step.route_detail,
                    step.has_next_channel,
                )

    async def _sent_pages(
        self, escalation_id: UUID, bundle_id: UUID | None, recipient: Recipient
    ) -> list[SentPage]:
        """The pages about this escalation (its own, or its bundle's or digest's shared ones)
        that asked ``recipient`` to act, or were sent for them to the fallback address: what
        their all clear is routed from (``routing.route``, ``routing.last_paged_at``)."""
        rows = await self._conn.fetch(
            """
            SELECT p.recipient_ref, p.contact_rank, p.channel, p.recipient, p.idempotency_key,
                   p.status, p.created_at, p.updated_at
            FROM pages p
            WHERE (p.escalation_id = $1 OR ($2::uuid IS NOT NULL AND p.bundle_id = $2))
              AND p.purpose = ANY($4::text[])
              AND (p.recipient_ref = $3 OR p.recipient_ref LIKE 'fallback:%')
            """,
            escalation_id,
            bundle_id,
            recipient.ref,
            [p.value for p in _TRIGGERS],
        )
        return [
            SentPage(
                recipient=Recipient.parse(str(r["recipient_ref"])),
                rank=int(r["contact_rank"]),
                channel=str(r["channel"]),
                address=str(r["recipient"]),
                idempotency_key=str(r["idempotency_key"]),
                status=str(r["status"]),
                created_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    async def _quiet_hours_of(self, alert: Alert, care_team_id: str) -> QuietHours | None:
        """The team's quiet hours, when they can defer this alert's all clear (not HIGH)."""
        if alert.priority.value == "high":
            return None
        if care_team_id not in self._quiet:
            row = await self._conn.fetchrow(
                "SELECT timezone, starts_local, ends_local FROM notify_quiet_hours "
                "WHERE care_team_id = $1",
                care_team_id,
            )
            self._quiet[care_team_id] = (
                None
                if row is None
                else QuietHours(
                    timezone=str(row["timezone"]), start=row["starts_local"], end=row["ends_local"]
                )
            )
        return self._quiet[care_team_id]

    def _all_clear_due(
        self,
        alert: Alert,
        escalation_id: UUID,
        care_team_id: str,
        recipient: Recipient,
        quiet: QuietHours,
        sent: list[SentPage],
    ) -> datetime | None:
        """When ``recipient``'s all clear is sent, if not now (pure rule:
        ``all_clear_deferred_until``): during the team's quiet hours, the all clear of a MEDIUM,
        LOW or INFO alert that did not page this recipient since they began waits for their
        end. Recorded in the timeline (``all_clear_deferred``)."""
        last_paged = last_paged_at(recipient, sent)
        until = all_clear_deferred_until(alert.priority, quiet, self._at, last_paged)
        if until is not None:
            self.event(
                escalation_id,
                TimelineEntry(
                    "all_clear_deferred",
                    {
                        "recipient": recipient.ref,
                        "until": until.isoformat(),
                        "reason": (
                            f"quiet hours of care team {care_team_id}: a {alert.priority.value} "
                            "alert that has not paged this recipient since they began"
                        ),
                    },
                ),
            )
        return until

    async def fallback(
        self,
        alert: Alert,
        escalation_id: UUID,
        care_team_id: str,
        purpose: PagePurpose,
        key_base: str,
        reason: str,
    ) -> None:
        address = await self._fallback_address(care_team_id)
        self.event(escalation_id, TimelineEntry("fallback", {"reason": reason, "to": address}))
        self._add(
            alert,
            escalation_id,
            care_team_id,
            Recipient.fallback_of(care_team_id).ref,
            0,
            EMAIL,
            address,
            purpose,
            key_base,
            reason,
            False,
        )

    def upstream(self, trigger: Any, purpose: PagePurpose) -> None:
        """A PagerDuty acknowledge / resolve for the incident the webhook page ``trigger`` opened:
        same routing key, same alert (hence the same dedup_key), no failover to other channels."""
        key = f"pd:{purpose.value}:{trigger['page_id']}"
        if key in self._keys:
            return
        self._keys.add(key)
        self.event(
            trigger["escalation_id"],
            TimelineEntry(
                "upstream_sync_queued",
                {"action": purpose.value, "trigger_page_id": str(trigger["page_id"])},
            ),
        )
        self._upstream.append(
            (
                page_id_for(key),
                trigger["alert_id"],
                trigger["dedup_key"],
                trigger["patient_id"],
                trigger["care_team_id"],
                "webhook",
                trigger["recipient"],
                key,
                "queued",
                self._at,
                "care_team",
                None,
                trigger["escalation_id"],
                trigger["recipient_ref"],
                trigger["contact_rank"],
                purpose.value,
                self._at,
                trigger["bundle_id"],
            )
        )

    async def after_channel_failed(self, job: PageJob, verdict: AttemptVerdict) -> None:
        """The next contact method of the person, or the fallback address when none is left
        (``routing.after_failure``)."""
        page = job.page
        key_base = _key_base(page.idempotency_key)
        reason = getattr(verdict, "reason", "failed")
        self._bundle_id = job.bundle_id
        recipient = Recipient.parse(job.recipient_ref)
        contacts: list[ContactMethod] = []
        if isinstance(verdict, NextChannel) and recipient.kind is RecipientKind.PERSON:
            await self.prefetch_contacts({recipient.id})
            contacts = self._contacts[recipient.id]
        then = after_failure(
            recipient,
            job.contact_rank,
            contacts,
            next_channel=isinstance(verdict, NextChannel),
        )
        if isinstance(then, Deliver):
            self.event(
                job.escalation_id,
                TimelineEntry(
                    "channel_failover",
                    {"from": page.channel, "to": then.channel, "reason": reason},
                ),
            )
            self._add(
                job.alert,
                job.escalation_id,
                page.care_team_id,
                then.recipient.ref,
                then.rank,
                then.channel,
                then.address,
                job.purpose,
                key_base,
                None,
                then.has_next_channel,
            )
            return
        self.event(
            job.escalation_id,
            TimelineEntry(
                "delivery_failed", {"recipient_ref": job.recipient_ref, "reason": reason}
            ),
        )
        if then is not None:
            # Every channel of this person failed: the team's fallback address is told, so a
            # page never ends in silence.
            await self.fallback(
                job.alert,
                job.escalation_id,
                page.care_team_id,
                job.purpose,
                key_base + UNDELIVERABLE,
                then.reason,
            )

    def _add(
        self,
        alert: Alert,
        escalation_id: UUID,
        care_team_id: str,
        recipient_ref: str,
        rank: int,
        channel: str,
        address: str,
        purpose: PagePurpose,
        key_base: str,
        route_detail: str | None,
        has_next_channel: bool,
    ) -> None:
        key = f"{key_base}#{rank}"
        if key in self._keys:
            return  # another escalation of the same bundle asked for the same page
        self._keys.add(key)
        self._pages.append(
            _NewPage(
                alert=alert,
                escalation_id=escalation_id,
                care_team_id=care_team_id,
                recipient_ref=recipient_ref,
                rank=rank,
                channel=channel,
                address=address,
                purpose=purpose,
                key=key,
                route_detail=route_detail,
                has_next_channel=has_next_channel,
                bundle_id=self._bundle_id,
                due_at=self._due,
            )
        )

    async def flush(self, *, claim_until: datetime | None) -> list[PageJob]:
        """Write what was collected. With ``claim_until`` the new pages are claimed (status
        ``sending`` under a lease) and returned for the caller to send at once."""
        if self._events:
            await self._conn.executemany(
                "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
                "VALUES ($1, $2, $3, $4::jsonb)",
                self._events,
            )
        if self._upstream:
            await self._conn.executemany(_INSERT_PAGE, self._upstream)
        if not self._pages:
            return []
        at = self._at
        status = "queued" if claim_until is None else "sending"
        due = at if claim_until is None else claim_until
        await self._conn.executemany(
            _INSERT_PAGE,
            [
                (
                    page_id_for(p.key),
                    p.alert.alert_id,
                    p.alert.dedup_key,
                    p.alert.patient_id,
                    p.care_team_id,
                    p.channel,
                    p.address,
                    p.key,
                    status,
                    at,
                    "fallback" if p.recipient_ref.startswith(FALLBACK_PREFIX) else "care_team",
                    p.route_detail,
                    p.escalation_id,
                    p.recipient_ref,
                    p.rank,
                    p.purpose.value,
                    due if p.due_at is None or claim_until is not None else p.due_at,
                    p.bundle_id,
                )
                for p in self._pages
            ],
        )
        if claim_until is None:
            return []
        jobs = [
            PageJob(
                page=Page(
                    page_id=page_id_for(p.key),
                    alert_id=p.alert.alert_id,
                    dedup_key=p.alert.dedup_key,
                    patient_id=p.alert.patient_id,
                    care_team_id=p.care_team_id,
                    channel=p.channel,
                    recipient=p.address,
                    idempotency_key=p.key,
                    created_at=at,
                ),
                alert=p.alert,
                escalation_id=p.escalation_id,
                recipient_ref=p.recipient_ref,
                contact_rank=p.rank,
                purpose=p.purpose,
                tries=0,
                was_sending=False,
                has_next_channel=p.has_next_channel,
                claimed_at=at,
                updated_at=at,
                bundle_id=p.bundle_id,
                early_cycle=self.early_cycle.get(p.escalation_id),
            )
            for p in self._pages
        ]
        # Durable before the caller hands them to their providers, like a claim.
        opened = await _open_attempts(self._conn, [j.page.page_id for j in jobs], at)
        jobs = [replace(j, attempt=opened.get(j.page.page_id)) for j in jobs]
        return await _with_context(self._conn, jobs)


async def _event(conn: Any, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
    await conn.execute(
        "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
        "VALUES ($1, $2, $3, $4::jsonb)",
        escalation_id,
        at,
        entry.kind,
        json.dumps(entry.detail, default=str),
    )


_IN_FLIGHT_DETAIL = "being handed to the provider; no answer recorded yet"
_CUT_SHORT_DETAIL = (
    "notify stopped before this attempt's outcome was recorded: "
    "the provider may have accepted the page"
)


async def _open_attempts(conn: Any, page_ids: list[UUID], at: datetime) -> dict[UUID, int]:
    """A delivery attempt ``in_flight`` for each of these pages (claimed, about to be handed to
    the provider); returns each page's attempt number. A page that already has an attempt in
    flight (a page written earlier under the same key) gets no second one."""
    if not page_ids:
        return {}
    rows = await conn.fetch(
        """
        INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, status, at, detail,
                                       started_at)
        SELECT p.page_id,
               COALESCE((SELECT max(d.attempt) FROM delivery_attempts d
                         WHERE d.page_id = p.page_id), 0) + 1,
               p.channel, p.recipient, 'in_flight', $2, $3, $2
        FROM pages p
        WHERE p.page_id = ANY($1::uuid[])
          AND NOT EXISTS (SELECT 1 FROM delivery_attempts d
                          WHERE d.page_id = p.page_id AND d.status = 'in_flight')
        RETURNING page_id, attempt
        """,
        page_ids,
        at,
        _IN_FLIGHT_DETAIL,
    )
    return {UUID(str(r["page_id"])): int(r["attempt"]) for r in rows}


async def _attempts_cut_short(
    conn: Any, jobs: list[PageJob], at: datetime
) -> dict[UUID, tuple[int, int]]:
    """For pages found ``sending`` after their lease ran out (the process that claimed them
    stopped): their last attempt, recorded ``unknown``; returns page -> (attempt, tries added).

    The attempt in flight becomes unknown (one try, and an ``attempt`` timeline entry); an
    attempt already unknown (a stop while resolving it) is kept as it is; a page in flight with
    no attempt (claimed by a version that opened none) gets an unknown attempt written now.
    """
    if not jobs:
        return {}
    ids = [j.page.page_id for j in jobs]
    latest = {
        UUID(str(r["page_id"])): (int(r["attempt"]), str(r["status"]))
        for r in await conn.fetch(
            """
            SELECT DISTINCT ON (page_id) page_id, attempt, status FROM delivery_attempts
            WHERE page_id = ANY($1::uuid[]) ORDER BY page_id, attempt DESC
            """,
            ids,
        )
    }
    result: dict[UUID, tuple[int, int]] = {}
    marked: list[tuple[Any, ...]] = []
    written: list[tuple[Any, ...]] = []
    for job in jobs:
        page = job.page
        attempt, status = latest.get(page.page_id, (0, ""))
        if status == "unknown":
            result[page.page_id] = (attempt, 0)
            continue
        if status == "in_flight":
            marked.append((page.page_id, attempt, at, _CUT_SHORT_DETAIL))
        else:
            attempt += 1
            written.append(
                (
                    page.page_id,
                    attempt,
                    page.channel,
                    page.recipient,
                    at,
                    _CUT_SHORT_DETAIL,
                    job.updated_at,
                )
            )
        result[page.page_id] = (attempt, 1)
        await _event(
            conn,
            job.escalation_id,
            at,
            TimelineEntry(
                "attempt",
                {
                    "page_id": str(page.page_id),
                    "channel": page.channel,
                    "recipient_ref": job.recipient_ref,
                    "status": "unknown",
                    "detail": _CUT_SHORT_DETAIL,
                    "attempt": attempt,
                },
            ),
        )
    if marked:
        await conn.executemany(
            "UPDATE delivery_attempts SET status = 'unknown', at = $3, detail = $4 "
            "WHERE page_id = $1 AND attempt = $2",
            marked,
        )
    if written:
        await conn.executemany(
            "INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, status, at, "
            "detail, started_at) VALUES ($1, $2, $3, $4, 'unknown', $5, $6, $7)",
            written,
        )
    added = [(pid, n) for pid, (_, n) in result.items() if n]
    if added:
        await conn.executemany("UPDATE pages SET tries = tries + $2 WHERE page_id = $1", added)
    return result


async def _alert(conn: Any, alert_id: UUID) -> Alert:
    row = await conn.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert_id)
    return alert_from_row(row)


async def _with_bundles(conn: Any, jobs: list[PageJob]) -> list[PageJob]:
    """Attach to each shared bundle page the alerts it lists: the bundle's members nobody has
    acknowledged yet (an alert that ended unacknowledged is still listed: its all-clear follows
    separately, and a digest shows it as resolved), or all of them for a page whose every alert
    is acknowledged."""
    bundle_ids = sorted({j.bundle_id for j in jobs if j.bundle_id is not None}, key=str)
    if not bundle_ids:
        return jobs
    rows = await conn.fetch(
        """
        SELECT m.bundle_id, e.acknowledged_by IS NULL AS unacknowledged,
               e.resolved_at AS escalation_resolved_at, a.*
        FROM notify_bundle_members m
        JOIN escalations e ON e.dedup_key = m.dedup_key AND e.bundle_id = m.bundle_id
        JOIN alerts a ON a.alert_id = m.alert_id
        WHERE m.bundle_id = ANY($1::uuid[])
        ORDER BY m.joined_at, a.received_at, m.dedup_key
        """,
        bundle_ids,
    )
    running: dict[Any, list[tuple[Alert, datetime | None]]] = {}
    every: dict[Any, list[tuple[Alert, datetime | None]]] = {}
    for row in rows:
        item = (alert_from_row(row), row["escalation_resolved_at"])
        every.setdefault(row["bundle_id"], []).append(item)
        if row["unacknowledged"]:
            running.setdefault(row["bundle_id"], []).append(item)
    out: list[PageJob] = []
    for j in jobs:
        if j.bundle_id is None:
            out.append(j)
            continue
        listed = running.get(j.bundle_id) or every.get(j.bundle_id) or [(j.alert, None)]
        out.append(
            replace(
                j,
                bundle=tuple(a for a, _ in listed),
                resolved_at=tuple(r for _, r in listed),
            )
        )
    return out


def _job(row: Any, now: datetime, bundle: tuple[Alert, ...] = ()) -> PageJob:
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
            "created_at": row["created_at"],
        }
    )
    return PageJob(
        page=page,
        alert=alert_from_row(row),
        escalation_id=UUID(str(row["escalation_id"])),
        recipient_ref=str(row["recipient_ref"]),
        contact_rank=int(row["contact_rank"]),
        purpose=PagePurpose(row["purpose"]),
        tries=int(row["tries"]),
        was_sending=row["status"] == "sending",
        has_next_channel=bool(row["has_next_channel"]),
        claimed_at=now,
        updated_at=row["updated_at"],
        bundle_id=None if row["bundle_id"] is None else UUID(str(row["bundle_id"])),
        bundle=bundle,
        bundle_kind=row["bundle_kind"],
        early_cycle=early_cycle_from_json(
            None if row["early_cycle"] is None else json.loads(row["early_cycle"])
        ),
    )


def _state(row: Any) -> EscalationState:
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


def _opened_detail(alert: Alert, snapshot: PolicySnapshot, care_team_id: str) -> dict[str, Any]:
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


async def _schedules(conn: Any, targets: list[Target]) -> dict[str, Rotation]:
    """The rotations (with overrides) of the schedules ``targets`` name that still exist."""
    schedules: dict[str, Rotation] = {}
    for name in sorted({t.ref for t in targets if t.kind == "schedule"}):
        schedule = await conn.fetchrow(
            "SELECT * FROM oncall_schedules WHERE schedule_id = $1", name
        )
        if schedule is None:
            continue
        overrides = await conn.fetch(
            "SELECT person_id, starts_at, ends_at FROM oncall_overrides "
            "WHERE schedule_id = $1 ORDER BY starts_at, override_id",
            name,
        )
        schedules[name] = _rotation(schedule, overrides)
    return schedules


def _known(targets: tuple[Target, ...], schedules: dict[str, Rotation]) -> tuple[Target, ...]:
    """``targets`` with each schedule that no longer exists replaced by the fallback address."""
    return tuple(
        t if t.kind != "schedule" or t.ref in schedules else Target("email", "") for t in targets
    )


def _rotation(schedule: Any, overrides: Any) -> Rotation:
    return Rotation(
        schedule_id=str(schedule["schedule_id"]),
        timezone=str(schedule["timezone"]),
        start_date=schedule["start_date"],
        handoff_time=schedule["handoff_time"],
        shift_days=int(schedule["shift_days"]),
        participants=tuple(schedule["participants"]),
        overrides=tuple(
            Override(person_id=str(o["person_id"]), starts_at=o["starts_at"], ends_at=o["ends_at"])
            for o in overrides
        ),
    )


def _round_tag(round_no: int) -> str:
    """Tells apart the pages of a chain that restarted from its first step after a snooze:
    without it they would carry the first round's keys and fold into pages already sent."""
    return "" if round_no == 0 else f"~round{round_no}"


def _key_base(idempotency_key: str) -> str:
    return idempotency_key.rpartition("#")[0]


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


# Where a page stands in its chain, from its idempotency key (``pages_for``, ``fallback``):
# ``esc:<id>[~round<r>]:<purpose>:<pass>:<step>:…`` or ``…:<pass>:<step>:fallback…``.
_KEY_POSITION = re.compile(
    r"^(?:esc|bundle):[0-9a-f-]+(?:~round(\d+))?:(?:[a-z_]+:)?(\d+):(-?\d+):"
)


_REPEATABLE = (PagePurpose.ALERT, PagePurpose.QUIET_DIGEST)


def _first_step(idempotency_key: str) -> bool:
    """The page is of the first step of the first pass of the chain's first round: the first
    page anyone got about the alert."""
    found = _KEY_POSITION.match(idempotency_key)
    return (
        found is not None
        and found.group(1) is None
        and int(found.group(2)) == 0
        and int(found.group(3)) == 0
    )


def page_position(idempotency_key: str) -> tuple[int, int]:
    """``(round_no, pass_no)`` of an escalation page; ``(0, 0)`` for a key of another shape."""
    found = _KEY_POSITION.match(idempotency_key)
    if found is None:
        return 0, 0
    return int(found.group(1) or 0), int(found.group(2))


async def _with_context(conn: Any, jobs: list[PageJob]) -> list[PageJob]:
    """Attach to each page what its words need beyond the alert (``PageContext``): the care
    team's time zone, the page's round and pass, when the episode opened and how many passes
    its policy sends, an all clear's own ``end`` alert, and the value and unit a thermometer
    sent for each temperature in the evidence (a reading sent in °F is shown in °F too)."""
    if not jobs:
        return jobs
    zones = {
        str(r["care_team_id"]): str(r["timezone"])
        for r in await conn.fetch(
            "SELECT care_team_id, timezone FROM care_teams WHERE care_team_id = ANY($1::text[])",
            sorted({j.page.care_team_id for j in jobs}),
        )
    }
    episodes = {
        r["escalation_id"]: r
        for r in await conn.fetch(
            "SELECT escalation_id, opened_at, snapshot ->> 'repeat_count' AS repeat_count "
            "FROM escalations WHERE escalation_id = ANY($1::uuid[])",
            sorted({j.escalation_id for j in jobs}, key=str),
        )
    }
    ended = sorted({j.alert.dedup_key for j in jobs if j.purpose is PagePurpose.ALL_CLEAR})
    cleared: dict[str, Alert] = {}
    if ended:
        for r in await conn.fetch(
            "SELECT DISTINCT ON (dedup_key) * FROM alerts "
            "WHERE dedup_key = ANY($1::text[]) AND phase = 'end' "
            "ORDER BY dedup_key, received_at DESC",
            ended,
        ):
            cleared[str(r["dedup_key"])] = alert_from_row(r)
    readings = {
        (a.patient_id, e.device_time, e.message_id)
        for j in jobs
        for a in (
            j.alert,
            *j.bundle,
            *([cleared[j.alert.dedup_key]] if j.alert.dedup_key in cleared else []),
        )
        for e in a.evidence
        if e.message_id is not None and e.unit == "Cel"
    }
    measured: dict[str, tuple[float, str]] = {}
    if readings:
        patients, times, ids = zip(*sorted(readings, key=str), strict=True)
        for r in await conn.fetch(
            """
            SELECT r.message_id, r.original_value, r.original_unit
            FROM unnest($1::text[], $2::timestamptz[], $3::uuid[]) AS q(patient_id, at, message_id)
            JOIN temperature_readings r
              ON r.patient_id = q.patient_id AND r.device_time = q.at
             AND r.message_id = q.message_id
            WHERE r.original_unit <> 'C'
            """,
            list(patients),
            list(times),
            list(ids),
        ):
            measured[str(r["message_id"])] = (float(r["original_value"]), str(r["original_unit"]))
    out: list[PageJob] = []
    for j in jobs:
        # Only a page of the chain itself repeats: an escalation notice or an all clear sent
        # during a later pass is not a repeat of anything.
        round_no, pass_no = (
            page_position(j.page.idempotency_key) if j.purpose in _REPEATABLE else (0, 0)
        )
        episode = episodes.get(j.escalation_id)
        repeats = None if episode is None else episode["repeat_count"]
        out.append(
            replace(
                j,
                context=PageContext(
                    zone=zones.get(j.page.care_team_id, "UTC"),
                    pass_no=pass_no,
                    round_no=round_no,
                    passes=None if repeats is None else 1 + int(repeats),
                    opened_at=None if episode is None else episode["opened_at"],
                    cleared_by=cleared.get(j.alert.dedup_key),
                    measured=measured,
                ),
            )
        )
    return out
