"""A caregiver's SMS reply asking for a call (services/notify/service_layer/caregiver_calls.py),
over fakes: a consenting caregiver's CALL opens a HIGH alert of its own and notes it on the
patient's open escalations; a second CALL while it is open opens nothing; another reply gets a
hint; a number that is no caregiver's is left to the clinicians' acknowledgement."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from schemas.events import Alert, AlertPriority
from services.notify.domain.caregiver import CaregiverContact
from services.notify.domain.escalation import TimelineEntry
from services.notify.service_layer.caregiver_calls import (
    CALL_REQUEST_CODE,
    CallerContact,
    CaregiverCalls,
    OpenEscalation,
)

NOW = datetime(2026, 1, 15, 2, 30, tzinfo=UTC)
MUM = uuid.UUID(int=7)
PUMP = OpenEscalation(uuid.UUID(int=1), "P1:pump_alarm:occlusion", "pump_alarm")


class Directory:
    def __init__(self, opened: list[OpenEscalation]) -> None:
        self.contacts = {
            "+33612345678": CallerContact(CaregiverContact(MUM, "fr", "+33612345678"), "P1")
        }
        self.opened = opened
        self.notes: list[tuple[uuid.UUID, TimelineEntry]] = []
        self.audited: list[dict[str, Any]] = []

    async def contact_by_sms(self, number: str) -> CallerContact | None:
        return self.contacts.get(number)

    async def open_escalations(self, patient_id: str) -> list[OpenEscalation]:
        return list(self.opened)

    async def note(self, escalation_id: uuid.UUID, at: datetime, entry: TimelineEntry) -> None:
        self.notes.append((escalation_id, entry))

    async def audit(self, patient_id: str, details: dict[str, object], at: datetime) -> None:
        self.audited.append({"patient_id": patient_id, **details})


class Alerts:
    def __init__(self, directory: Directory) -> None:
        self.taken: list[Alert] = []
        self._directory = directory

    async def handle_alert(self, alert: Alert) -> bool:
        self.taken.append(alert)
        self._directory.opened.insert(
            0, OpenEscalation(uuid.UUID(int=99), alert.dedup_key, alert.rule_id)
        )
        return True


def rig(opened: list[OpenEscalation]) -> tuple[CaregiverCalls, Directory, Alerts]:
    directory = Directory(opened)
    alerts = Alerts(directory)
    return CaregiverCalls(directory, alerts, lambda: NOW), directory, alerts


async def test_call_opens_a_page_and_joins_the_open_escalation() -> None:
    calls, directory, alerts = rig([PUMP])
    reply = await calls.reply(sender="+33612345678", body="appel")
    assert reply is not None
    assert reply.text == "Votre équipe soignante a été invitée à vous appeler."
    (alert,) = alerts.taken
    assert alert.code == CALL_REQUEST_CODE and alert.rule_id == "caregiver.call"
    assert alert.priority is AlertPriority.HIGH and alert.patient_id == "P1"
    assert alert.title == "Caregiver asks for a call" and reply.dedup_key == alert.dedup_key
    assert directory.notes == [
        (
            PUMP.escalation_id,
            TimelineEntry(
                "caregiver_call_requested",
                {"contact_id": str(MUM), "request": alert.dedup_key},
            ),
        )
    ]
    assert directory.audited[0]["joined"] == [PUMP.dedup_key]


async def test_a_second_call_while_one_is_open_opens_nothing() -> None:
    calls, directory, alerts = rig([])
    await calls.reply(sender="+33612345678", body="CALL")
    again = await calls.reply(sender="+33612345678", body="HELP")
    assert again is not None
    assert again.text == "Votre équipe soignante a déjà été invitée à vous appeler."
    assert len(alerts.taken) == 1
    assert directory.notes[-1][1].kind == "caregiver_call_repeated"


async def test_other_replies_and_other_numbers() -> None:
    calls, directory, alerts = rig([PUMP])
    hint = await calls.reply(sender="+33612345678", body="1")
    assert hint is not None and hint.text.startswith("Répondez APPEL")
    assert await calls.reply(sender="+15550001111", body="CALL") is None
    assert alerts.taken == [] and directory.notes == []


async def test_an_acknowledged_request_does_not_hold_a_new_one() -> None:
    answered = OpenEscalation(
        uuid.UUID(int=5), "caregiver:call:P1:x:1", "caregiver.call", "acknowledged"
    )
    calls, directory, alerts = rig([answered])
    reply = await calls.reply(sender="+33612345678", body="CALL")
    assert reply is not None and len(alerts.taken) == 1
    assert directory.notes[0][1].kind == "caregiver_call_requested"
