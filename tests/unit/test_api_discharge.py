"""End of infusion and discharge use cases against an in-memory registry and page closer:
care-team scope, the bindings ended with a validity end (history kept), the pages closed with
the reason, idempotence (the same request answers the same record; another time or reason is
refused), and one audit entry per change."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.api.service_layer.discharge import (
    DISCHARGED,
    INFUSION_ENDED,
    CourseRecord,
    DischargeService,
    PatientBinding,
)
from services.api.service_layer.enrolment import Actor, Conflict, Invalid, NotFound

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=28)
NURSE = Actor("user:nurse", frozenset({"onc-a"}))
OTHER = Actor("user:other", frozenset({"onc-b"}))


@dataclass
class State:
    records: dict[str, CourseRecord] = field(default_factory=dict)
    bindings: dict[str, list[PatientBinding]] = field(default_factory=dict)


class MemoryRegistry:
    def __init__(self, state: State) -> None:
        self.state = state

    async def record(self, patient_id: str) -> CourseRecord | None:
        return self.state.records.get(patient_id)

    async def bindings(self, patient_id: str) -> list[PatientBinding]:
        return list(self.state.bindings.get(patient_id, []))

    async def end_binding(self, device_id: str, valid_from: datetime, valid_to: datetime) -> None:
        for bindings in self.state.bindings.values():
            for i, b in enumerate(bindings):
                if b.device_id == device_id and b.valid_from == valid_from:
                    bindings[i] = replace(b, valid_to=valid_to)

    async def end_infusion(self, patient_id: str, at: datetime) -> None:
        record = self.state.records[patient_id]
        self.state.records[patient_id] = replace(record, infusion_ended_at=at)

    async def discharge(self, patient_id: str, at: datetime, reason: str, by: str) -> None:
        record = self.state.records[patient_id]
        self.state.records[patient_id] = replace(
            record, discharged_at=at, discharge_reason=reason, discharged_by=by
        )

    async def discharged(self, care_teams: frozenset[str] | None) -> list[CourseRecord]:
        return [
            r
            for r in self.state.records.values()
            if r.discharged_at is not None and (care_teams is None or r.care_team_id in care_teams)
        ]


class MemoryStore:
    """Each transaction works on a copy, kept only when the block ends normally."""

    def __init__(self, state: State) -> None:
        self.state = state

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryRegistry]:
        work = copy.deepcopy(self.state)
        yield MemoryRegistry(work)
        self.state.records, self.state.bindings = work.records, work.bindings


class Pages:
    def __init__(self, open_: dict[str, list[str]]) -> None:
        self.open = open_  # patient -> devices of their open escalations
        self.calls: list[tuple[str, str, frozenset[str] | None]] = []

    async def close_patient(
        self, patient_id: str, *, reason: str, at: datetime, devices: frozenset[str] | None = None
    ) -> int:
        self.calls.append((patient_id, reason, devices))
        mine = self.open.get(patient_id, [])
        closing = [d for d in mine if devices is None or d in devices]
        self.open[patient_id] = [d for d in mine if d not in closing]
        return len(closing)


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, dict[str, Any]]] = []

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        self.entries.append((actor, action, subject, details))


@pytest.fixture
def world() -> tuple[DischargeService, State, Pages, Audit]:
    state = State(
        records={
            "P-1": CourseRecord("P-1", "onc-a"),
            "P-2": CourseRecord("P-2", "onc-b"),
        },
        bindings={
            "P-1": [
                # An old pump, swapped out: its binding already ended and stays as it was.
                PatientBinding("pump-old", "pump", T0, T0 + timedelta(days=7)),
                PatientBinding("pump-1", "pump", T0 + timedelta(days=7), None),
                PatientBinding("thermo-1", "thermometer", T0, None),
            ]
        },
    )
    pages = Pages({"P-1": ["pump-1", "thermo-1", "pump-1"]})
    audit = Audit()
    return DischargeService(MemoryStore(state), audit, lambda: NOW, pages), state, pages, audit


async def test_end_of_infusion_unbinds_the_pumps_only_and_closes_their_pages(world: Any) -> None:
    service, state, pages, audit = world
    done = await service.end_infusion(NURSE, "P-1")
    assert done.record.status == "infusion_ended" and done.record.infusion_ended_at == NOW
    assert [(b.device_id, b.valid_to) for b in done.ended] == [("pump-1", NOW)]
    ends = {b.device_id: b.valid_to for b in state.bindings["P-1"]}
    assert ends == {"pump-old": T0 + timedelta(days=7), "pump-1": NOW, "thermo-1": None}
    assert pages.calls == [("P-1", INFUSION_ENDED, frozenset({"pump-old", "pump-1"}))]
    assert done.escalations_closed == 2 and pages.open["P-1"] == ["thermo-1"]
    assert [(e[1], e[2]) for e in audit.entries] == [("patient.infusion_ended", "patient:P-1")]
    assert audit.entries[0][3]["devices_unbound"] == ["pump-1"]


async def test_discharge_ends_every_binding_closes_every_page_and_is_audited(world: Any) -> None:
    service, state, pages, audit = world
    at = NOW - timedelta(hours=2)
    done = await service.discharge(NURSE, "P-1", " course completed ", at)
    record = state.records["P-1"]
    assert record.status == "discharged" and done.record == record
    assert (record.discharged_at, record.infusion_ended_at) == (at, at)
    assert (record.discharge_reason, record.discharged_by) == ("course completed", "user:nurse")
    assert {b.device_id: b.valid_to for b in state.bindings["P-1"]}["thermo-1"] == at
    assert sorted(b.device_id for b in done.ended) == ["pump-1", "thermo-1"]
    assert pages.calls == [("P-1", DISCHARGED, None)] and done.escalations_closed == 3
    assert [e[1] for e in audit.entries] == ["patient.discharged"]
    assert audit.entries[0][3]["reason"] == "course completed"
    assert [r.patient_id for r in await service.discharged(NURSE)] == ["P-1"]
    assert await service.discharged(OTHER) == []


async def test_discharging_twice_answers_the_same_record_and_changes_nothing(world: Any) -> None:
    service, state, pages, audit = world
    first = await service.discharge(NURSE, "P-1", "course completed")
    pages.open["P-1"] = ["thermo-1"]  # one opened meanwhile (or the first closing failed)
    again = await service.discharge(NURSE, "P-1", "course completed")
    assert again.record == first.record and not again.changed and again.ended == []
    assert again.escalations_closed == 1
    assert len(audit.entries) == 1
    same_time = await service.discharge(
        NURSE, "P-1", "course completed", first.record.discharged_at
    )
    assert same_time.record == first.record
    with pytest.raises(Conflict):
        await service.discharge(NURSE, "P-1", "admitted")
    with pytest.raises(Conflict):
        await service.discharge(NURSE, "P-1", "course completed", NOW - timedelta(hours=1))
    with pytest.raises(Conflict):
        await service.end_infusion(NURSE, "P-1")
    assert state.records["P-1"] == first.record


async def test_ending_the_infusion_twice_answers_the_same_record(world: Any) -> None:
    service, _, _, audit = world
    first = await service.end_infusion(NURSE, "P-1", NOW - timedelta(hours=1))
    again = await service.end_infusion(NURSE, "P-1")
    assert again.record == first.record and not again.changed
    with pytest.raises(Conflict):
        await service.end_infusion(NURSE, "P-1", NOW)
    # A discharge before the recorded end of infusion is refused; after it, it keeps it.
    with pytest.raises(Invalid):
        await service.discharge(NURSE, "P-1", "course completed", NOW - timedelta(hours=2))
    done = await service.discharge(NURSE, "P-1", "course completed")
    assert done.record.infusion_ended_at == NOW - timedelta(hours=1)
    assert [e[1] for e in audit.entries] == ["patient.infusion_ended", "patient.discharged"]


async def test_another_teams_patient_or_none_is_not_found(world: Any) -> None:
    service, state, pages, audit = world
    for actor, patient in ((OTHER, "P-1"), (NURSE, "P-2"), (NURSE, "P-none")):
        with pytest.raises(NotFound):
            await service.discharge(actor, patient, "course completed")
        with pytest.raises(NotFound):
            await service.end_infusion(actor, patient)
    assert pages.calls == [] and audit.entries == []
    assert state.records["P-1"].status == "monitored"


async def test_refusals_write_nothing(world: Any) -> None:
    service, state, pages, audit = world
    before = copy.deepcopy(state)
    with pytest.raises(Invalid):
        await service.discharge(NURSE, "P-1", "   ")
    with pytest.raises(Invalid):
        await service.discharge(NURSE, "P-1", "x" * 501)
    with pytest.raises(Invalid):
        await service.discharge(NURSE, "P-1", "course completed", NOW + timedelta(hours=1))
    with pytest.raises(Invalid):
        await service.end_infusion(NURSE, "P-1", NOW.replace(tzinfo=None))  # no offset
    # A device bound only from after the time given would end before it began.
    with pytest.raises(Conflict):
        await service.discharge(NURSE, "P-1", "course completed", T0 + timedelta(days=3))
    assert state == before and pages.calls == [] and audit.entries == []
