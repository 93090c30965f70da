"""Caregiver contacts: who at home is told when a patient's alarm pages the care team.

A contact is an SMS number and/or an e-mail address, a language and preferred hours for the
messages that are not urgent; never a name. Nobody is messaged without consent: a contact is
created with its consent recorded (who recorded it, when, and a note of how it was given), and
stops being messaged the moment consent is withdrawn (kept, for the record, with who withdrew it
and when). The care team's 24-hour number is what a family is told to call when nobody
acknowledged in time. Every change is audited after it is written; notify reads these rows
(docs/caregivers.md).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, time
from typing import Any, Protocol

#: The languages notify has the words for (``services/notify/domain/caregiver.py``, checked
#: by migration 0040 too; a unit test keeps the three the same).
CAREGIVER_LANGUAGES = ("en", "fr", "es")

_PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True, slots=True)
class Contact:
    contact_id: uuid.UUID
    patient_id: str
    care_team_id: str
    sms: str | None
    email: str | None
    language: str
    consent_by: str
    consent_at: datetime
    consent_note: str | None
    preferred_from: time | None
    preferred_until: time | None
    created_at: datetime
    updated_by: str
    updated_at: datetime
    withdrawn_by: str | None = None
    withdrawn_at: datetime | None = None

    @property
    def consented(self) -> bool:
        return self.withdrawn_at is None


@dataclass(frozen=True, slots=True)
class ContactFields:
    """What a caller sets on a contact (None: unchanged, on a change)."""

    sms: str | None = None
    email: str | None = None
    language: str | None = None
    preferred_from: time | None = None
    preferred_until: time | None = None


class Invalid(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Refused(Exception):
    """A change that cannot be made as things stand (answered 409)."""


class ContactStore(Protocol):
    async def add(self, contact: Contact) -> None: ...
    async def get(self, patient_id: str, contact_id: uuid.UUID) -> Contact | None: ...
    async def of_patient(self, patient_id: str) -> list[Contact]: ...
    async def save(self, contact: Contact) -> None: ...
    async def unit_phone(self, care_team_id: str) -> dict[str, Any] | None: ...
    async def set_unit_phone(
        self, care_team_id: str, phone: str, by: str, at: datetime
    ) -> str | None:
        """Store the number; returns the one it replaced."""
        ...


class Audit(Protocol):
    async def record(
        self, actor: str, action: str, subject: str, details: dict[str, Any]
    ) -> None: ...


def check_fields(fields: ContactFields, *, creating: bool) -> None:
    if fields.sms is not None and not _PHONE.match(fields.sms):
        raise Invalid("sms", "an SMS number in international form, e.g. +441632960123")
    if fields.email is not None and (len(fields.email) > 254 or not _EMAIL.match(fields.email)):
        raise Invalid("email", "an e-mail address")
    if creating and fields.sms is None and fields.email is None:
        raise Invalid("sms", "a contact needs an SMS number, an e-mail address or both")
    if creating and fields.language is None:
        raise Invalid("language", "a language is required")
    if fields.language is not None and fields.language not in CAREGIVER_LANGUAGES:
        raise Invalid("language", f"one of {', '.join(CAREGIVER_LANGUAGES)}")
    if (fields.preferred_from is None) != (fields.preferred_until is None):
        raise Invalid("preferred_from", "preferred hours need both ends, or neither")
    if fields.preferred_from is not None and fields.preferred_from == fields.preferred_until:
        raise Invalid("preferred_until", "preferred hours cannot start and end at one time")


def check_phone(phone: str) -> None:
    if not _PHONE.match(phone):
        raise Invalid("unit_phone", "a number in international form, e.g. +441632960000")


def _public(contact: Contact) -> dict[str, Any]:
    """A contact as the audit log records it (addresses included: the log is the record)."""
    return {
        "sms": contact.sms,
        "email": contact.email,
        "language": contact.language,
        "preferred_from": None if contact.preferred_from is None else str(contact.preferred_from),
        "preferred_until": None
        if contact.preferred_until is None
        else str(contact.preferred_until),
    }


class CaregiverContacts:
    def __init__(self, store: ContactStore, audit: Audit, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock

    async def add(
        self,
        *,
        by_user_id: str,
        by_username: str,
        patient_id: str,
        care_team_id: str,
        fields: ContactFields,
        consent_note: str | None,
    ) -> Contact:
        check_fields(fields, creating=True)
        now = self._clock()
        assert fields.language is not None
        contact = Contact(
            contact_id=uuid.uuid4(),
            patient_id=patient_id,
            care_team_id=care_team_id,
            sms=fields.sms,
            email=fields.email,
            language=fields.language,
            consent_by=by_username,
            consent_at=now,
            consent_note=consent_note,
            preferred_from=fields.preferred_from,
            preferred_until=fields.preferred_until,
            created_at=now,
            updated_by=by_username,
            updated_at=now,
        )
        await self._store.add(contact)
        await self._audit.record(
            by_user_id,
            "caregiver.added",
            f"patient:{patient_id}",
            {
                "contact_id": str(contact.contact_id),
                **_public(contact),
                "consent_by": by_username,
                "consent_at": now.isoformat(),
                "consent_note": consent_note,
            },
        )
        return contact

    async def change(
        self, *, by_user_id: str, by_username: str, contact: Contact, fields: ContactFields
    ) -> Contact:
        check_fields(fields, creating=False)
        if not contact.consented:
            raise Refused("consent was withdrawn: add the contact again with new consent")
        changed = replace(
            contact,
            sms=fields.sms if fields.sms is not None else contact.sms,
            email=fields.email if fields.email is not None else contact.email,
            language=fields.language or contact.language,
            preferred_from=fields.preferred_from
            if fields.preferred_from is not None
            else contact.preferred_from,
            preferred_until=fields.preferred_until
            if fields.preferred_until is not None
            else contact.preferred_until,
            updated_by=by_username,
            updated_at=self._clock(),
        )
        await self._store.save(changed)
        await self._audit.record(
            by_user_id,
            "caregiver.changed",
            f"patient:{contact.patient_id}",
            {
                "contact_id": str(contact.contact_id),
                "old": _public(contact),
                "new": _public(changed),
            },
        )
        return changed

    async def withdraw(self, *, by_user_id: str, by_username: str, contact: Contact) -> Contact:
        """Consent withdrawn: nothing is sent to the contact from now on."""
        if not contact.consented:
            raise Refused("consent already withdrawn")
        now = self._clock()
        withdrawn = replace(
            contact,
            withdrawn_by=by_username,
            withdrawn_at=now,
            updated_by=by_username,
            updated_at=now,
        )
        await self._store.save(withdrawn)
        await self._audit.record(
            by_user_id,
            "caregiver.consent_withdrawn",
            f"patient:{contact.patient_id}",
            {"contact_id": str(contact.contact_id), "withdrawn_at": now.isoformat()},
        )
        return withdrawn

    async def set_unit_phone(
        self, *, by_user_id: str, by_username: str, care_team_id: str, phone: str
    ) -> datetime:
        check_phone(phone)
        now = self._clock()
        old = await self._store.set_unit_phone(care_team_id, phone, by_username, now)
        await self._audit.record(
            by_user_id,
            "caregiver.unit_phone_changed",
            f"care_team:{care_team_id}",
            {"old": old, "new": phone},
        )
        return now
