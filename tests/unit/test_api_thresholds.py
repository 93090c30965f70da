"""Threshold changes under two sign-offs, through an in-memory store."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.api.service_layer.sign_off import Person, ProposalRefused
from services.api.service_layer.thresholds import (
    Approval,
    Proposal,
    Scope,
    ThresholdChanges,
    check_overrides,
)
from tests.fakes.sign_off import MemoryAudit as Audit
from tests.fakes.sign_off import MemoryProposals

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
ANNA = Person("u-anna", "anna")
BEN = Person("u-ben", "ben")


class FakeStore(MemoryProposals[Proposal]):
    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[tuple[str, str], list[dict[str, Any]]] = {}

    async def newest_version(self, scope: Scope, subject_id: str) -> int:
        return len(self.versions.get((scope, subject_id), []))

    async def pending_for(self, scope: Scope, subject_id: str) -> Proposal | None:
        return next(
            (
                p
                for p in self.proposals.values()
                if (p.scope, p.subject_id) == (scope, subject_id) and p.decision is None
            ),
            None,
        )

    async def add(self, proposal: Proposal) -> None:
        assert await self.pending_for(proposal.scope, proposal.subject_id) is None
        await super().add(proposal)

    async def approve(self, approved: Proposal) -> Approval:
        versions = self.versions.setdefault((approved.scope, approved.subject_id), [])
        if self.proposals[approved.proposal_id].decision is not None:
            return Approval("not_pending", len(versions), {})
        if len(versions) != approved.based_on:
            return Approval("stale", len(versions), {})
        old = versions[-1]["overrides"] if versions else {}
        versions.append({"overrides": approved.overrides, "signed_off_by": approved.decided_by})
        self.proposals[approved.proposal_id] = replace(approved, version=len(versions))
        return Approval("approved", len(versions), old)


@pytest.fixture
def world() -> tuple[ThresholdChanges, FakeStore, Audit]:
    store, audit = FakeStore(), Audit()
    clock = iter(T0 + timedelta(minutes=n) for n in range(1000))
    return ThresholdChanges(store, audit, lambda: next(clock), check_overrides), store, audit


async def test_a_change_takes_effect_only_with_a_second_persons_approval(
    world: tuple[ThresholdChanges, FakeStore, Audit],
) -> None:
    changes, store, audit = world
    proposal = await changes.propose(ANNA, "care_team", "t1", "t1", {"fever_single_c": 38.5}, "x")
    assert proposal.status == "pending" and proposal.based_on == 0
    assert await store.newest_version("care_team", "t1") == 0  # nothing in effect yet
    with pytest.raises(ProposalRefused) as refused:
        await changes.approve(ANNA, proposal)  # the proposer alone: no
    assert refused.value.status == 403
    assert await store.newest_version("care_team", "t1") == 0
    approved = await changes.approve(BEN, proposal)
    assert approved.status == "approved" and approved.version == 1
    assert store.versions[("care_team", "t1")][0]["signed_off_by"] == "ben"
    changed = [e for e in audit.entries if e[1] == "thresholds.changed"]
    assert changed == [
        (
            "u-ben",
            "thresholds.changed",
            "care_team:t1",
            {
                "old": {},
                "new": {"fever_single_c": 38.5},
                "version": 1,
                "reason": "x",
                "proposed_by": "anna",
                "proposal": str(proposal.proposal_id),
            },
        )
    ]
    with pytest.raises(ProposalRefused) as again:
        await changes.approve(BEN, store.proposals[proposal.proposal_id])
    assert again.value.status == 409


async def test_a_proposal_overtaken_by_another_version_is_refused(
    world: tuple[ThresholdChanges, FakeStore, Audit],
) -> None:
    changes, store, _ = world
    first = await changes.propose(ANNA, "patient", "p1", "t1", {"fever_single_c": 38.1}, None)
    # Another version lands meanwhile (e.g. written on another path): the proposal was made on
    # version 0 and must be made again on version 1.
    store.versions[("patient", "p1")] = [{"overrides": {}, "signed_off_by": "x"}]
    with pytest.raises(ProposalRefused) as refused:
        await changes.approve(BEN, first)
    assert refused.value.status == 409 and "propose again" in str(refused.value)


async def test_a_newer_proposal_withdraws_the_pending_one(
    world: tuple[ThresholdChanges, FakeStore, Audit],
) -> None:
    changes, store, audit = world
    first = await changes.propose(ANNA, "care_team", "t1", "t1", {"fever_single_c": 38.5}, None)
    second = await changes.propose(BEN, "care_team", "t1", "t1", {"fever_single_c": 38.4}, None)
    assert store.proposals[first.proposal_id].status == "withdrawn"
    assert store.proposals[second.proposal_id].status == "pending"
    assert ("u-ben", "thresholds.withdrawn") in [e[:2] for e in audit.entries]


async def test_reject_and_withdraw(world: tuple[ThresholdChanges, FakeStore, Audit]) -> None:
    changes, store, _ = world
    proposal = await changes.propose(ANNA, "care_team", "t1", "t1", {}, None)
    assert (await changes.reject(BEN, proposal)).status == "rejected"
    proposal = await changes.propose(ANNA, "care_team", "t1", "t1", {}, None)
    assert (await changes.reject(ANNA, proposal)).status == "withdrawn"
    assert await store.newest_version("care_team", "t1") == 0


@pytest.mark.parametrize(
    ("overrides", "accepted"),
    [
        ({"fever_single_c": 38.5}, True),
        ({"fever_single_c": 43.0, "fever_critical_c": 43.0}, True),  # the edge: still pages
        ({"fever_single_c": 44.0, "fever_critical_c": 44.5}, False),  # can never page
        ({"fever_single_c": 37.0}, False),  # below the sustained level: incoherent
        ({"fever_c": 1}, False),  # unknown name
    ],
)
async def test_proposals_are_checked_before_anything_is_written(
    world: tuple[ThresholdChanges, FakeStore, Audit], overrides: dict[str, Any], accepted: bool
) -> None:
    changes, store, _ = world
    if accepted:
        await changes.propose(ANNA, "care_team", "t1", "t1", overrides, None)
        assert len(store.proposals) == 1
    else:
        with pytest.raises(ValueError):
            await changes.propose(ANNA, "care_team", "t1", "t1", overrides, None)
        assert store.proposals == {}
