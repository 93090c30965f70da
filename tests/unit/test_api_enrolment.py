"""Enrolment and device onboarding use cases against an in-memory registry: care-team scope,
one-step registration (all or nothing), bindings without overlap, a swap that keeps history,
and an audit entry for every change."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from services.api.service_layer.enrolment import (
    Actor,
    BindingRecord,
    BrokerEndpoint,
    BrokerUnavailable,
    Conflict,
    CredentialEvent,
    Cycle,
    DeviceRecord,
    Enrolment,
    EnrolmentService,
    Invalid,
    NewDevice,
    NotFound,
    PatientRecord,
)

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@dataclass
class State:
    teams: set[str] = field(default_factory=set)
    patients: dict[str, PatientRecord] = field(default_factory=dict)
    cycles: dict[str, list[Cycle]] = field(default_factory=dict)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    bindings: list[BindingRecord] = field(default_factory=list)
    events: list[CredentialEvent] = field(default_factory=list)


class MemoryRegistry:
    def __init__(self, state: State) -> None:
        self.state = state

    async def care_team_exists(self, care_team_id: str) -> bool:
        return care_team_id in self.state.teams

    async def patient(self, patient_id: str) -> PatientRecord | None:
        return self.state.patients.get(patient_id)

    async def add_patient(self, patient: PatientRecord) -> bool:
        if patient.patient_id in self.state.patients:
            return False
        self.state.patients[patient.patient_id] = patient
        return True

    async def set_weight(self, patient_id: str, weight_kg: float) -> None:
        patient = self.state.patients[patient_id]
        self.state.patients[patient_id] = replace(patient, weight_kg=weight_kg)

    async def add_cycle(self, patient_id: str, cycle: Cycle) -> None:
        self.state.cycles.setdefault(patient_id, []).append(cycle)

    async def cycles(self, patient_id: str) -> list[Cycle]:
        return list(self.state.cycles.get(patient_id, []))

    async def device(self, device_id: str) -> DeviceRecord | None:
        return self.state.devices.get(device_id)

    async def add_device(self, device: DeviceRecord) -> bool:
        if device.device_id in self.state.devices:
            return False
        self.state.devices[device.device_id] = device
        return True

    async def bindings(self, device_id: str) -> list[BindingRecord]:
        return [
            replace(b, care_team_id=self.state.patients[b.patient_id].care_team_id)
            for b in self.state.bindings
            if b.device_id == device_id
        ]

    async def add_binding(self, binding: BindingRecord) -> None:
        assert not any(
            b.device_id == binding.device_id and b.valid_from == binding.valid_from
            for b in self.state.bindings
        )
        self.state.bindings.append(replace(binding, care_team_id=None))

    async def end_binding(self, device_id: str, valid_from: datetime, valid_to: datetime) -> None:
        for index, b in enumerate(self.state.bindings):
            if b.device_id == device_id and b.valid_from == valid_from:
                assert valid_to > valid_from
                self.state.bindings[index] = replace(b, valid_to=valid_to)

    async def add_credential_event(self, event: CredentialEvent) -> None:
        self.state.events.append(event)

    async def credential_events(self, device_id: str) -> list[CredentialEvent]:
        return [e for e in self.state.events if e.device_id == device_id]


class MemoryStore:
    """Each transaction works on a copy that replaces the state only when the block succeeds."""

    def __init__(self) -> None:
        self.state = State()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryRegistry]:
        working = copy.deepcopy(self.state)
        yield MemoryRegistry(working)
        self.state = working


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, dict[str, Any]]] = []

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        self.entries.append((actor, action, subject, details))


class Broker:
    def __init__(self, fail: bool = False) -> None:
        self.accounts: dict[str, str] = {}
        self.fail = fail
        self.count = 0

    def issue(self, device_id: str) -> str:
        if self.fail:
            raise RuntimeError("mosquitto_passwd failed")
        self.count += 1
        self.accounts[device_id] = f"pw-{self.count}"
        return self.accounts[device_id]

    def rotate(self, device_id: str) -> str:
        assert device_id in self.accounts
        self.count += 1
        self.accounts[device_id] = f"pw-{self.count}"
        return self.accounts[device_id]

    def revoke(self, device_id: str) -> None:
        self.accounts.pop(device_id, None)


NURSE_A = Actor("nurse-a", frozenset({"team-a"}))
NURSE_B = Actor("nurse-b", frozenset({"team-b"}))
ENDPOINT = BrokerEndpoint("mqtt.hospital.test", 8883, True, "ca.crt")


@dataclass
class World:
    store: MemoryStore
    audit: Audit
    broker: Broker
    service: EnrolmentService


def world(broker: Broker | None = None, *, without_broker: bool = False) -> World:
    store, audit = MemoryStore(), Audit()
    store.state.teams.update({"team-a", "team-b"})
    used = broker or Broker()
    service = EnrolmentService(
        store,
        audit,
        lambda: T0,
        broker=None if without_broker else used,
        endpoint=ENDPOINT,
    )
    return World(store, audit, used, service)


def enrolment(patient_id: str = "P-1", team: str = "team-a", **kw: Any) -> Enrolment:
    values: dict[str, Any] = {
        "patient_id": patient_id,
        "care_team_id": team,
        "weight_kg": 18.4,
        "cycle_start": T0 - timedelta(days=3),
        "step_up_day": 8,
        "age_years": 6,
    }
    values.update(kw)
    return Enrolment(**values)


async def test_enrol_writes_patient_and_current_cycle_and_audits() -> None:
    w = world()
    view = await w.service.enrol(NURSE_A, enrolment(birth_date=date(2019, 5, 1), age_years=None))
    assert w.store.state.patients["P-1"] == PatientRecord(
        "P-1", "team-a", 18.4, date(2019, 5, 1), None
    )
    assert w.store.state.cycles["P-1"] == [Cycle(T0 - timedelta(days=3), 8)]
    assert view.cycle == Cycle(T0 - timedelta(days=3), 8)
    actor, action, subject, details = w.audit.entries[-1]
    assert (actor, action, subject) == ("nurse-a", "patient.enrolled", "patient:P-1")
    assert details["birth_date"] == "2019-05-01"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"team": "team-b"}, NotFound),  # not a team of the caller
        ({"birth_date": date(2019, 1, 1)}, Invalid),  # both age and date of birth
        ({"age_years": None}, Invalid),  # neither
        ({"weight_kg": 0.0}, Invalid),
        ({"cycle_start": datetime(2026, 3, 1, 8, 0)}, Invalid),  # naive  # noqa: DTZ001
        ({"patient_id": "P 1/#"}, Invalid),
        ({"step_up_day": 0}, Invalid),
    ],
)
async def test_enrol_refusals_write_nothing(change: dict[str, Any], error: type) -> None:
    w = world()
    with pytest.raises(error):
        await w.service.enrol(NURSE_A, enrolment(**change))
    assert w.store.state.patients == {} and w.audit.entries == []


async def test_enrol_twice_is_a_conflict() -> None:
    w = world()
    await w.service.enrol(NURSE_A, enrolment())
    with pytest.raises(Conflict):
        await w.service.enrol(NURSE_A, enrolment())
    assert len(w.store.state.cycles["P-1"]) == 1


async def test_weight_update_scoped_and_audited() -> None:
    w = world()
    await w.service.enrol(NURSE_A, enrolment())
    with pytest.raises(NotFound):
        await w.service.set_weight(NURSE_B, "P-1", 20.0)
    view = await w.service.set_weight(NURSE_A, "P-1", 19.1)
    assert view.patient.weight_kg == 19.1 and w.store.state.patients["P-1"].weight_kg == 19.1
    assert w.audit.entries[-1][1:] == (
        "patient.weight_changed",
        "patient:P-1",
        {"old": 18.4, "new": 19.1},
    )


async def test_register_with_patient_is_one_step_and_says_what_to_configure() -> None:
    w = world()
    await w.service.enrol(NURSE_A, enrolment())
    done = await w.service.register_device(
        NURSE_A, NewDevice("thermo-1", "thermometer", "TX-2", "spot_check", patient_id="P-1")
    )
    assert w.store.state.devices["thermo-1"].care_team_id == "team-a"
    assert [(b.patient_id, b.valid_from, b.valid_to) for b in w.store.state.bindings] == [
        ("P-1", T0, None)
    ]
    assert [e.action for e in w.store.state.events] == ["issued"]
    config = done.configuration
    assert config.password == w.broker.accounts["thermo-1"]
    assert (config.client_id, config.username) == ("thermo-1", "thermo-1")
    assert config.topic_prefix == "vigil/v1/dev/thermo-1/"
    assert config.channels == ("temperature",)
    assert (config.host, config.port, config.tls) == ("mqtt.hospital.test", 8883, True)
    assert w.audit.entries[-1][1] == "device.registered"
    assert "pw-" not in repr(w.audit.entries)  # the password is never audited


async def test_register_without_broker_is_503_and_writes_nothing() -> None:
    w = world(without_broker=True)
    await w.service.enrol(NURSE_A, enrolment())
    with pytest.raises(BrokerUnavailable):
        await w.service.register_device(
            NURSE_A, NewDevice("thermo-1", "thermometer", patient_id="P-1")
        )
    assert w.store.state.devices == {} and w.store.state.bindings == []


async def test_a_broker_failure_rolls_the_registry_back() -> None:
    w = world(Broker(fail=True))
    await w.service.enrol(NURSE_A, enrolment())
    with pytest.raises(BrokerUnavailable):
        await w.service.register_device(
            NURSE_A, NewDevice("thermo-1", "thermometer", patient_id="P-1")
        )
    assert w.store.state.devices == {} and w.store.state.events == []


async def test_a_registry_failure_after_the_account_takes_the_account_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = world()
    await w.service.enrol(NURSE_A, enrolment())

    async def broken(self: MemoryRegistry, event: CredentialEvent) -> None:
        raise OSError("connection lost")

    monkeypatch.setattr(MemoryRegistry, "add_credential_event", broken)
    with pytest.raises(OSError):
        await w.service.register_device(
            NURSE_A, NewDevice("thermo-1", "thermometer", patient_id="P-1")
        )
    assert w.broker.accounts == {} and w.store.state.devices == {}


@pytest.mark.parametrize(
    ("new", "error"),
    [
        (NewDevice("vigil-x", "thermometer", care_team_id="team-a"), Invalid),
        (NewDevice("pump-1", "pump", reporting="spot_check", care_team_id="team-a"), Invalid),
        (NewDevice("t-1", "glucometer", care_team_id="team-a"), Invalid),
        (NewDevice("t-1", "thermometer"), Invalid),  # no team, no patient
        (NewDevice("t-1", "thermometer", care_team_id="team-b"), NotFound),
        (NewDevice("t-1", "thermometer", patient_id="P-B"), NotFound),
        (NewDevice("t-1", "thermometer", care_team_id="team-b", patient_id="P-1"), Invalid),
    ],
)
async def test_register_refusals(new: NewDevice, error: type) -> None:
    w = world()
    await w.service.enrol(NURSE_A, enrolment())
    await w.service.enrol(NURSE_B, enrolment("P-B", "team-b"))
    with pytest.raises(error):
        await w.service.register_device(NURSE_A, new)
    assert w.store.state.devices == {} and w.broker.accounts == {}


async def test_register_an_id_in_use_is_a_conflict() -> None:
    w = world()
    await w.service.register_device(NURSE_A, NewDevice("t-1", "thermometer", care_team_id="team-a"))
    with pytest.raises(Conflict):
        await w.service.register_device(
            NURSE_A, NewDevice("t-1", "thermometer", care_team_id="team-a")
        )
    assert [e.action for e in w.store.state.events] == ["issued"]


async def two_patients_and_pumps(w: World) -> None:
    await w.service.enrol(NURSE_A, enrolment("P-1"))
    await w.service.enrol(NURSE_A, enrolment("P-2"))
    for pump in ("pump-1", "pump-2"):
        await w.service.register_device(NURSE_A, NewDevice(pump, "pump", care_team_id="team-a"))


async def test_bind_refuses_an_overlapping_period_on_either_side() -> None:
    w = world()
    await two_patients_and_pumps(w)
    await w.service.bind(NURSE_A, "pump-1", "P-1", T0, T0 + timedelta(days=2))
    for start, end in (
        (T0 + timedelta(days=1), None),
        (T0 - timedelta(days=1), T0 + timedelta(hours=1)),
        (T0 - timedelta(days=1), None),
    ):
        with pytest.raises(Conflict, match="P-1"):
            await w.service.bind(NURSE_A, "pump-1", "P-2", start, end)
    # Back to back is not an overlap.
    later = await w.service.bind(NURSE_A, "pump-1", "P-2", T0 + timedelta(days=2))
    assert later.valid_from == T0 + timedelta(days=2)
    assert len(w.store.state.bindings) == 2


async def test_another_teams_device_and_patient_are_not_found() -> None:
    w = world()
    await two_patients_and_pumps(w)
    await w.service.enrol(NURSE_B, enrolment("P-B", "team-b"))
    with pytest.raises(NotFound):
        await w.service.bind(NURSE_B, "pump-1", "P-B")
    with pytest.raises(NotFound):
        await w.service.bind(NURSE_A, "pump-1", "P-B")
    with pytest.raises(NotFound):
        await w.service.device_history(NURSE_B, "pump-1")


async def test_unbind_ends_the_binding_in_force() -> None:
    w = world()
    await two_patients_and_pumps(w)
    await w.service.bind(NURSE_A, "pump-1", "P-1", T0 - timedelta(days=1))
    ended = await w.service.unbind(NURSE_A, "pump-1", T0)
    assert ended.valid_to == T0
    with pytest.raises(Conflict):
        await w.service.unbind(NURSE_A, "pump-1", T0 + timedelta(hours=1))
    assert w.audit.entries[-1][1] == "device.unbound"


async def test_swap_ends_the_old_binding_where_the_new_begins() -> None:
    w = world()
    await two_patients_and_pumps(w)
    await w.service.bind(NURSE_A, "pump-1", "P-1", T0 - timedelta(days=3))
    at = T0 + timedelta(hours=2)
    ended, started = await w.service.swap(NURSE_A, "P-1", "pump-1", "pump-2", at)
    assert (ended.valid_to, started.valid_from, started.valid_to) == (at, at, None)
    history = await w.service.device_history(NURSE_A, "pump-1")
    assert [(b.patient_id, b.valid_from, b.valid_to) for b in history.bindings] == [
        ("P-1", T0 - timedelta(days=3), at)
    ]
    assert [e.action for e in history.credential_events] == ["issued"]
    assert w.audit.entries[-1][1:3] == ("device.history", "device:pump-1")
    assert any(e[1] == "device.swapped" for e in w.audit.entries)


async def test_swap_refuses_a_new_device_bound_elsewhere_and_changes_nothing() -> None:
    w = world()
    await two_patients_and_pumps(w)
    await w.service.bind(NURSE_A, "pump-1", "P-1", T0 - timedelta(days=3))
    await w.service.bind(NURSE_A, "pump-2", "P-2", T0 - timedelta(days=1))
    before = copy.deepcopy(w.store.state.bindings)
    with pytest.raises(Conflict, match="P-2"):
        await w.service.swap(NURSE_A, "P-1", "pump-1", "pump-2", T0)
    assert w.store.state.bindings == before


async def test_swap_needs_the_same_kind_and_the_old_device_bound_then() -> None:
    w = world()
    await two_patients_and_pumps(w)
    await w.service.register_device(
        NURSE_A, NewDevice("thermo-1", "thermometer", care_team_id="team-a")
    )
    await w.service.bind(NURSE_A, "pump-1", "P-1", T0 - timedelta(days=3))
    with pytest.raises(Invalid):
        await w.service.swap(NURSE_A, "P-1", "pump-1", "thermo-1", T0)
    with pytest.raises(Conflict):
        await w.service.swap(NURSE_A, "P-1", "pump-1", "pump-2", T0 - timedelta(days=4))
    with pytest.raises(Conflict):
        await w.service.swap(NURSE_A, "P-2", "pump-1", "pump-2", T0)


async def test_rotate_and_revoke_record_credential_events() -> None:
    w = world()
    await w.service.register_device(NURSE_A, NewDevice("t-1", "thermometer", care_team_id="team-a"))
    first = w.broker.accounts["t-1"]
    config = await w.service.rotate_credential(NURSE_A, "t-1")
    assert config.password != first and config.password == w.broker.accounts["t-1"]
    await w.service.revoke_credential(NURSE_A, "t-1")
    assert "t-1" not in w.broker.accounts
    assert [e.action for e in w.store.state.events] == ["issued", "rotated", "revoked"]
    with pytest.raises(NotFound):
        await w.service.rotate_credential(NURSE_B, "t-1")


async def test_history_hides_the_patient_of_another_team() -> None:
    w = world()
    await w.service.enrol(NURSE_A, enrolment("P-1"))
    await w.service.enrol(NURSE_B, enrolment("P-B", "team-b"))
    # A device registered before devices had a care team, seen through its bindings.
    w.store.state.devices["old-1"] = DeviceRecord("old-1", "thermometer", None, "continuous", None)
    w.store.state.bindings += [
        BindingRecord("old-1", "P-B", T0 - timedelta(days=9), T0 - timedelta(days=5)),
        BindingRecord("old-1", "P-1", T0 - timedelta(days=2), None),
    ]
    history = await w.service.device_history(NURSE_A, "old-1")
    assert [b.patient_id for b in history.bindings] == ["", "P-1"]
    with pytest.raises(Conflict, match="another team"):
        await w.service.bind(NURSE_A, "old-1", "P-1", T0 - timedelta(days=6))
