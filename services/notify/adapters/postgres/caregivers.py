"""Caregiver messages in PostgreSQL: what ``domain.caregiver`` decides for a transition of the
engine, written beside the care team's pages in the same transaction, on the same outbox.

``CaregiverWriter.tell`` reads the patient's caregiver contacts (``caregiver_contacts``,
migration 0040), the care team's zone and 24-hour number, its signed-off first-response
guidance (``caregiver_guidance``, migration 0042), who was told of the alarm before and the
alarm messages each contact had lately, asks the pure ``decide``, and writes each message
as a ``pages`` row (purpose ``caregiver``, recipient ``caregiver:<contact id>``, route
``caregiver``) through the ``PageWriter`` (so claims, retries, attempts and the timeline are the
pages' own), its words in ``caregiver_messages``, a ``caregiver_told`` or ``caregiver_not_told``
timeline entry, and an audit entry per message. ``with_caregiver_words`` attaches the words to
claimed caregiver pages.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from schemas.events import Alert
from services.notify.domain.caregiver import (
    FLAP_WINDOW,
    CaregiverContact,
    Happening,
    PriorAlarm,
    Situation,
    category_of,
    decide,
    happenings,
)
from services.notify.domain.escalation import TimelineEntry, Transition
from services.notify.domain.routing import EMAIL, PagePurpose, RecipientKind, page_id_for
from services.notify.service_layer.caregiver_calls import CallerContact, OpenEscalation
from services.notify.service_layer.ports import PageJob

if TYPE_CHECKING:
    from services.notify.adapters.postgres.outbox import PageWriter

#: audit_log.action of a message decided for a caregiver.
CAREGIVER_MESSAGE_ACTION = "notify.caregiver_message"
#: audit_log.action of a caregiver's SMS asking for a call.
CALL_REQUESTED_ACTION = "notify.caregiver_call_requested"

#: What one transition asks of the family: the alert, its escalation and care team.
Told = tuple[Alert, uuid.UUID, str, Transition]


def _contact(row: Any) -> CaregiverContact:
    return CaregiverContact(
        contact_id=uuid.UUID(str(row["contact_id"])),
        language=str(row["language"]),
        sms=row["sms"],
        email=row["email"],
        consented=row["withdrawn_at"] is None,
        preferred_from=row["preferred_from"],
        preferred_until=row["preferred_until"],
    )


class CaregiverWriter:
    def __init__(self, conn: Any, writer: PageWriter, at: datetime) -> None:
        self._conn = conn
        self._writer = writer
        self._at = at

    async def tell(self, changes: Sequence[Told]) -> None:
        wanted = [
            (alert, escalation_id, team, transition, happening)
            for alert, escalation_id, team, transition in changes
            if category_of(alert.rule_id) is not None
            for happening in happenings(transition.timeline, round_no=transition.state.round_no)
        ]
        if not wanted:
            return
        patients = sorted({alert.patient_id for alert, *_ in wanted})
        rows = await self._conn.fetch(
            "SELECT * FROM caregiver_contacts WHERE patient_id = ANY($1::text[]) "
            "ORDER BY created_at, contact_id",
            patients,
        )
        if not rows:
            return
        contacts: dict[str, list[CaregiverContact]] = {}
        for row in rows:
            contacts.setdefault(str(row["patient_id"]), []).append(_contact(row))
        for alert, escalation_id, team, transition, happening in wanted:
            if alert.patient_id in contacts:
                await self._tell_one(
                    alert, escalation_id, team, transition, happening, contacts[alert.patient_id]
                )

    async def _tell_one(
        self,
        alert: Alert,
        escalation_id: uuid.UUID,
        team: str,
        transition: Transition,
        happening: Happening,
        contacts: list[CaregiverContact],
    ) -> None:
        conn, at = self._conn, self._at
        category = category_of(alert.rule_id)
        assert category is not None
        team_row = await conn.fetchrow(
            "SELECT t.timezone, s.unit_phone FROM care_teams t "
            "LEFT JOIN caregiver_team_settings s ON s.care_team_id = t.care_team_id "
            "WHERE t.care_team_id = $1",
            team,
        )
        told = frozenset(
            uuid.UUID(str(r["contact_id"]))
            for r in await conn.fetch(
                "SELECT DISTINCT contact_id FROM caregiver_messages "
                "WHERE escalation_id = $1 AND kind = 'paged'",
                escalation_id,
            )
        )
        prior: dict[uuid.UUID, list[PriorAlarm]] = {}
        if happening is Happening.PAGED:
            for r in await conn.fetch(
                """
                SELECT m.contact_id, min(m.created_at) AS at,
                       bool_or(e.status IN ('open', 'exhausted')) AS still_open
                FROM caregiver_messages m JOIN escalations e USING (escalation_id)
                JOIN alerts a ON a.alert_id = e.alert_id
                WHERE e.patient_id = $1 AND m.kind = 'paged' AND m.escalation_id <> $2
                  AND m.created_at > $3
                  -- The family's own requests for a call hold no alarm back.
                  AND a.rule_id <> 'caregiver.call'
                GROUP BY m.contact_id, m.escalation_id
                """,
                alert.patient_id,
                escalation_id,
                at - FLAP_WINDOW,
            ):
                prior.setdefault(uuid.UUID(str(r["contact_id"])), []).append(
                    PriorAlarm(at=r["at"], still_open=bool(r["still_open"]))
                )
        guidance: dict[str, str] | None = None
        if happening is Happening.PAGED:
            # The care team's signed-off words for this alert code, else for its rule's family,
            # newest version, per language (migration 0042).
            guidance = {
                str(r["language"]): str(r["text"])
                for r in await conn.fetch(
                    """
                    SELECT DISTINCT ON (language) language, text FROM caregiver_guidance
                    WHERE care_team_id = $1 AND alarm IN ($2, $3)
                    ORDER BY language, alarm = $2 DESC, version DESC
                    """,
                    team,
                    alert.code,
                    category.value,
                )
            }
        caller = None
        if happening is Happening.ACKNOWLEDGED:
            caller = await self._caller(transition.state.acknowledged_by)
        situation = Situation(
            happening=happening,
            category=category,
            alarm_at=alert.device_time,
            at=at,
            zone=str(team_row["timezone"]) if team_row else "UTC",
            unit_phone=None if team_row is None else team_row["unit_phone"],
            caller=caller,
            guidance=guidance,
        )
        messages, not_told = decide(situation, contacts, told_of_this=told, prior_alarms=prior)
        for message in messages:
            rank = 1 if message.channel == EMAIL else 0
            key_base = (
                f"caregiver:{escalation_id}:{message.happening.value}:{message.contact_id}"
                f":{message.channel}"
            )
            page_id = page_id_for(f"{key_base}#{rank}")
            self._writer.caregiver_page(
                alert,
                escalation_id,
                team,
                f"{RecipientKind.CAREGIVER.value}:{message.contact_id}",
                rank,
                message.channel,
                message.address,
                key_base,
                None if message.due_at <= at else message.due_at,
            )
            await conn.execute(
                "INSERT INTO caregiver_messages (page_id, escalation_id, contact_id, kind, "
                "language, subject, body, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
                "ON CONFLICT (page_id) DO NOTHING",
                page_id,
                escalation_id,
                message.contact_id,
                message.happening.value,
                message.language,
                message.subject,
                message.body,
                at,
            )
            from vigil.audit import append as audit_append

            await audit_append(
                conn,
                "notify",
                CAREGIVER_MESSAGE_ACTION,
                f"patient:{alert.patient_id}",
                {
                    "escalation_id": str(escalation_id),
                    "dedup_key": alert.dedup_key,
                    "contact_id": str(message.contact_id),
                    "kind": message.happening.value,
                    "channel": message.channel,
                    "language": message.language,
                    "page_id": str(page_id),
                    "due_at": message.due_at.isoformat(),
                },
                at=at,
            )
        if messages:
            self._writer.event(
                escalation_id,
                TimelineEntry(
                    "caregiver_told",
                    {
                        "kind": happening.value,
                        "contacts": sorted({str(m.contact_id) for m in messages}),
                        "channels": sorted({m.channel for m in messages}),
                        "due_at": max(m.due_at for m in messages).isoformat(),
                    },
                ),
            )
        for skipped in not_told:
            if skipped.reason == "not told of this alarm":
                continue  # nothing to say: the follow-up of an alarm they never heard of
            self._writer.event(
                escalation_id,
                TimelineEntry(
                    "caregiver_not_told",
                    {
                        "kind": happening.value,
                        "contact_id": str(skipped.contact_id),
                        "reason": skipped.reason,
                    },
                ),
            )

    async def _caller(self, acknowledged_by: str | None) -> str | None:
        """The first name of the person who acknowledged (they will call); None when the
        acknowledgement names no person of the registry."""
        if acknowledged_by is None or not acknowledged_by.startswith("person:"):
            return None
        name = await self._conn.fetchval(
            "SELECT name FROM people WHERE person_id = $1", acknowledged_by.removeprefix("person:")
        )
        first = str(name or "").split()
        return first[0] if first else None


async def with_caregiver_words(conn: Any, jobs: list[PageJob]) -> list[PageJob]:
    """Attach to each caregiver page the words decided for it (``caregiver_messages``)."""
    ids = [j.page.page_id for j in jobs if j.purpose is PagePurpose.CAREGIVER]
    if not ids:
        return jobs
    words = {
        uuid.UUID(str(r["page_id"])): (str(r["subject"]), str(r["body"]))
        for r in await conn.fetch(
            "SELECT page_id, subject, body FROM caregiver_messages WHERE page_id = ANY($1::uuid[])",
            ids,
        )
    }
    return [
        replace(j, caregiver=words.get(j.page.page_id)) if j.purpose is PagePurpose.CAREGIVER else j
        for j in jobs
    ]


class PostgresCaregiverDirectory:
    """What a caregiver's SMS reply is decided from (``service_layer.caregiver_calls``), on the
    pool, one statement each."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def contact_by_sms(self, number: str) -> CallerContact | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM caregiver_contacts WHERE sms = $1 AND withdrawn_at IS NULL "
            "ORDER BY created_at DESC LIMIT 1",
            number,
        )
        return None if row is None else CallerContact(_contact(row), str(row["patient_id"]))

    async def open_escalations(self, patient_id: str) -> list[OpenEscalation]:
        rows = await self._pool.fetch(
            "SELECT e.escalation_id, e.dedup_key, a.rule_id, e.status FROM escalations e "
            "JOIN alerts a ON a.alert_id = e.alert_id "
            "WHERE e.patient_id = $1 AND e.status IN ('open', 'exhausted', 'acknowledged') "
            "ORDER BY e.opened_at DESC",
            patient_id,
        )
        return [
            OpenEscalation(
                uuid.UUID(str(r["escalation_id"])),
                str(r["dedup_key"]),
                str(r["rule_id"]),
                str(r["status"]),
            )
            for r in rows
        ]

    async def note(self, escalation_id: uuid.UUID, at: datetime, entry: TimelineEntry) -> None:
        await self._pool.execute(
            "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
            "VALUES ($1, $2, $3, $4::jsonb)",
            escalation_id,
            at,
            entry.kind,
            json.dumps(entry.detail, default=str),
        )

    async def audit(self, patient_id: str, details: dict[str, object], at: datetime) -> None:
        from vigil.audit import append as audit_append

        async with self._pool.acquire() as conn, conn.transaction():
            await audit_append(
                conn,
                "notify",
                CALL_REQUESTED_ACTION,
                f"patient:{patient_id}",
                dict(details),
                at=at,
            )
