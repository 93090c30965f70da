"""Closing a patient's escalations at the end of infusion or discharge
(``service_layer.closing``), against in-memory repositories: every open one is resolved in one
transaction with the reason on its timeline's ``resolved`` entry and the all clear to whoever was
paged; one already resolved is left as it was."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from services.notify.domain.escalation import (
    EscalationState,
    EscalationStatus,
    PolicySnapshot,
    Resolve,
    StepSnapshot,
    Target,
    Tick,
    advance,
    opened,
)
from services.notify.domain.routing import PagePurpose
from services.notify.service_layer.closing import close_patient
from services.notify.service_layer.unit_of_work import Change, EscalationRecord

T0 = datetime(2026, 3, 30, 2, 0, tzinfo=UTC)
POLICY = PolicySnapshot(
    policy_id="onc",
    steps=(StepSnapshot(targets=(Target("person", "nurse"),), wait_s=300),),
    repeat_count=1,
    schedules={},
)


def record(patient_id: str, state: EscalationState) -> EscalationRecord:
    key = f"{patient_id}:device_silent:{uuid.uuid4()}"
    return EscalationRecord(
        uuid.uuid4(), key, uuid.uuid4(), patient_id, "onc-a", None, T0, POLICY, state
    )


class Escalations:
    def __init__(self, records: list[EscalationRecord]) -> None:
        self.records = {r.escalation_id: r for r in records}
        self.saved: list[Change] = []

    async def lock(self, escalation_id: UUID, *, whole_bundle: bool = False) -> list[Any]:
        return [self.records[escalation_id]]

    async def save(self, changes: Sequence[Change]) -> None:
        self.saved += changes

    async def unresolved_of_patient(
        self, patient_id: str, devices: Sequence[str] | None
    ) -> list[UUID]:
        return sorted(r.escalation_id for r in self.records.values() if r.patient_id == patient_id)


class Outbox:
    def __init__(self) -> None:
        self.effects: list[Change] = []
        self.upstream: list[UUID] = []

    async def add_effects(self, changes: Sequence[Change], *, at: datetime) -> None:
        self.effects += changes

    async def sync_upstream(self, escalation_ids: Sequence[UUID], *, at: datetime) -> None:
        self.upstream += escalation_ids


class Work:
    def __init__(self, escalations: Escalations) -> None:
        self.escalations = escalations
        self.outbox = Outbox()
        self.committed = False

    async def __aenter__(self) -> Work:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def commit(self) -> None:
        self.committed = True


async def test_every_open_escalation_is_resolved_with_the_reason() -> None:
    paged = advance(POLICY, opened(T0), Tick(T0)).state
    done = advance(POLICY, paged, Resolve(at=T0)).state
    assert done.status is EscalationStatus.RESOLVED
    mine = [record("P-1", paged), record("P-1", opened(T0)), record("P-1", done)]
    escalations = Escalations([*mine, record("P-2", paged)])
    work = Work(escalations)
    at = T0 + timedelta(hours=1)
    closed = await close_patient(
        lambda: work,
        escalations,
        "P-1",
        reason="discharged",
        at=at,
    )
    # The one already resolved is left as it was; the other patient's is not touched.
    assert closed == 2 and work.committed
    assert {r.escalation_id for r, _ in escalations.saved} == {
        mine[0].escalation_id,
        mine[1].escalation_id,
    }
    for _, transition in escalations.saved:
        assert transition.state.status is EscalationStatus.RESOLVED
        assert transition.state.resolved_at == at
        assert [(e.kind, e.detail["reason"]) for e in transition.timeline] == [
            ("resolved", "discharged")
        ]
    all_clear = [c for _, t in work.outbox.effects for c in t.commands]
    assert [c.purpose for c in all_clear] == [PagePurpose.ALL_CLEAR]
    assert sorted(work.outbox.upstream) == sorted(r.escalation_id for r in mine[:2])


async def test_a_resolve_without_a_reason_writes_none() -> None:
    paged = advance(POLICY, opened(T0), Tick(T0)).state
    transition = advance(POLICY, paged, Resolve(at=T0))
    assert [e.detail for e in transition.timeline] == [{"all_clear_to": list(paged.paged)}]
