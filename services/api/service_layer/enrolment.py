"""Enrolment and device onboarding: the use cases behind ``/api/patients`` (enrol, weight),
``/api/devices`` (register, bind, unbind, swap, credentials, history) and ``vigil admin``.

Each use case runs in one registry transaction (``RegistryStore.transaction``) against the
``Registry`` port, and writes one audit entry once the transaction has committed. Registering a
device is one step: its registry entry, its binding (when a patient is named) and its MQTT
account are made together or not at all; without ``BrokerAccounts`` (a process that cannot
reach the broker) it is refused before anything is written.

Bindings follow what ingest resolves (a reading belongs to the patient the device was bound to
at the reading's device time): a device's validity periods never overlap, and a swap ends the
old device's binding at the instant the new one's begins. The cycle start is a new row of
``patient_cycles``, which the rules read as the patient's current cycle.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal, Protocol

DeviceKind = Literal["pump", "thermometer"]
Reporting = Literal["continuous", "spot_check"]
CredentialAction = Literal["issued", "rotated", "revoked"]

# docs/mqtt.md 1.1: a device id is its MQTT username and a topic level.
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_PREFIX = "vigil-"
PATIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOPIC_ROOT = "vigil/v1/dev"
CHANNELS = {"thermometer": ("temperature",), "pump": ("pump-status", "pump-event")}


class EnrolmentError(Exception):
    """A use case refused; the message is safe to show the caller."""


class NotFound(EnrolmentError):
    """No such patient or device among the caller's care teams (indistinguishable from none)."""


class Conflict(EnrolmentError):
    """The registry as it stands does not allow it (an id in use, an overlapping binding)."""


class Invalid(EnrolmentError):
    """The request itself is wrong, whatever the registry holds; ``field`` names what."""

    def __init__(self, message: str, field: str = "request") -> None:
        super().__init__(message)
        self.field = field


class BrokerUnavailable(EnrolmentError):
    """The broker's accounts cannot be changed from this process; nothing was written."""


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatientRecord:
    patient_id: str
    care_team_id: str
    weight_kg: float | None
    birth_date: date | None = None
    age_years: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    kind: str
    model: str | None
    reporting: str
    care_team_id: str | None


@dataclass(frozen=True, slots=True)
class BindingRecord:
    device_id: str
    patient_id: str
    valid_from: datetime
    valid_to: datetime | None
    # The bound patient's care team (for scoping what the caller is shown).
    care_team_id: str | None = None

    def covers(self, at: datetime) -> bool:
        return self.valid_from <= at and (self.valid_to is None or at < self.valid_to)

    def overlaps(self, start: datetime, end: datetime | None) -> bool:
        return (self.valid_to is None or start < self.valid_to) and (
            end is None or self.valid_from < end
        )


@dataclass(frozen=True, slots=True)
class CredentialEvent:
    device_id: str
    action: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Cycle:
    cycle_start: datetime
    step_up_day: int | None


# -- ports ---------------------------------------------------------------------------------


