"""A caregiver asks for a call by replying CALL or HELP (in their language) to an SMS.

The number must be a consenting caregiver contact's (``caregiver_contacts``). The request is an
alert of its own, raised by notify (rule ``caregiver.call``, HIGH, title "Caregiver asks for a
call"), taken into escalation like any other: it pages the care team on its chain, with its
own timeline, acknowledgement and all clear, and the family is told of it like of an alarm
(``domain.caregiver``). Every escalation of the patient still open gets a
``caregiver_call_requested`` timeline entry naming it; a second request while one is open is
recorded on it (``caregiver_call_repeated``) and opens nothing; once it is acknowledged, a new
request opens a new page. A caregiver's number never
acknowledges a page: a reply that is not a request is answered with how to ask for a call.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, AlertState
from services.notify.domain.caregiver import (
    CaregiverContact,
    Category,
    asks_for_call,
    call_reply,
)
from services.notify.domain.escalation import TimelineEntry
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify.caregiver_calls")

CALL_REQUEST_CODE = "caregiver.call_request"


@dataclass(frozen=True, slots=True)
class CallerContact:
    """A caregiver contact found by its SMS number, with its patient."""

    contact: CaregiverContact
    patient_id: str


@dataclass(frozen=True, slots=True)
class OpenEscalation:
    escalation_id: uuid.UUID
    dedup_key: str
    rule_id: str
    # open, exhausted or acknowledged
    status: str = "open"


class CaregiverDirectory(Protocol):
    """Implemented by ``adapters.postgres.caregivers.PostgresCaregiverDirectory``."""

    async def contact_by_sms(self, number: str) -> CallerContact | None:
        """The consenting caregiver contact with this SMS number (the newest, if several)."""
        ...

    async def open_escalations(self, patient_id: str) -> list[OpenEscalation]:
        """The patient's escalations not resolved (open, exhausted or acknowledged)."""
        ...

    async def note(self, escalation_id: uuid.UUID, at: datetime, entry: TimelineEntry) -> None: ...

    async def audit(self, patient_id: str, details: dict[str, object], at: datetime) -> None:
        """``notify.caregiver_call_requested`` in the audit log."""
        ...


class TakesAlerts(Protocol):
    async def handle_alert(self, alert: Alert) -> bool: ...


@dataclass(frozen=True, slots=True)
class CallReply:
    """What the caregiver is answered (TwiML), and the dedup key of the request's alert."""

    text: str
    dedup_key: str | None = None


def call_request_alert(patient_id: str, contact_id: uuid.UUID, at: datetime) -> Alert:
    """The alert a caregiver's request raises; one episode per contact and second."""
    dedup_key = f"caregiver:call:{patient_id}:{contact_id}:{int(at.timestamp())}"
    return Alert(
        alert_id=uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:alert:{dedup_key}:start"),
        dedup_key=dedup_key,
        patient_id=patient_id,
        device_id="caregiver",
        kind=AlertKind.PHYSIOLOGICAL,
        code=CALL_REQUEST_CODE,
        priority=AlertPriority.HIGH,
        phase=AlertPhase.START,
        state=AlertState.ACTIVE,
        title="Caregiver asks for a call",
        device_time=at,
        ingest_time=at,
        evidence=(),
        rule_id=Category.CALL_REQUEST.value,
        rule_version="1",
    )


class CaregiverCalls:
    def __init__(
        self,
        directory: CaregiverDirectory,
        alerts: TakesAlerts,
        clock: Callable[[], datetime],
    ) -> None:
        self._directory = directory
        self._alerts = alerts
        self._clock = clock

    async def reply(self, *, sender: str, body: str) -> CallReply | None:
        """The caregiver's answer, or None when ``sender`` is no consenting caregiver's number
        (the reply is then a clinician's, handled as an acknowledgement)."""
        caller = await self._directory.contact_by_sms(sender)
        if caller is None:
            return None
        language = caller.contact.language
        if not asks_for_call(body):
            return CallReply(call_reply(language, "hint"))
        now = self._clock()
        contact_id = caller.contact.contact_id
        opened = await self._directory.open_escalations(caller.patient_id)
        # A request nobody has acknowledged yet: the care team is already being paged about it.
        requests = [
            e
            for e in opened
            if e.rule_id == Category.CALL_REQUEST.value and e.status in ("open", "exhausted")
        ]
        if requests:
            request = requests[0]
            await self._directory.note(
                request.escalation_id,
                now,
                TimelineEntry("caregiver_call_repeated", {"contact_id": str(contact_id)}),
            )
            return CallReply(call_reply(language, "already"), request.dedup_key)
        alert = call_request_alert(caller.patient_id, contact_id, now)
        await self._alerts.handle_alert(alert)
        for other in opened:
            await self._directory.note(
                other.escalation_id,
                now,
                TimelineEntry(
                    "caregiver_call_requested",
                    {"contact_id": str(contact_id), "request": alert.dedup_key},
                ),
            )
        await self._directory.audit(
            caller.patient_id,
            {
                "contact_id": str(contact_id),
                "dedup_key": alert.dedup_key,
                "joined": [o.dedup_key for o in opened],
            },
            now,
        )
        log.info(
            "caregiver_call_requested",
            extra=log_fields(patient_id=caller.patient_id, dedup_key=alert.dedup_key),
        )
        return CallReply(call_reply(language, "asked"), alert.dedup_key)
