"""End of infusion and discharge: the use cases behind ``POST /api/patients/{id}/end-infusion``,
``POST /api/patients/{id}/discharge``, ``GET /api/discharged`` and ``vigil admin end-infusion``
/ ``discharge``.

*End of infusion* (the bag course is over): the patient's pumps are unbound at that time and the
time is recorded on the patient; from it on the rules page nothing about the infusion (pump
alarms, pump silent, bag and interruption clocks) and notify's open escalations of the
patient's pump alerts are resolved with the reason ``infusion ended``. The thermometers stay
bound: fever monitoring goes on until discharge.

*Discharge*: every binding of the patient's devices still open ends at that time (a validity
end, so the history stays), the discharge time, reason and who discharged are recorded (and the
end of infusion, at the discharge, if it was not recorded before), and from that time on no
rule pages for the patient; every open escalation of theirs is resolved with the reason
``discharged``, on its timeline. The record, readings, alerts and timelines stay readable; the
roster lists the patient no longer, ``GET /api/discharged`` does.

Both are idempotent: asked again with nothing different (no time, or the time recorded; for a
discharge the same reason), they answer the record as it stands, change nothing and close any
escalation still open (a first call whose closing failed is completed by the next); asked with
another time or reason they are refused (``Conflict``): the record stands as first written.

Each runs in one registry transaction (the patient's row locked), then closes the escalations
through notify (``PageCloser``), then writes one audit entry when something changed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, Protocol

from services.api.service_layer.enrolment import (
    Actor,
    AuditPort,
    Conflict,
    Invalid,
    NotFound,
)

Status = Literal["monitored", "infusion_ended", "discharged"]

#: The reasons notify's timeline gives for the escalations closed.
DISCHARGED = "discharged"
INFUSION_ENDED = "infusion ended"
#: A time this far ahead of the server's clock is refused (a device's clock may run a bit ahead).
FUTURE_TOLERANCE = timedelta(minutes=5)
MAX_REASON = 500


@dataclass(frozen=True, slots=True)
class CourseRecord:
    """Where the patient's course stands."""

    patient_id: str
    care_team_id: str
    infusion_ended_at: datetime | None = None
    discharged_at: datetime | None = None
    discharge_reason: str | None = None
    discharged_by: str | None = None

    @property
    def status(self) -> Status:
        if self.discharged_at is not None:
            return "discharged"
        if self.infusion_ended_at is not None:
            return "infusion_ended"
        return "monitored"


@dataclass(frozen=True, slots=True)
class PatientBinding:
    """One of the patient's device bindings, with the device's kind."""

    device_id: str
    kind: str
    valid_from: datetime
    valid_to: datetime | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a call did: the record as it stands, the bindings it ended (with their new end),
    how many escalations notify resolved, and whether the record changed (False: a repeat)."""

    record: CourseRecord
    ended: list[PatientBinding] = field(default_factory=list)
    escalations_closed: int = 0
    changed: bool = True


class DischargeRegistry(Protocol):
    """The registry inside one transaction; ``record`` locks the patient's row."""

    async def record(self, patient_id: str) -> CourseRecord | None: ...
    async def bindings(self, patient_id: str) -> list[PatientBinding]: ...
    async def end_binding(
        self, device_id: str, valid_from: datetime, valid_to: datetime
    ) -> None: ...
    async def end_infusion(self, patient_id: str, at: datetime) -> None: ...
    async def discharge(self, patient_id: str, at: datetime, reason: str, by: str) -> None: ...
    async def discharged(self, care_teams: frozenset[str] | None) -> list[CourseRecord]: ...


