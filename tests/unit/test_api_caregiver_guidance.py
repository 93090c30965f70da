"""Guidance for families under two sign-offs (services/api/service_layer/caregiver_guidance.py),
over an in-memory store: proposed, approved by a second person as the next version, refused to
the proposer, stale or decided proposals refused, a newer proposal withdraws the pending one."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.api.service_layer.caregiver_guidance import (
    GuidanceApproval,
    GuidanceChanges,
    GuidanceProposal,
    InvalidGuidance,
    check_guidance,
)
from services.api.service_layer.sign_off import Person, ProposalRefused
from tests.fakes.sign_off import MemoryAudit as Audit
from tests.fakes.sign_off import MemoryProposals

NOW = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
ANA = Person("u-ana", "ana")
BO = Person("u-bo", "bo")


class MemoryStore(MemoryProposals[GuidanceProposal]):
    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[tuple[str, str, str], list[tuple[int, str, str]]] = {}

    async def newest_version(self, team: str, alarm: str, language: str) -> int:
        return len(self.versions.get((team, alarm, language), []))

    async def pending_for(self, team: str, alarm: str, language: str) -> GuidanceProposal | None:
        for p in self.proposals.values():
            if (p.care_team_id, p.alarm, p.language) == (team, alarm, language) and not p.decision:
                return p
        return None

    async def approve(self, approved: GuidanceProposal) -> GuidanceApproval:
        key = (approved.care_team_id, approved.alarm, approved.language)
        versions = self.versions.setdefault(key, [])
        if self.proposals[approved.proposal_id].decision is not None:
            return GuidanceApproval("not_pending", len(versions), None)
        if len(versions) != approved.based_on:
            return GuidanceApproval("stale", len(versions), None)
        old = versions[-1][1] if versions else None
        versions.append((len(versions) + 1, approved.text, str(approved.decided_by)))
        self.proposals[approved.proposal_id] = replace(approved, version=len(versions))
        return GuidanceApproval("approved", len(versions), old)


@pytest.fixture
def rig() -> tuple[GuidanceChanges, MemoryStore, Audit]:
    store, audit = MemoryStore(), Audit()
    return GuidanceChanges(store, audit, lambda: NOW), store, audit


async def test_second_person_signs_off_the_next_version(
    rig: tuple[GuidanceChanges, MemoryStore, Audit],
) -> None:
    changes, store, audit = rig
    proposal = await changes.propose(ANA, "T", "pump_alarm", "en", "  Check the line   for kinks. ")
    assert proposal.text == "Check the line for kinks." and proposal.based_on == 0
    with pytest.raises(ProposalRefused) as refused:
        await changes.approve(ANA, proposal)
    assert refused.value.status == 403
    approved = await changes.approve(BO, proposal)
    assert approved.version == 1 and approved.decided_by == "bo"
    assert store.versions[("T", "pump_alarm", "en")] == [(1, "Check the line for kinks.", "bo")]
    assert [e[1] for e in audit.entries] == [
        "caregiver_guidance.proposed",
        "caregiver_guidance.changed",
    ]
    changed = audit.entries[-1][3]
    assert changed["proposed_by"] == "ana" and changed["old"] is None and changed["version"] == 1
    with pytest.raises(ProposalRefused) as again:
        await changes.approve(BO, approved)
    assert again.value.status == 409


async def test_stale_and_superseded_proposals(
    rig: tuple[GuidanceChanges, MemoryStore, Audit],
) -> None:
    changes, store, _ = rig
    first = await changes.propose(ANA, "T", "fever", "fr", "Mesurez à nouveau dans 15 minutes.")
    second = await changes.propose(BO, "T", "fever", "fr", "Donnez à boire.")
    assert store.proposals[first.proposal_id].decision == "withdrawn"
    assert (await changes.approve(ANA, second)).version == 1
    # A proposal made on version 0 after version 1 was written is stale.
    late = replace(await changes.propose(ANA, "T", "fever", "fr", "Appelez-nous."), based_on=0)
    store.proposals[late.proposal_id] = late
    with pytest.raises(ProposalRefused) as stale:
        await changes.approve(BO, late)
    assert stale.value.status == 409 and "version 1 was written" in str(stale.value)


async def test_reject_and_withdraw(rig: tuple[GuidanceChanges, MemoryStore, Audit]) -> None:
    changes, _, _ = rig
    proposal = await changes.propose(ANA, "T", "data_lost", "es", "Compruebe el aparato.")
    assert (await changes.reject(BO, proposal)).decision == "rejected"
    own = await changes.propose(ANA, "T", "data_lost", "es", "Compruebe el aparato.")
    assert (await changes.reject(ANA, own)).decision == "withdrawn"


@pytest.mark.parametrize(
    ("alarm", "language", "text", "field"),
    [
        ("Pump Alarm", "en", "x", "alarm"),
        ("pump_alarm", "de", "x", "language"),
        ("pump_alarm", "en", "   ", "text"),
        ("pump_alarm", "en", "x" * 201, "text"),
    ],
)
def test_invalid_guidance(alarm: str, language: str, text: str, field: str) -> None:
    with pytest.raises(InvalidGuidance) as error:
        check_guidance(alarm, language, text)
    assert error.value.field == field


def test_alert_codes_are_accepted_as_alarms() -> None:
    assert check_guidance("pump_occlusion_downstream", "en", "Call us.") == "Call us."
