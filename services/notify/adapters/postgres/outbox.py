"""The page outbox in PostgreSQL: ``pages`` of escalations, ``delivery_attempts``, and the
timeline entries (``escalation_events``) written with them.

``PageWriter`` collects, inside one transaction, the pages the engine's commands ask for
(routed by the pure ``domain.routing``), the timeline entries and the PagerDuty acknowledge /
resolve events, and writes them in batches. Sending is not done here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from schemas.events import Alert, Page
from services.notify.adapters.postgres.alerts import alert_from_row
from services.notify.adapters.postgres.caregivers import CaregiverWriter, with_caregiver_words
from services.notify.domain.caregiver import happenings
from services.notify.domain.channel_failover import (
    AttemptVerdict,
    Delivered,
    NextChannel,
    OutcomeUnknown,
    RetryLater,
)
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    EarlyCycle,
    NotifyFallback,
    NotifyRecipient,
    PageCommand,
    PolicySnapshot,
    TimelineEntry,
    Transition,
    early_cycle_from_json,
    early_cycle_to_json,
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
from services.notify.service_layer.ports import (
    FALLBACK_PREFIX,
    PageJob,
    SendOutcome,
)
from services.notify.service_layer.unit_of_work import Change, EscalationRecord

JOB_SELECT = """
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


_UPSTREAM = (PagePurpose.UPSTREAM_ACKNOWLEDGE, PagePurpose.UPSTREAM_RESOLVE)


_CANCELLABLE = (PagePurpose.ALERT.value, PagePurpose.QUIET_DIGEST.value)


_TRIGGERS = (PagePurpose.ALERT, PagePurpose.ESCALATION, PagePurpose.QUIET_DIGEST)