class DischargeStore(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[DischargeRegistry]:
        """Commits when the block ends normally, rolls back when it raises."""
        ...


class PageCloser(Protocol):
    """Notify's escalations (``services.notify.public.AlertActions``)."""

    async def close_patient(
        self,
        patient_id: str,
        *,
        reason: str,
        at: datetime,
        devices: frozenset[str] | None = None,
    ) -> int:
        """Resolve every escalation of the patient not yet resolved (only those of alerts
        raised on ``devices``, when given), with ``reason`` on each timeline; how many."""
        ...


def _aware(at: datetime, name: str) -> datetime:
    if at.utcoffset() is None:
        raise Invalid(f"{name} needs a UTC offset, e.g. Z or +01:00", name)
    return at


class DischargeService:
    def __init__(
        self,
        store: DischargeStore,
        audit: AuditPort,
        clock: Callable[[], datetime],
        pages: PageCloser | None = None,
    ) -> None:
        """``pages``: notify's escalations (None: nothing to close, e.g. a registry-only test)."""
        self._store = store
        self._audit = audit
        self._clock = clock
        self._pages = pages

    async def end_infusion(
        self, actor: Actor, patient_id: str, at: datetime | None = None
    ) -> Outcome:
        """End the bag course at ``at`` (default now): the pumps bound then are unbound."""
        when = self._when(at)
        ended: list[PatientBinding] = []
        async with self._store.transaction() as registry:
            record = await self._record(registry, actor, patient_id)
            if record.discharged_at is not None:
                raise Conflict(
                    f"the patient was discharged at {record.discharged_at.isoformat()}; the "
                    "infusion ended then"
                )
            if record.infusion_ended_at is not None:
                if at is not None and at != record.infusion_ended_at:
                    raise Conflict(
                        "the infusion was already recorded as ended at "
                        f"{record.infusion_ended_at.isoformat()}"
                    )
                repeat = True
            else:
                repeat = False
                bindings = await registry.bindings(patient_id)
                ended = await self._end(registry, [b for b in bindings if b.kind == "pump"], when)
                await registry.end_infusion(patient_id, when)
                record = CourseRecord(
                    record.patient_id, record.care_team_id, infusion_ended_at=when
                )
            pumps = frozenset(
                b.device_id for b in await registry.bindings(patient_id) if b.kind == "pump"
            )
        closed = await self._close(patient_id, INFUSION_ENDED, pumps)
        if repeat:
            return Outcome(record, [], closed, changed=False)
        await self._audit.record(
            actor.audit_id,
            "patient.infusion_ended",
            f"patient:{patient_id}",
            {
                "at": when.isoformat(),
                "devices_unbound": [b.device_id for b in ended],
                "escalations_closed": closed,
            },
        )
        return Outcome(record, ended, closed)

    async def discharge(
        self, actor: Actor, patient_id: str, reason: str, at: datetime | None = None
    ) -> Outcome:
        """Discharge the patient at ``at`` (default now) for ``reason``."""
        reason = reason.strip()
        if not reason:
            raise Invalid("give the reason for the discharge", "reason")
        if len(reason) > MAX_REASON:
            raise Invalid(f"the reason is at most {MAX_REASON} characters", "reason")
        when = self._when(at)
        async with self._store.transaction() as registry:
            record = await self._record(registry, actor, patient_id)
            if record.discharged_at is not None:
                if (at is not None and at != record.discharged_at) or (
                    reason != record.discharge_reason
                ):
                    raise Conflict(
                        f"the patient was already discharged at "
                        f"{record.discharged_at.isoformat()} ({record.discharge_reason})"
                    )
                repeat = True
                ended = []
            else:
                repeat = False
                if record.infusion_ended_at is not None and when < record.infusion_ended_at:
                    raise Invalid(
                        "the discharge cannot be before the end of infusion recorded at "
                        f"{record.infusion_ended_at.isoformat()}",
                        "at",
                    )
                ended = await self._end(registry, await registry.bindings(patient_id), when)
                if record.infusion_ended_at is None:
                    await registry.end_infusion(patient_id, when)
                await registry.discharge(patient_id, when, reason, actor.audit_id)
                record = CourseRecord(
                    record.patient_id,
                    record.care_team_id,
                    infusion_ended_at=record.infusion_ended_at or when,
                    discharged_at=when,
                    discharge_reason=reason,
                    discharged_by=actor.audit_id,
                )
        closed = await self._close(patient_id, DISCHARGED, None)
        if repeat:
            return Outcome(record, [], closed, changed=False)
        await self._audit.record(
            actor.audit_id,
            "patient.discharged",
            f"patient:{patient_id}",
            {
                "at": when.isoformat(),
                "reason": reason,
                "devices_unbound": [b.device_id for b in ended],
                "escalations_closed": closed,
            },
        )
        return Outcome(record, ended, closed)

    async def discharged(self, actor: Actor) -> list[CourseRecord]:
        """The caller's discharged patients, most recently discharged first."""
        async with self._store.transaction() as registry:
            found = await registry.discharged(actor.care_teams)
        return sorted(
            (r for r in found if actor.sees(r.care_team_id)),
            key=lambda r: (r.discharged_at, r.patient_id),
            reverse=True,
        )

    # -- helpers ----------------------------------------------------------------------------

    def _when(self, at: datetime | None) -> datetime:
        now = self._clock()
        if at is None:
            return now
        _aware(at, "at")
        if at > now + FUTURE_TOLERANCE:
            raise Invalid("the time is in the future; record it when it happens", "at")
        return at

    @staticmethod
    async def _record(registry: DischargeRegistry, actor: Actor, patient_id: str) -> CourseRecord:
        record = await registry.record(patient_id)
        if record is None or not actor.sees(record.care_team_id):
            raise NotFound("no such patient")
        return record

    @staticmethod
    async def _end(
        registry: DischargeRegistry, bindings: list[PatientBinding], at: datetime
    ) -> list[PatientBinding]:
        """End at ``at`` each binding still in force then or later; refuse when one begins
        at or after ``at`` (it would end before it began: unbind it first)."""
        ended: list[PatientBinding] = []
        for b in bindings:
            if b.valid_to is not None and b.valid_to <= at:
                continue
            if b.valid_from >= at:
                raise Conflict(
                    f"device {b.device_id} is bound to the patient from "
                    f"{b.valid_from.isoformat()}, not before {at.isoformat()}; unbind it first"
                )
            await registry.end_binding(b.device_id, b.valid_from, at)
            ended.append(PatientBinding(b.device_id, b.kind, b.valid_from, at))
        return ended

    async def _close(self, patient_id: str, reason: str, devices: frozenset[str] | None) -> int:
        """Resolve the open escalations now (when they are closed, whatever time the end of
        infusion or discharge is recorded at)."""
        if self._pages is None or (devices is not None and not devices):
            return 0
        return await self._pages.close_patient(
            patient_id, reason=reason, at=self._clock(), devices=devices
        )
