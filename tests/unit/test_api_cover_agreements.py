"""Cover agreements' sign-off (services/api/service_layer/cover.py) over an in-memory store: the
other team signs off, never the proposer; a change is the next version; a newer proposal
withdraws the pending one; revocation by either side is at once; every step audited."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, time
from typing import Any

import pytest

from services.api.service_layer.cover import (
    CoverAgreements,
    CoverRefused,
    Manager,
    Version,
    in_force,
)
from services.notify.public import CoverHours

NIGHTS = CoverHours("Europe/Paris", frozenset(range(7)), time(20), time(8))
BIG = Manager("u-big", "big-nurse", frozenset({"big"}))
BIG2 = Manager("u-big2", "big-nurse-2", frozenset({"big"}))
SMALL = Manager("u-small", "small-nurse", frozenset({"small"}))
STRANGER = Manager("u-other", "other-nurse", frozenset({"other"}))


class MemoryStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[uuid.UUID, int], Version] = {}

    async def versions(self, agreement_id: uuid.UUID) -> list[Version]:
        return sorted(
            (v for (a, _), v in self.rows.items() if a == agreement_id), key=lambda v: v.version
        )

    async def add(self, version: Version) -> bool:
        key = (version.agreement_id, version.version)
        pending = any(
            v.decision is None and v.agreement_id == version.agreement_id
            for v in self.rows.values()
        )
        if key in self.rows or (version.decision is None and pending):
            return False
        self.rows[key] = version
        return True

    async def decide(self, version: Version) -> bool:
        key = (version.agreement_id, version.version)
        if self.rows[key].decision is not None:
            return False
        self.rows[key] = version
        return True


class Audit:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, dict[str, Any]]] = []

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        self.entries.append((actor, action, subject, details))


@pytest.fixture
def service() -> tuple[CoverAgreements, MemoryStore, Audit]:
    store, audit = MemoryStore(), Audit()
    return CoverAgreements(store, audit, lambda: datetime(2026, 12, 7, 9, tzinfo=UTC)), store, audit


async def test_the_other_team_signs_off(
    service: tuple[CoverAgreements, MemoryStore, Audit],
) -> None:
    cover, store, audit = service
    proposed = await cover.propose(BIG, "big", "small", NIGHTS, "nights")
    assert proposed.status == "pending" and proposed.proposed_side == "big"
    for who in (BIG, BIG2, STRANGER):
        with pytest.raises(CoverRefused) as refused:
            await cover.approve(who, proposed.agreement_id, 1)
        assert refused.value.status in (403, 404)
    approved = await cover.approve(SMALL, proposed.agreement_id, 1)
    assert approved.decision == "approved" and approved.decided_by == "small-nurse"
    current = in_force(await store.versions(proposed.agreement_id))
    assert current is not None and current.version == 1
    assert current.agreement().covering_team_id == "big"
    with pytest.raises(CoverRefused) as again:
        await cover.approve(SMALL, proposed.agreement_id, 1)
    assert again.value.status == 409
    assert [e[1] for e in audit.entries] == ["cover.proposed", "cover.approved"]
    assert audit.entries[1][3]["proposed_by"] == "big-nurse"
    assert audit.entries[1][3]["signed_off_for"] == "small"


async def test_a_proposal_by_neither_side_or_for_itself_is_refused(
    service: tuple[CoverAgreements, MemoryStore, Audit],
) -> None:
    cover, _, _ = service
    with pytest.raises(CoverRefused) as neither:
        await cover.propose(STRANGER, "big", "small", NIGHTS, None)
    assert neither.value.status == 404
    with pytest.raises(CoverRefused) as itself:
        await cover.propose(BIG, "big", "big", NIGHTS, None)
    assert itself.value.status == 422


async def test_a_change_is_the_next_version_and_withdraws_the_pending_one(
    service: tuple[CoverAgreements, MemoryStore, Audit],
) -> None:
    cover, store, audit = service
    first = await cover.propose(SMALL, "big", "small", NIGHTS, None)
    await cover.approve(BIG, first.agreement_id, 1)
    later = replace(NIGHTS, starts=time(22))
    second = await cover.propose(SMALL, "big", "small", later, None, first.agreement_id)
    third = await cover.propose(BIG, "big", "small", later, None, first.agreement_id)
    versions = await store.versions(first.agreement_id)
    assert [(v.version, v.status) for v in versions] == [
        (1, "approved"),
        (2, "withdrawn"),
        (3, "pending"),
    ]
    assert second.version == 2 and third.version == 3
    current = in_force(versions)
    assert current is not None and current.version == 1  # still the first until signed off
    with pytest.raises(CoverRefused) as teams:
        await cover.propose(BIG, "big", "other", NIGHTS, None, first.agreement_id)
    assert teams.value.status == 409
    rejected = await cover.reject(SMALL, first.agreement_id, 3)
    assert rejected.decision == "rejected"
    assert "cover.withdrawn" in [e[1] for e in audit.entries]


async def test_revocation_is_at_once_by_either_side_and_final(
    service: tuple[CoverAgreements, MemoryStore, Audit],
) -> None:
    cover, store, audit = service
    first = await cover.propose(BIG, "big", "small", NIGHTS, None)
    with pytest.raises(CoverRefused) as never:
        await cover.revoke(SMALL, first.agreement_id, None)
    assert never.value.status == 409
    await cover.approve(SMALL, first.agreement_id, 1)
    await cover.propose(BIG, "big", "small", NIGHTS, None, first.agreement_id)
    revoked = await cover.revoke(SMALL, first.agreement_id, "staffed now")
    assert revoked.revoked and revoked.version == 3 and revoked.decided_by == "small-nurse"
    versions = await store.versions(first.agreement_id)
    assert [v.status for v in versions] == ["approved", "withdrawn", "approved"]
    current = in_force(versions)
    assert current is not None and current.revoked
    with pytest.raises(CoverRefused) as after:
        await cover.propose(BIG, "big", "small", NIGHTS, None, first.agreement_id)
    assert after.value.status == 409
    with pytest.raises(CoverRefused):
        await cover.revoke(BIG, first.agreement_id, None)
    assert audit.entries[-1][1] == "cover.revoked"
    assert audit.entries[-1][3]["reason"] == "staffed now"