class PostgresOutbox:
    """The page outbox: due pages claimed under a lease, attempts opened in flight, outcomes and
    receipts recorded, failover pages written."""

    def __init__(self, db: Any, *, fallback_email: str = DEFAULT_FALLBACK_EMAIL) -> None:
        # An asyncpg connection (inside a ``PostgresUnitOfWork``) or, for a single statement,
        # the pool; asyncpg ships no type information.
        self._db = db
        # Paged for a team that has no on-call address of its own (``PageWriter.fallback``).
        self._fallback_email = fallback_email

    async def add_opened(
        self,
        alert: Alert,
        escalation_id: UUID,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        transition: Transition,
        at: datetime,
        claim_until: datetime,
        then: Sequence[TimelineEntry] = (),
    ) -> list[PageJob]:
        """The ``opened`` entry, the first step's timeline (followed by ``then``) and its
        pages, claimed for the caller to send at once (so the first attempt waits for no
        ticker)."""
        writer = PageWriter(self._db, at, self._fallback_email)
        await writer.opened(alert, escalation_id, care_team_id, snapshot, transition)
        for entry in then:
            writer.event(escalation_id, entry)
        # The family is told beside the care team's first page (``domain.caregiver``).
        await CaregiverWriter(self._db, writer, at).tell(
            [(alert, escalation_id, care_team_id, transition)]
        )
        return await writer.flush(claim_until=claim_until)

    async def add_effects(
        self,
        changes: Sequence[Change],
        *,
        at: datetime,
        alert_purpose: PagePurpose = PagePurpose.ALERT,
    ) -> None:
        await write_effects(
            self._db, changes, at, self._fallback_email, alert_purpose=alert_purpose
        )

    async def add_digest(
        self,
        digest_id: UUID,
        *,
        entries: Sequence[tuple[UUID, TimelineEntry]],
        resolved: Sequence[tuple[EscalationRecord, tuple[PageCommand, ...]]],
        at: datetime,
    ) -> None:
        """A quiet-hours digest's timeline entries, and the ``quiet_digest`` pages (keyed on the
        digest) of its alerts that resolved while held, to whom ``commands`` name."""
        writer = PageWriter(self._db, at, self._fallback_email)
        for escalation_id, entry in entries:
            writer.event(escalation_id, entry)
        for record, commands in resolved:
            row = await self._db.fetchrow(
                "SELECT * FROM alerts WHERE alert_id = $1", record.alert_id
            )
            await writer.pages_for(
                alert_from_row(row),
                record.escalation_id,
                record.care_team_id,
                commands,
                digest_id,
                alert_purpose=PagePurpose.QUIET_DIGEST,
            )
        await writer.flush(claim_until=None)

    async def sync_upstream(self, escalation_ids: Sequence[UUID], *, at: datetime) -> None:
        writer = PageWriter(self._db, at, self._fallback_email)
        await upstream_sync(self._db, writer, list(escalation_ids))
        await writer.flush(claim_until=None)

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]:
        """Take due escalation pages for sending; pages of an acknowledged chain are cancelled.

        A claimed page is marked ``sending`` with a lease and gets a delivery attempt
        ``in_flight``, in the claim's transaction: durable before the page is handed to the
        provider. If this process dies before it records the outcome, the page falls due again
        when the lease runs out; that claim records the attempt ``unknown`` (the provider may
        have taken it) and returns the page for resolving (``was_sending``), whatever happened
        to its chain meanwhile: a page in flight is never cancelled.
        """
        conn = self._db
        rows = await conn.fetch(
            JOB_SELECT
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
                taken.append((row, replace(job_from_row(row, now), chain_stopped=chain_stopped)))
            elif chain_stopped:
                cancelled.append(row["page_id"])
            else:
                taken.append((row, job_from_row(row, now)))
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
        jobs = await with_context(conn, jobs)
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
        opened = await open_attempts(conn, [j.page.page_id for j in jobs if not j.was_sending], now)
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
        conn = self._db
        await conn.execute("SELECT 1 FROM pages WHERE page_id = $1 FOR UPDATE", job.page.page_id)
        opened = await open_attempts(conn, [job.page.page_id], at)
        return replace(job, attempt=opened.get(job.page.page_id), resolving=False)

    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None:
        """Store attempts, each page's next state and, on failover, the next channel's page.

        One transaction for the batch. A claimed page is held by its lease, so no row lock is
        needed to number its attempts.
        """
        attempts, delivered, retries, finished, unresolved = [], [], [], [], []
        conn = self._db
        # Page rows first, then their attempts, in one order: the order of a claim (which
        # may be recording a page of a stopped run unknown at this moment), so the two never
        # deadlock.
        await conn.execute(
            "SELECT 1 FROM pages WHERE page_id = ANY($1::uuid[]) ORDER BY page_id FOR UPDATE",
            sorted({job.page.page_id for job, _, _, _ in outcomes}),
        )
        writer = PageWriter(conn, at, self._fallback_email)
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
                    outcome.answered_at or at,
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
            await upstream_sync(conn, writer, triggered)
        await writer.flush(claim_until=None)

    async def job_for_provider_ref(self, provider_ref: str, now: datetime) -> PageJob | None:
        """The page a provider's delivery receipt is about (Twilio's MessageSid)."""
        row = await self._db.fetchrow(
            JOB_SELECT + " WHERE p.provider_ref = $1 AND p.escalation_id IS NOT NULL",
            provider_ref,
        )
        return None if row is None else job_from_row(row, now)

    async def record_receipt(self, job: PageJob, *, status: str, at: datetime) -> None:
        """A delivered receipt: one more row in the delivery log and the page's status."""
        conn = self._db
        await conn.execute("SELECT 1 FROM pages WHERE page_id = $1 FOR UPDATE", job.page.page_id)
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
        await write_event(
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


async def upstream_sync(conn: Any, writer: PageWriter, escalation_ids: list[Any]) -> None:
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


def people_of(commands: Iterable[PageCommand]) -> set[str]:
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


class PageWriter:
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

    async def opened(
        self,
        alert: Alert,
        escalation_id: UUID,
        care_team_id: str,
        snapshot: PolicySnapshot,
        transition: Transition,
    ) -> None:
        """An escalation just inserted: its ``opened`` entry, its first transition's entries
        and the pages its commands ask for."""
        if snapshot.early_cycle is not None:
            self.early_cycle[escalation_id] = snapshot.early_cycle
        self.event(
            escalation_id,
            TimelineEntry("opened", opened_detail(alert, snapshot, care_team_id)),
        )
        for entry in transition.timeline:
            self.event(escalation_id, entry)
        await self.pages_for(alert, escalation_id, care_team_id, transition.commands)

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
        await self.prefetch_contacts(people_of(commands))
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
                    # Queued by ``upstream_sync`` with the dedup_key its trigger used.
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

    def caregiver_page(
        self,
        alert: Alert,
        escalation_id: UUID,
        care_team_id: str,
        recipient_ref: str,
        rank: int,
        channel: str,
        address: str,
        key_base: str,
        due_at: datetime | None,
    ) -> None:
        """A message to a caregiver (``adapters.postgres.caregivers``): no bundle, no failover,
        due at ``due_at`` when it waits for the contact's preferred hours."""
        self._bundle_id, self._due = None, due_at
        self._add(
            alert,
            escalation_id,
            care_team_id,
            recipient_ref,
            rank,
            channel,
            address,
            PagePurpose.CAREGIVER,
            key_base,
            None,
            False,
        )
        self._due = None

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
                    _route_of(p.recipient_ref),
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
        opened = await open_attempts(self._conn, [j.page.page_id for j in jobs], at)
        jobs = [replace(j, attempt=opened.get(j.page.page_id)) for j in jobs]
        return await with_context(self._conn, jobs)


async def write_effects(
    conn: Any,
    changes: Sequence[Change],
    at: datetime,
    fallback_email: str,
    *,
    alert_purpose: PagePurpose = PagePurpose.ALERT,
) -> None:
    """Each transition's timeline entries and the pages its commands ask for (its alert and
    the contact methods of the people it pages read once for all), queued."""
    writer = PageWriter(conn, at, fallback_email)
    # The transitions the family hears of (first page, acknowledged, exhausted, resolved).
    told = [(r, t) for r, t in changes if happenings(t.timeline, round_no=t.state.round_no)]
    needed = [record.alert_id for record, t in changes if t.commands] + [
        record.alert_id for record, _ in told
    ]
    alerts: dict[UUID, Alert] = {}
    if needed:
        for alert_row in await conn.fetch(
            "SELECT * FROM alerts WHERE alert_id = ANY($1::uuid[])", needed
        ):
            alerts[UUID(str(alert_row["alert_id"]))] = alert_from_row(alert_row)
        await writer.prefetch_contacts(people_of(c for _, t in changes for c in t.commands))
    for record, transition in changes:
        for entry in transition.timeline:
            writer.event(record.escalation_id, entry)
        if transition.commands:
            await writer.pages_for(
                alerts[record.alert_id],
                record.escalation_id,
                record.care_team_id,
                transition.commands,
                record.bundle_id,
                _round_tag(transition.state.round_no),
                alert_purpose=alert_purpose,
            )
    if told:
        await CaregiverWriter(conn, writer, at).tell(
            [(alerts[r.alert_id], r.escalation_id, r.care_team_id, t) for r, t in told]
        )
    await writer.flush(claim_until=None)


def _route_of(recipient_ref: str) -> str:
    """``pages.route``: to the care team, its fallback address, or a caregiver at home."""
    if recipient_ref.startswith(FALLBACK_PREFIX):
        return "fallback"
    if recipient_ref.startswith(f"{RecipientKind.CAREGIVER.value}:"):
        return "caregiver"
    return "care_team"


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


async def write_event(conn: Any, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
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


async def open_attempts(conn: Any, page_ids: list[UUID], at: datetime) -> dict[UUID, int]:
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
        await write_event(
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


def job_from_row(row: Any, now: datetime, bundle: tuple[Alert, ...] = ()) -> PageJob:
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


def _key_base(idempotency_key: str) -> str:
    return idempotency_key.rpartition("#")[0]


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


async def with_context(conn: Any, jobs: list[PageJob]) -> list[PageJob]:
    """Attach to each page what its words need beyond the alert (``PageContext``): the care
    team's time zone, the page's round and pass, when the episode opened and how many passes
    its policy sends, an all clear's own ``end`` alert, and the value and unit a thermometer
    sent for each temperature in the evidence (a reading sent in °F is shown in °F too)."""
    if not jobs:
        return jobs
    # The teams' zones and the episodes in one round trip: a team's row has no escalation id.
    rows = await conn.fetch(
        """
        SELECT care_team_id, timezone, NULL::uuid AS escalation_id,
               NULL::timestamptz AS opened_at, NULL::text AS repeat_count
        FROM care_teams WHERE care_team_id = ANY($1::text[])
        UNION ALL
        SELECT NULL, NULL, escalation_id, opened_at, snapshot ->> 'repeat_count'
        FROM escalations WHERE escalation_id = ANY($2::uuid[])
        """,
        sorted({j.page.care_team_id for j in jobs}),
        sorted({j.escalation_id for j in jobs}, key=str),
    )
    zones = {str(r["care_team_id"]): str(r["timezone"]) for r in rows if r["escalation_id"] is None}
    episodes = {r["escalation_id"]: r for r in rows if r["escalation_id"] is not None}
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
    return await with_caregiver_words(conn, out)
