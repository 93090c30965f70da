"""Cover agreements under two sign-offs, one from each side (docs/regional-cover.md).

A manager (a role that may manage a team) of the covering or the covered team proposes an
agreement or a change to one: a pending version. It is in force only once a manager of the
*other* team approves it, never the proposer; either side may reject (the proposer's own
rejection is a withdrawal), and a newer proposal withdraws the pending one. A manager of either
side may revoke an agreement at once, without a second sign-off: ending cover can only hand the
patients back to their own team. Every step is audited (``cover.*``), subject
``cover_agreement:<id>``. The covering and covered teams of an agreement never change.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from services.notify.public import Agreement, CoverHours, NightToTell, Revocation, nights_to_tell

Decision = Literal["approved", "rejected", "withdrawn"]


@dataclass(frozen=True, slots=True)
class Version:
    agreement_id: uuid.UUID
    version: int
    covering_team_id: str
    covered_team_id: str
    hours: CoverHours
    proposed_by: str
    proposed_side: str
    proposed_at: datetime
    revoked: bool = False
    reason: str | None = None
    decision: Decision | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None

    @property
    def status(self) -> str:
        return self.decision or "pending"

    def agreement(self) -> Agreement:
        assert self.decided_at is not None
        return Agreement(
            str(self.agreement_id),
            self.version,
            self.covering_team_id,
            self.covered_team_id,
            self.hours,
            self.decided_at,
            self.revoked,
        )


def in_force(versions: list[Version]) -> Version | None:
    """The newest approved version of one agreement's versions (revoked or not)."""
    approved = [v for v in versions if v.decision == "approved"]
    return max(approved, key=lambda v: v.version) if approved else None


def revocation_of(versions: Iterable[Version]) -> Revocation | None:
    """The agreement's revocation, as its revoked version records it (when, by whom of which
    side, why); None while it is not revoked."""
    for version in versions:
        if version.revoked and version.decision == "approved" and version.decided_at:
            return Revocation(
                version.decided_at, version.decided_by, version.proposed_side, version.reason
            )
    return None


# How far back the morning summary looks for a window of cover.
SUMMARY_LOOKBACK = timedelta(days=8)


def night_to_summarise(
    versions: Iterable[Version], at: datetime
) -> tuple[Version, NightToTell] | None:
    """The night the covered team's morning summary tells of at ``at``, from the versions of
    the agreements covering it: the latest window that had ended by ``at`` within the eight
    days before it, or that a revocation had cut short by then (ending at the revocation), as
    notify's ``nights_to_tell`` names the windows it e-mails; with the version in force when
    it ended (a version signed off during a window counts for it; for a window cut short, the
    version the revocation revoked)."""
    by_id: dict[uuid.UUID, list[Version]] = {}
    for version in versions:
        by_id.setdefault(version.agreement_id, []).append(version)
    latest: tuple[Version, NightToTell] | None = None
    for of_one in by_id.values():
        signed = [v for v in of_one if v.decision == "approved" and v.decided_at is not None]
        revocation = revocation_of(signed)
        for candidate in signed:
            if candidate.revoked or candidate.decided_at is None:
                continue
            for night in nights_to_tell(
                candidate.hours, candidate.decided_at, at, at - SUMMARY_LOOKBACK, revocation
            ):
                # Told by the version in force when the window ended, not by one a newer
                # version had replaced by then (a revocation is never signed off before the
                # end of a window it tells of: that window ends at it).
                then = [v for v in signed if v.decided_at and v.decided_at < night.ends]
                if max(then, key=lambda v: v.version) is not candidate:
                    continue
                if latest is None or night.ends > latest[1].ends:
                    latest = (candidate, night)
    return latest


class Audit(Protocol):
    async def record(
        self, actor: str, action: str, subject: str, details: dict[str, Any]
    ) -> None: ...


class CoverStore(Protocol):
    async def versions(self, agreement_id: uuid.UUID) -> list[Version]: ...
    async def add(self, version: Version) -> bool:
        """Insert; False when the version number or the agreement's pending slot is taken."""
        ...

    async def decide(self, version: Version) -> bool:
        """Record the decision of a pending version; False when it was no longer pending."""
        ...


@dataclass(frozen=True, slots=True)
class Manager:
    user_id: str
    username: str
    care_teams: frozenset[str]


