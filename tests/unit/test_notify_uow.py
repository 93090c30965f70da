"""EscalationService through the fake unit of work (tests/fakes/notify_store.py): each step of
an alert's path is one unit of work that the service opens, runs through the pure engine and
commits; a block left without a commit leaves nothing behind."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from services.notify.domain.escalation import EscalationStatus, Tick, advance, opened
from services.notify.domain.routing import PagePurpose
from tests.factories import make_alert
from tests.fakes.notify_store import FakeOutbox, FakeUnitOfWork, MemoryNotifyDatabase
from tests.unit.test_notify_service import POLICY, T0, World


class Broken(Exception):
    pass


class BrokenOutbox(FakeOutbox):
    """Fails after the escalation's new state was saved in the same unit of work."""

    async def add_effects(self, changes: Any, *, at: Any) -> None:
        raise Broken("the outbox write failed")


async def test_an_alert_opens_in_one_committed_unit_of_work_and_pages_tier_one() -> None:
    world = World()

    escalation_id = await world.start()

    escalation = world.store.escalations[escalation_id]
    assert escalation.state.status is EscalationStatus.OPEN
    assert escalation.state.paged == ("person:fellow", "person:nurse")
    assert escalation.timeline[0].kind == "opened"
    assert sorted(world.addresses()) == ["+15550001", "fellow@h.test"]
    # One commit opens the escalation with its pages, the next records the first attempts'
    # outcomes (two units of work, as on PostgreSQL); nothing was rolled back.
    assert (world.store.commits, world.store.rollbacks) == (2, 0)
    # The opening does not wait for the disk (its pages go out at once); the outcomes' commit
    # does, before handle_alert returns, which makes the opening durable too.
    assert world.store.durable == [False, True]


async def test_tick_escalates_to_tier_two_when_nobody_acknowledged() -> None:
    world = World()
    escalation_id = await world.start()

    await world.next_step(299)
    assert "attending@h.test" not in world.addresses()
    await world.next_step(1)

    assert world.addresses()[-1] == "attending@h.test"
    state = world.store.escalations[escalation_id].state
    assert "person:attending" in state.paged
    assert state.status is EscalationStatus.OPEN and state.due_at == T0 + timedelta(seconds=900)


async def test_an_acknowledgement_stops_the_chain_and_is_audited_with_it() -> None:
    world = World()
    escalation_id = await world.start()
    paged = world.addresses()

    result = await world.service.acknowledge(escalation_id, by="person:nurse", via="sms")

    assert result.outcome.value == "acknowledged"
    assert world.store.audit == [("person:nurse", "sms", "P-1:FEVER")]
    await world.next_step(300)
    await world.next_step(600)
    assert world.addresses() == paged
    assert world.store.escalations[escalation_id].state.status is EscalationStatus.ACKNOWLEDGED


async def test_the_all_clear_goes_only_to_those_paged() -> None:
    world = World()
    escalation_id = await world.start()

    world.clock.advance(60)
    await world.end()

    cleared = {
        p.recipient.ref
        for p in world.store.pages_of(escalation_id)
        if p.purpose is PagePurpose.ALL_CLEAR
    }
    assert cleared == {"person:nurse", "person:fellow"}
    assert world.store.escalations[escalation_id].state.status is EscalationStatus.RESOLVED


async def test_a_block_left_without_commit_leaves_nothing_behind() -> None:
    store = MemoryNotifyDatabase()
    store.add_person("nurse", ("email", "nurse@h.test"))
    store.add_person("fellow", ("email", "fellow@h.test"))
    alert = make_alert(patient_id="P-1", at=T0)
    transition = advance(POLICY, opened(T0), Tick(now=T0))

    async def open_escalation(uow: FakeUnitOfWork) -> None:
        escalation_id = await uow.escalations.add(
            alert, care_team_id="onc", snapshot=POLICY, state=transition.state, at=T0
        )
        assert escalation_id is not None
        await uow.outbox.add_opened(
            alert,
            escalation_id,
            care_team_id="onc",
            snapshot=POLICY,
            transition=transition,
            at=T0,
            claim_until=T0 + timedelta(seconds=60),
        )

    async with store.unit_of_work() as uow:
        await open_escalation(uow)
        assert store.escalations and store.pages  # written, inside the block
    assert store.escalations == {} and store.pages == []
    assert store.rollbacks == 1

    # Positive control: the same block committed keeps the escalation and its pages.
    async with store.unit_of_work() as uow:
        await open_escalation(uow)
        await uow.commit()
    assert len(store.escalations) == 1
    assert sorted(p.address for p in store.pages) == ["fellow@h.test", "nurse@h.test"]


async def test_an_acknowledgement_that_fails_midway_changes_nothing() -> None:
    """The new state is saved, then the outbox write fails: the unit of work is not committed,
    so the escalation is still open, unaudited, and the next step still falls due."""
    world = World()
    escalation_id = await world.start()
    store = world.store

    def broken(*, transaction: bool = True) -> FakeUnitOfWork:
        uow = FakeUnitOfWork(store, transaction=transaction)
        uow.outbox = BrokenOutbox(store)
        return uow

    store.unit_of_work = broken  # type: ignore[method-assign]
    with pytest.raises(Broken):
        await world.service.acknowledge(escalation_id, by="person:nurse", via="api")
    assert store.escalations[escalation_id].state.status is EscalationStatus.OPEN
    assert store.audit == []

    # Positive control: with the outbox working again, the same acknowledgement commits.
    del store.unit_of_work
    result = await world.service.acknowledge(escalation_id, by="person:nurse", via="api")
    assert result.outcome.value == "acknowledged"
    assert store.escalations[escalation_id].state.status is EscalationStatus.ACKNOWLEDGED
    assert store.audit == [("person:nurse", "api", "P-1:FEVER")]