class BrokerAccounts(Protocol):
    """The broker's device accounts (the local stack's: ``vigil_tools.stack.accounts``).
    Blocking calls; ``issue`` and ``rotate`` return the new password."""

    def issue(self, device_id: str) -> str: ...
    def rotate(self, device_id: str) -> str: ...
    def revoke(self, device_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    """Where devices connect: told to the installer with the device's credentials."""

    host: str
    port: int
    tls: bool
    ca_certificate: str | None = None  # where the CA the device must trust is found


class Registry(Protocol):
    """The registry inside one transaction. ``device`` locks the device's row until the end of
    the transaction, so two bindings of one device are decided one after the other."""

    async def care_team_exists(self, care_team_id: str) -> bool: ...
    async def patient(self, patient_id: str) -> PatientRecord | None: ...
    async def add_patient(self, patient: PatientRecord) -> bool: ...
    async def set_weight(self, patient_id: str, weight_kg: float) -> None: ...
    async def add_cycle(self, patient_id: str, cycle: Cycle) -> None: ...
    async def cycles(self, patient_id: str) -> list[Cycle]: ...
    async def device(self, device_id: str) -> DeviceRecord | None: ...
    async def add_device(self, device: DeviceRecord) -> bool: ...
    async def bindings(self, device_id: str) -> list[BindingRecord]: ...
    async def add_binding(self, binding: BindingRecord) -> None: ...
    async def end_binding(
        self, device_id: str, valid_from: datetime, valid_to: datetime
    ) -> None: ...
    async def add_credential_event(self, event: CredentialEvent) -> None: ...
    async def credential_events(self, device_id: str) -> list[CredentialEvent]: ...


class RegistryStore(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[Registry]:
        """Commits when the block ends normally, rolls back when it raises."""
        ...


class AuditPort(Protocol):
    async def record(
        self, actor: str, action: str, subject: str, details: dict[str, Any]
    ) -> None: ...


# -- requests and answers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: the id written to the audit trail, and the care teams they may act for
    (``None``: every team, an operator on the command line)."""

    audit_id: str
    care_teams: frozenset[str] | None

    def sees(self, care_team_id: str | None) -> bool:
        if care_team_id is None:
            return False
        return self.care_teams is None or care_team_id in self.care_teams


@dataclass(frozen=True, slots=True)
class Enrolment:
    patient_id: str
    care_team_id: str
    weight_kg: float
    cycle_start: datetime
    step_up_day: int | None = None
    birth_date: date | None = None
    age_years: int | None = None


@dataclass(frozen=True, slots=True)
class NewDevice:
    device_id: str
    kind: str
    model: str | None = None
    reporting: str = "continuous"
    care_team_id: str | None = None  # default: the patient's
    patient_id: str | None = None
    bound_from: datetime | None = None  # default: now


@dataclass(frozen=True, slots=True)
class DeviceConfiguration:
    """What the device must be configured with (docs/mqtt.md). The password is shown once."""

    client_id: str
    username: str
    password: str
    host: str | None
    port: int | None
    tls: bool | None
    ca_certificate: str | None
    topic_prefix: str
    channels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Registration:
    device: DeviceRecord
    binding: BindingRecord | None
    configuration: DeviceConfiguration


@dataclass(frozen=True, slots=True)
class PatientView:
    patient: PatientRecord
    cycle: Cycle | None


@dataclass(frozen=True, slots=True)
class DeviceHistory:
    device: DeviceRecord
    bindings: list[BindingRecord] = field(default_factory=list)
    credential_events: list[CredentialEvent] = field(default_factory=list)


def _aware(at: datetime, name: str) -> datetime:
    if at.utcoffset() is None:
        raise Invalid(f"{name} needs a UTC offset, e.g. Z or +01:00", name)
    return at


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID.fullmatch(device_id):
        raise Invalid(
            "a device id is 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit", "device_id"
        )
    if device_id.startswith(RESERVED_PREFIX):
        raise Invalid(
            f"device ids starting with {RESERVED_PREFIX!r} are reserved for services", "device_id"
        )


def check_patient_id(patient_id: str) -> None:
    if not PATIENT_ID.fullmatch(patient_id):
        raise Invalid(
            "a patient id is 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit",
            "patient_id",
        )


def check_weight(weight_kg: float) -> None:
    # patients.weight_kg is numeric(5, 2), positive.
    if not 0 < weight_kg < 1000:
        raise Invalid("weight_kg must be above 0 and below 1000", "weight_kg")


def first_overlap(
    bindings: Sequence[BindingRecord], start: datetime, end: datetime | None
) -> BindingRecord | None:
    return next((b for b in bindings if b.overlaps(start, end)), None)


class EnrolmentService:
    def __init__(
        self,
        store: RegistryStore,
        audit: AuditPort,
        clock: Callable[[], datetime],
        *,
        broker: BrokerAccounts | None = None,
        endpoint: BrokerEndpoint | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self._broker = broker
        self._endpoint = endpoint

    @property
    def can_change_accounts(self) -> bool:
        return self._broker is not None

    # -- patients ---------------------------------------------------------------------------

    async def enrol(self, actor: Actor, enrolment: Enrolment) -> PatientView:
        check_patient_id(enrolment.patient_id)
        check_weight(enrolment.weight_kg)
        cycle_start = _aware(enrolment.cycle_start, "cycle_start")
        if (enrolment.birth_date is None) == (enrolment.age_years is None):
            raise Invalid("give the date of birth or the age in years, one of them", "age_years")
        if enrolment.birth_date is not None and enrolment.birth_date > self._clock().date():
            raise Invalid("the date of birth is in the future", "birth_date")
        if enrolment.age_years is not None and not 0 <= enrolment.age_years <= 130:
            raise Invalid("age_years must be between 0 and 130", "age_years")
        if enrolment.step_up_day is not None and enrolment.step_up_day < 1:
            raise Invalid("step_up_day counts from day 1", "step_up_day")
        if not actor.sees(enrolment.care_team_id):
            raise NotFound("no such care team")
        patient = PatientRecord(
            enrolment.patient_id,
            enrolment.care_team_id,
            enrolment.weight_kg,
            enrolment.birth_date,
            enrolment.age_years,
        )
        cycle = Cycle(cycle_start, enrolment.step_up_day)
        async with self._store.transaction() as registry:
            if not await registry.care_team_exists(enrolment.care_team_id):
                raise NotFound("no such care team")
            if not await registry.add_patient(patient):
                raise Conflict(f"patient id {enrolment.patient_id!r} is already in use")
            await registry.add_cycle(patient.patient_id, cycle)
        await self._audit.record(
            actor.audit_id,
            "patient.enrolled",
            f"patient:{patient.patient_id}",
            {
                "care_team_id": patient.care_team_id,
                "weight_kg": patient.weight_kg,
                "birth_date": patient.birth_date.isoformat() if patient.birth_date else None,
                "age_years": patient.age_years,
                "cycle_start": cycle.cycle_start.isoformat(),
                "step_up_day": cycle.step_up_day,
            },
        )
        return PatientView(patient, cycle)

    async def set_weight(self, actor: Actor, patient_id: str, weight_kg: float) -> PatientView:
        check_weight(weight_kg)
        async with self._store.transaction() as registry:
            patient = await self._patient(registry, actor, patient_id)
            await registry.set_weight(patient_id, weight_kg)
            cycles = await registry.cycles(patient_id)
        await self._audit.record(
            actor.audit_id,
            "patient.weight_changed",
            f"patient:{patient_id}",
            {"old": patient.weight_kg, "new": weight_kg},
        )
        updated = PatientRecord(
            patient.patient_id,
            patient.care_team_id,
            weight_kg,
            patient.birth_date,
            patient.age_years,
        )
        return PatientView(updated, max(cycles, key=lambda c: c.cycle_start, default=None))

    # -- devices ----------------------------------------------------------------------------

    async def register_device(self, actor: Actor, new: NewDevice) -> Registration:
        check_device_id(new.device_id)
        if new.kind not in CHANNELS:
            raise Invalid("kind is pump or thermometer", "kind")
        if new.reporting not in ("continuous", "spot_check"):
            raise Invalid("reporting is continuous or spot_check", "reporting")
        if new.kind == "pump" and new.reporting != "continuous":
            raise Invalid("pumps report continuously", "reporting")
        if new.care_team_id is None and new.patient_id is None:
            raise Invalid("name the care team, or the patient the device is for", "care_team_id")
        bound_from = _aware(new.bound_from or self._clock(), "bound_from")
        broker = self._broker
        if broker is None:
            raise BrokerUnavailable(
                "this process has no access to the broker's device accounts, so it registers "
                "no device (a device without its account could not connect); register it "
                "where the accounts are managed (on the local stack: `vigil admin add-device`)"
            )
        password: str | None = None
        try:
            async with self._store.transaction() as registry:
                team = new.care_team_id
                binding: BindingRecord | None = None
                if new.patient_id is not None:
                    patient = await self._patient(registry, actor, new.patient_id)
                    if team is not None and team != patient.care_team_id:
                        raise Invalid(
                            "the patient is in another care team than the one named",
                            "care_team_id",
                        )
                    team = patient.care_team_id
                    binding = BindingRecord(
                        new.device_id, patient.patient_id, bound_from, None, team
                    )
                if not actor.sees(team) or not await registry.care_team_exists(team or ""):
                    raise NotFound("no such care team")
                device = DeviceRecord(new.device_id, new.kind, new.model, new.reporting, team)
                if not await registry.add_device(device):
                    raise Conflict(f"device id {new.device_id!r} is already registered")
                if binding is not None:
                    await registry.add_binding(binding)
                try:
                    password = await asyncio.to_thread(broker.issue, new.device_id)
                except Exception as error:  # whatever the broker's tooling raised
                    raise BrokerUnavailable(
                        f"the broker refused the device account: {error}"
                    ) from error
                await registry.add_credential_event(
                    CredentialEvent(new.device_id, "issued", self._clock())
                )
        except BaseException:
            if password is not None:
                # The account exists but the registry entry does not: take the account back.
                await asyncio.to_thread(broker.revoke, new.device_id)
            raise
        await self._audit.record(
            actor.audit_id,
            "device.registered",
            f"device:{device.device_id}",
            {
                "kind": device.kind,
                "model": device.model,
                "reporting": device.reporting,
                "care_team_id": device.care_team_id,
                "patient_id": binding.patient_id if binding else None,
                "valid_from": binding.valid_from.isoformat() if binding else None,
                "credential": "issued",
            },
        )
        return Registration(device, binding, self._configuration(device, password))

    async def bind(
        self,
        actor: Actor,
        device_id: str,
        patient_id: str,
        valid_from: datetime | None = None,
        valid_to: datetime | None = None,
    ) -> BindingRecord:
        start = _aware(valid_from or self._clock(), "valid_from")
        end = None if valid_to is None else _aware(valid_to, "valid_to")
        if end is not None and end <= start:
            raise Invalid("valid_to must be after valid_from", "valid_to")
        async with self._store.transaction() as registry:
            patient = await self._patient(registry, actor, patient_id)
            device, bindings = await self._device(registry, actor, device_id)
            self._refuse_overlap(actor, bindings, start, end)
            binding = BindingRecord(device.device_id, patient_id, start, end, patient.care_team_id)
            await registry.add_binding(binding)
        await self._audit.record(
            actor.audit_id,
            "device.bound",
            f"device:{device_id}",
            {
                "patient_id": patient_id,
                "valid_from": start.isoformat(),
                "valid_to": end.isoformat() if end else None,
            },
        )
        return binding

    async def unbind(
        self, actor: Actor, device_id: str, at: datetime | None = None
    ) -> BindingRecord:
        """End the binding in force at ``at`` (default now) at ``at``."""
        end = _aware(at or self._clock(), "at")
        async with self._store.transaction() as registry:
            _, bindings = await self._device(registry, actor, device_id)
            current = next((b for b in bindings if b.covers(end)), None)
            if current is None or not actor.sees(current.care_team_id):
                raise Conflict("the device is not bound to a patient of yours at that time")
            if current.valid_from == end:
                raise Invalid("the binding begins at that instant; end it after it begins", "at")
            await registry.end_binding(device_id, current.valid_from, end)
        ended = BindingRecord(
            current.device_id, current.patient_id, current.valid_from, end, current.care_team_id
        )
        await self._audit.record(
            actor.audit_id,
            "device.unbound",
            f"device:{device_id}",
            {
                "patient_id": current.patient_id,
                "valid_from": current.valid_from.isoformat(),
                "valid_to": end.isoformat(),
            },
        )
        return ended

    async def swap(
        self,
        actor: Actor,
        patient_id: str,
        old_device_id: str,
        new_device_id: str,
        at: datetime | None = None,
    ) -> tuple[BindingRecord, BindingRecord]:
        """Replace the patient's ``old_device_id`` by ``new_device_id`` at ``at`` (default
        now): the old binding ends where the new one begins. Returns (ended, started)."""
        when = _aware(at or self._clock(), "at")
        if old_device_id == new_device_id:
            raise Invalid("the new device must be another device", "new_device_id")
        async with self._store.transaction() as registry:
            patient = await self._patient(registry, actor, patient_id)
            # Locked in id order, so two swaps of the same pair cannot wait on each other.
            first, second = sorted((old_device_id, new_device_id))
            found = {
                first: await self._device(registry, actor, first),
                second: await self._device(registry, actor, second),
            }
            old, old_bindings = found[old_device_id]
            new, new_bindings = found[new_device_id]
            if old.kind != new.kind:
                raise Invalid(
                    f"a {old.kind} is swapped for a {old.kind}, not a {new.kind}", "new_device_id"
                )
            current = next(
                (b for b in old_bindings if b.covers(when) and b.patient_id == patient_id), None
            )
            if current is None:
                raise Conflict("the old device is not bound to this patient at that time")
            if current.valid_from == when:
                raise Invalid("the old device's binding begins at that instant", "at")
            self._refuse_overlap(actor, new_bindings, when, current.valid_to)
            started = BindingRecord(
                new_device_id, patient_id, when, current.valid_to, patient.care_team_id
            )
            await registry.end_binding(old_device_id, current.valid_from, when)
            await registry.add_binding(started)
        ended = BindingRecord(
            old_device_id, patient_id, current.valid_from, when, patient.care_team_id
        )
        await self._audit.record(
            actor.audit_id,
            "device.swapped",
            f"patient:{patient_id}",
            {
                "old_device_id": old_device_id,
                "new_device_id": new_device_id,
                "at": when.isoformat(),
            },
        )
        return ended, started

    async def rotate_credential(self, actor: Actor, device_id: str) -> DeviceConfiguration:
        broker = self._require_broker()
        async with self._store.transaction() as registry:
            device, _ = await self._device(registry, actor, device_id)
            password = await asyncio.to_thread(broker.rotate, device_id)
            await registry.add_credential_event(
                CredentialEvent(device_id, "rotated", self._clock())
            )
        await self._audit.record(
            actor.audit_id, "device.credential_rotated", f"device:{device_id}", {}
        )
        return self._configuration(device, password)

    async def revoke_credential(self, actor: Actor, device_id: str) -> None:
        broker = self._require_broker()
        async with self._store.transaction() as registry:
            await self._device(registry, actor, device_id)
            await asyncio.to_thread(broker.revoke, device_id)
            await registry.add_credential_event(
                CredentialEvent(device_id, "revoked", self._clock())
            )
        await self._audit.record(
            actor.audit_id, "device.credential_revoked", f"device:{device_id}", {}
        )

    async def device_history(self, actor: Actor, device_id: str) -> DeviceHistory:
        """The device, its bindings oldest first (a patient of another care team is shown
        without its id) and its credential events."""
        async with self._store.transaction() as registry:
            device, bindings = await self._device(registry, actor, device_id)
            events = await registry.credential_events(device_id)
        shown = [
            b
            if actor.sees(b.care_team_id)
            else BindingRecord(b.device_id, "", b.valid_from, b.valid_to, None)
            for b in sorted(bindings, key=lambda b: b.valid_from)
        ]
        await self._audit.record(actor.audit_id, "device.history", f"device:{device_id}", {})
        return DeviceHistory(device, shown, sorted(events, key=lambda e: (e.at, e.action)))

    # -- helpers ----------------------------------------------------------------------------

    def _require_broker(self) -> BrokerAccounts:
        if self._broker is None:
            raise BrokerUnavailable(
                "this process has no access to the broker's device accounts; change them "
                "where the accounts are managed (on the local stack: `vigil admin`)"
            )
        return self._broker

    def _configuration(self, device: DeviceRecord, password: str) -> DeviceConfiguration:
        endpoint = self._endpoint
        return DeviceConfiguration(
            client_id=device.device_id,
            username=device.device_id,
            password=password,
            host=endpoint.host if endpoint else None,
            port=endpoint.port if endpoint else None,
            tls=endpoint.tls if endpoint else None,
            ca_certificate=endpoint.ca_certificate if endpoint else None,
            topic_prefix=f"{TOPIC_ROOT}/{device.device_id}/",
            channels=CHANNELS.get(device.kind, ()),
        )

    @staticmethod
    async def _patient(registry: Registry, actor: Actor, patient_id: str) -> PatientRecord:
        patient = await registry.patient(patient_id)
        if patient is None or not actor.sees(patient.care_team_id):
            raise NotFound("no such patient")
        return patient

    @staticmethod
    async def _device(
        registry: Registry, actor: Actor, device_id: str
    ) -> tuple[DeviceRecord, list[BindingRecord]]:
        """The device (row locked) and its bindings, when the caller may see it: registered
        for one of their teams or, registered without a team, bound to one of their patients."""
        device = await registry.device(device_id)
        if device is None:
            raise NotFound("no such device")
        bindings = await registry.bindings(device_id)
        visible = actor.sees(device.care_team_id) or (
            device.care_team_id is None and any(actor.sees(b.care_team_id) for b in bindings)
        )
        if not visible:
            raise NotFound("no such device")
        return device, bindings

    @staticmethod
    def _refuse_overlap(
        actor: Actor, bindings: Sequence[BindingRecord], start: datetime, end: datetime | None
    ) -> None:
        clash = first_overlap(bindings, start, end)
        if clash is None:
            return
        whom = clash.patient_id if actor.sees(clash.care_team_id) else "a patient of another team"
        until = clash.valid_to.isoformat() if clash.valid_to else "open-ended"
        raise Conflict(
            f"the device is bound to {whom} from {clash.valid_from.isoformat()} to {until}, "
            "which overlaps; end that binding first (unbind) or swap"
        )
