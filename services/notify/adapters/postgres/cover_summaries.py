"""Regional cover's morning summary in PostgreSQL: the night's escalations of a covered team
(``night_alerts``, also read by the care-team API through ``public.py``), the agreements in
force with the windows already summarised, and the summary e-mails (``cover_summary_pages``):
queued once per agreement and window end, claimed, sent and recorded; a sent one is audited."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from uuid import UUID

from services.notify.domain.cover import CoverHours
from services.notify.domain.cover_summary import NightAlert, Revocation


async def night_alerts(
    db: Any, covered_team_id: str, starts: datetime, ends: datetime
) -> list[NightAlert]:
    """The escalations of the team's patients opened in [starts, ends), with their timeline
    entries up to ``ends`` and their hand-back. The paged team is the covering team its
    ``paged_under_cover`` entry names (the escalation is filed under the home team once handed
    back), else the team it is filed under."""
    rows = await db.fetch(
        """
        SELECT e.dedup_key, e.patient_id, a.code, a.title, e.opened_at,
               coalesce((SELECT v.detail ->> 'care_team_id' FROM escalation_events v
                         WHERE v.escalation_id = e.escalation_id
                           AND v.kind = 'paged_under_cover'
                         ORDER BY v.event_id LIMIT 1), e.care_team_id) AS paged_team_id,
               e.acknowledged_by, e.acknowledged_at, e.resolved_at,
               coalesce((SELECT json_agg(json_build_object('at', v.at, 'kind', v.kind)
                                         ORDER BY v.event_id)
                         FROM escalation_events v
                         WHERE v.escalation_id = e.escalation_id AND v.at < $3), '[]')
                   AS events,
               h.at AS handed_back_at, coalesce((h.detail ->> 'repaged')::boolean, false)
                   AS repaged
        FROM escalations e
        JOIN patients p ON p.patient_id = e.patient_id
        JOIN alerts a ON a.alert_id = e.alert_id
        LEFT JOIN LATERAL (SELECT v.at, v.detail FROM escalation_events v
                           WHERE v.escalation_id = e.escalation_id AND v.kind = 'handed_back'
                           ORDER BY v.event_id LIMIT 1) h ON true
        WHERE p.care_team_id = $1 AND e.opened_at >= $2 AND e.opened_at < $3
        """,
        covered_team_id,
        starts,
        ends,
    )
    found = []
    for r in rows:
        events = json.loads(r["events"]) if isinstance(r["events"], str) else r["events"]
        found.append(
            NightAlert(
                dedup_key=r["dedup_key"],
                patient_id=r["patient_id"],
                code=r["code"],
                title=r["title"],
                opened_at=r["opened_at"],
                paged_team_id=r["paged_team_id"],
                acknowledged_by=r["acknowledged_by"],
                acknowledged_at=r["acknowledged_at"],
                resolved_at=r["resolved_at"],
                events=tuple((datetime.fromisoformat(e["at"]), str(e["kind"])) for e in events),
                handed_back_at=r["handed_back_at"],
                repaged=bool(r["repaged"]),
            )
        )
    return found


@dataclass(frozen=True, slots=True)
class CoveredNight:
    """An agreement's newest signed-off version that is not a revocation (the one a revocation
    revoked, with the ``revocation``), with what the summary names: the covered team (name,
    on-call address) and the covering team (name, centre), and the ends of the windows already
    summarised."""

    agreement_id: str
    version: int
    signed_off_at: datetime
    covering_team_id: str
    covered_team_id: str
    hours: CoverHours
    covered_name: str | None
    covered_oncall_email: str | None
    covering_name: str | None
    covering_centre: str | None
    summarised: frozenset[datetime]
    revocation: Revocation | None = None


@dataclass(frozen=True, slots=True)
class SummaryPage:
    page_id: UUID
    agreement_id: str
    version: int
    window_starts: datetime
    window_ends: datetime
    care_team_id: str
    channel: str
    recipient: str
    subject: str
    body: str
    patients: int
    alerts: int
    tries: int


class PostgresCoverSummaries:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def agreements(self, summarised_since: datetime) -> list[CoveredNight]:
        """Each agreement's newest signed-off version; for one revoked since
        ``summarised_since``, the version it revoked, with the revocation (who, which side,
        why). An agreement revoked before then has nothing left to e-mail."""
        rows = await self._pool.fetch(
            """
            SELECT c.agreement_id, coalesce(p.version, c.version) AS version,
                   coalesce(p.decided_at, c.decided_at) AS signed_off_at, c.covering_team_id,
                   c.covered_team_id, c.timezone, c.days, c.starts, c.ends, c.exceptions,
                   c.revoked, c.decided_at AS revoked_at, c.decided_by AS revoked_by,
                   c.proposed_side AS revoked_side, c.reason AS revoked_reason,
                   cd.name AS covered_name, cd.oncall_email, cg.name AS covering_name,
                   o.name AS covering_centre,
                   ARRAY(SELECT DISTINCT s.window_ends FROM cover_summary_pages s
                         WHERE s.agreement_id = c.agreement_id AND s.window_ends >= $1)
                       AS summarised
            FROM (SELECT DISTINCT ON (agreement_id) * FROM cover_agreements
                  WHERE decision = 'approved' ORDER BY agreement_id, version DESC) c
            LEFT JOIN LATERAL (SELECT v.version, v.decided_at FROM cover_agreements v
                               WHERE v.agreement_id = c.agreement_id
                                 AND v.decision = 'approved' AND NOT v.revoked
                                 AND v.version < c.version
                               ORDER BY v.version DESC LIMIT 1) p ON c.revoked
            JOIN care_teams cd ON cd.care_team_id = c.covered_team_id
            JOIN care_teams cg ON cg.care_team_id = c.covering_team_id
            LEFT JOIN organisations o ON o.organisation_id = cg.organisation_id
            WHERE NOT c.revoked OR (c.decided_at >= $1 AND p.version IS NOT NULL)
            ORDER BY c.agreement_id
            """,
            summarised_since,
        )
        return [
            CoveredNight(
                agreement_id=str(r["agreement_id"]),
                version=int(r["version"]),
                signed_off_at=r["signed_off_at"],
                covering_team_id=str(r["covering_team_id"]),
                covered_team_id=str(r["covered_team_id"]),
                hours=CoverHours(
                    str(r["timezone"]),
                    frozenset(int(d) for d in r["days"]),
                    _time(r["starts"]),
                    _time(r["ends"]),
                    frozenset(_date(d) for d in r["exceptions"]),
                ),
                covered_name=r["covered_name"],
                covered_oncall_email=r["oncall_email"],
                covering_name=r["covering_name"],
                covering_centre=r["covering_centre"],
                summarised=frozenset(r["summarised"]),
                revocation=(
                    Revocation(
                        at=r["revoked_at"],
                        by=r["revoked_by"],
                        side_team_id=r["revoked_side"],
                        reason=r["revoked_reason"],
                    )
                    if r["revoked"]
                    else None
                ),
            )
            for r in rows
        ]

    async def night_alerts(
        self, covered_team_id: str, starts: datetime, ends: datetime
    ) -> list[NightAlert]:
        return await night_alerts(self._pool, covered_team_id, starts, ends)

    async def queue(self, pages: list[SummaryPage], at: datetime) -> int:
        """Queue the pages; one already queued for its agreement, window end, channel and
        recipient (another round, another instance) is left as it is. How many were new."""
        if not pages:
            return 0
        async with self._pool.acquire() as conn, conn.transaction():
            written = 0
            for p in pages:
                status = await conn.execute(
                    """
                    INSERT INTO cover_summary_pages (page_id, agreement_id, version,
                        window_starts, window_ends, care_team_id, channel, recipient, subject,
                        body, patients, alerts, status, next_attempt_at, created_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'queued', $13,
                            $13)
                    ON CONFLICT DO NOTHING
                    """,
                    p.page_id,
                    UUID(p.agreement_id),
                    p.version,
                    p.window_starts,
                    p.window_ends,
                    p.care_team_id,
                    p.channel,
                    p.recipient,
                    p.subject,
                    p.body,
                    p.patients,
                    p.alerts,
                    at,
                )
                written += status.endswith(" 1")
            return written

    async def claim_due(
        self, now: datetime, *, lease_s: float, limit: int = 50
    ) -> list[SummaryPage]:
        """The queued pages due now, each held for ``lease_s`` (another instance leaves them;
        one whose sender died before recording is tried again after it)."""
        rows = await self._pool.fetch(
            """
            UPDATE cover_summary_pages SET next_attempt_at = $2
            WHERE page_id IN (SELECT page_id FROM cover_summary_pages
                              WHERE status = 'queued' AND next_attempt_at <= $1
                              ORDER BY next_attempt_at, page_id LIMIT $3
                              FOR UPDATE SKIP LOCKED)
            RETURNING *
            """,
            now,
            now + timedelta(seconds=lease_s),
            limit,
        )
        return [
            SummaryPage(
                page_id=r["page_id"],
                agreement_id=str(r["agreement_id"]),
                version=int(r["version"]),
                window_starts=r["window_starts"],
                window_ends=r["window_ends"],
                care_team_id=str(r["care_team_id"]),
                channel=str(r["channel"]),
                recipient=str(r["recipient"]),
                subject=str(r["subject"]),
                body=str(r["body"]),
                patients=int(r["patients"]),
                alerts=int(r["alerts"]),
                tries=int(r["tries"]),
            )
            for r in rows
        ]

    async def record(
        self,
        page: SummaryPage,
        *,
        sent: bool,
        detail: str,
        at: datetime,
        retry_in_s: float | None,
    ) -> None:
        """One try: sent (and audited, in the same transaction), to be retried after
        ``retry_in_s``, or failed for good."""
        from vigil.audit import append as audit_append
        from vigil.audit.actions import AuditAction

        status = "sent" if sent else ("queued" if retry_in_s is not None else "failed")
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE cover_summary_pages
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
            if sent:
                await audit_append(
                    conn,
                    "notify",
                    AuditAction.COVER_SUMMARY_SENT.value,
                    f"care_team:{page.care_team_id}",
                    {
                        "agreement": page.agreement_id,
                        "version": page.version,
                        "window_starts": page.window_starts.isoformat(),
                        "window_ends": page.window_ends.isoformat(),
                        "channel": page.channel,
                        "recipient": page.recipient,
                        "page_id": str(page.page_id),
                        "patients": page.patients,
                        "alerts": page.alerts,
                    },
                    at=at,
                )


def page_id_for(key: str, channel: str, recipient: str) -> UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:{key}:{channel}:{recipient}")


def _time(value: Any) -> time:
    return value if isinstance(value, time) else time.fromisoformat(str(value))


def _date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))