class CoverRefused(Exception):
    """A step that cannot be taken; ``status`` is the HTTP answer it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _subject(agreement_id: uuid.UUID) -> str:
    return f"cover_agreement:{agreement_id}"


def _terms(version: Version) -> dict[str, Any]:
    hours = version.hours
    return {
        "covering_team_id": version.covering_team_id,
        "covered_team_id": version.covered_team_id,
        "timezone": hours.timezone,
        "days": sorted(hours.days),
        "starts": hours.starts.isoformat(),
        "ends": hours.ends.isoformat(),
        "exceptions": sorted(d.isoformat() for d in hours.exceptions),
    }


class CoverAgreements:
    def __init__(self, store: CoverStore, audit: Audit, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock

    async def versions_seen_by(self, by: Manager, agreement_id: uuid.UUID) -> list[Version]:
        """The agreement's versions, if one of its teams is the caller's (404 otherwise)."""
        versions = await self._store.versions(agreement_id)
        if (
            not versions
            or not {
                versions[0].covering_team_id,
                versions[0].covered_team_id,
            }
            & by.care_teams
        ):
            raise CoverRefused(404, "no such cover agreement")
        return versions

    async def propose(
        self,
        by: Manager,
        covering_team_id: str,
        covered_team_id: str,
        hours: CoverHours,
        reason: str | None,
        agreement_id: uuid.UUID | None = None,
    ) -> Version:
        """A new agreement (``agreement_id`` None) or a change to one, pending the other side."""
        now = self._clock()
        if covering_team_id == covered_team_id:
            raise CoverRefused(422, "a team cannot cover itself")
        side = (
            covering_team_id
            if covering_team_id in by.care_teams
            else covered_team_id
            if covered_team_id in by.care_teams
            else None
        )
        if side is None:
            raise CoverRefused(404, "neither team is one of the caller's")
        number = 1
        if agreement_id is None:
            agreement_id = uuid.uuid4()
        else:
            versions = await self.versions_seen_by(by, agreement_id)
            first = versions[0]
            if (first.covering_team_id, first.covered_team_id) != (
                covering_team_id,
                covered_team_id,
            ):
                raise CoverRefused(409, "an agreement's teams never change: propose a new one")
            current = in_force(versions)
            if current is not None and current.revoked:
                raise CoverRefused(409, "the agreement was revoked: propose a new one")
            number = max(v.version for v in versions) + 1
            for earlier in versions:
                if earlier.decision is None:
                    await self._decide(by, earlier, "withdrawn", superseded=True)
        version = Version(
            agreement_id=agreement_id,
            version=number,
            covering_team_id=covering_team_id,
            covered_team_id=covered_team_id,
            hours=hours,
            proposed_by=by.username,
            proposed_side=side,
            proposed_at=now,
            reason=reason,
        )
        if not await self._store.add(version):
            raise CoverRefused(409, "another proposal was made meanwhile")
        await self._audit.record(
            by.user_id,
            "cover.proposed",
            _subject(agreement_id),
            {"version": number, "side": side, "reason": reason, **_terms(version)},
        )
        return version

    async def _pending(self, by: Manager, agreement_id: uuid.UUID, number: int) -> Version:
        versions = await self.versions_seen_by(by, agreement_id)
        found = [v for v in versions if v.version == number]
        if not found:
            raise CoverRefused(404, "no such version")
        if found[0].decision is not None:
            raise CoverRefused(409, f"version already {found[0].decision}")
        return found[0]

    async def _decide(
        self, by: Manager, version: Version, decision: Decision, **details: Any
    ) -> Version:
        decided = replace(
            version, decision=decision, decided_by=by.username, decided_at=self._clock()
        )
        if not await self._store.decide(decided):
            raise CoverRefused(409, "version decided meanwhile")
        await self._audit.record(
            by.user_id,
            f"cover.{decision}",
            _subject(version.agreement_id),
            {"version": version.version, **details},
        )
        return decided

    async def approve(self, by: Manager, agreement_id: uuid.UUID, number: int) -> Version:
        pending = await self._pending(by, agreement_id, number)
        if by.username == pending.proposed_by:
            raise CoverRefused(403, "cover needs the other team's sign-off, not the proposer's")
        other = (
            pending.covered_team_id
            if pending.proposed_side == pending.covering_team_id
            else pending.covering_team_id
        )
        if other not in by.care_teams:
            raise CoverRefused(403, f"a manager of {other} signs this off")
        return await self._decide(
            by,
            pending,
            "approved",
            proposed_by=pending.proposed_by,
            signed_off_for=other,
            **_terms(pending),
        )

    async def reject(self, by: Manager, agreement_id: uuid.UUID, number: int) -> Version:
        pending = await self._pending(by, agreement_id, number)
        decision: Decision = "withdrawn" if by.username == pending.proposed_by else "rejected"
        return await self._decide(by, pending, decision)

    async def revoke(self, by: Manager, agreement_id: uuid.UUID, reason: str | None) -> Version:
        versions = await self.versions_seen_by(by, agreement_id)
        current = in_force(versions)
        if current is None:
            raise CoverRefused(409, "the agreement was never in force")
        if current.revoked:
            raise CoverRefused(409, "the agreement is already revoked")
        for pending in versions:
            if pending.decision is None:
                await self._decide(by, pending, "withdrawn", superseded=True)
        now = self._clock()
        side = (
            current.covering_team_id
            if current.covering_team_id in by.care_teams
            else current.covered_team_id
        )
        revoked = replace(
            current,
            version=max(v.version for v in versions) + 1,
            revoked=True,
            reason=reason,
            proposed_by=by.username,
            proposed_side=side,
            proposed_at=now,
            decision="approved",
            decided_by=by.username,
            decided_at=now,
        )
        if not await self._store.add(revoked):
            raise CoverRefused(409, "another change was made meanwhile")
        await self._audit.record(
            by.user_id,
            "cover.revoked",
            _subject(agreement_id),
            {"version": revoked.version, "side": side, "reason": reason},
        )
        return revoked
