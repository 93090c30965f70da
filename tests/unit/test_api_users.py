"""The logins' use cases (``services.api.service_layer.users``) over an in-memory store: a new
login gets a generated password that only its hash is stored for; the refusals; deactivation
ends the sessions once and is idempotent; a reset ends them too and is refused for a
deactivated login; an actor with care teams sees and changes only users of those teams."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.api.domain.access import Role
from services.api.service_layer.enrolment import Actor, Conflict, Invalid, NotFound
from services.api.service_layer.users import NewUser, UserRecord, UserService

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
OPERATOR = Actor("operator:ops", None)


class MemoryUsers:
    def __init__(self, teams: set[str]) -> None:
        self.teams = teams
        self.rows: dict[str, UserRecord] = {}
        self.hashes: dict[str, str] = {}
        self.audit: list[tuple[str, str, str]] = []

    async def users(self) -> list[UserRecord]:
        return sorted(self.rows.values(), key=lambda u: u.username)

    async def user(self, username: str) -> UserRecord | None:
        return self.rows.get(username)

    async def unknown_teams(self, care_teams: Sequence[str]) -> list[str]:
        return [t for t in care_teams if t not in self.teams]

    async def add(
        self, actor: str, user_id: str, new: NewUser, display_name: str, password_hash: str
    ) -> UserRecord | None:
        if new.username in self.rows:
            return None
        user = UserRecord(user_id, new.username, display_name, new.role, True, new.care_teams, T0)
        self.rows[new.username] = user
        self.hashes[new.username] = password_hash
        self.audit.append((actor, "user.created", new.username))
        return user

    async def deactivate(self, actor: str, username: str, at: datetime) -> UserRecord:
        user = self.rows[username] = replace(
            self.rows[username], active=False, sessions_revoked_at=at
        )
        self.audit.append((actor, "user.deactivated", username))
        return user

    async def set_password(
        self, actor: str, username: str, password_hash: str, at: datetime
    ) -> UserRecord:
        self.hashes[username] = password_hash
        user = self.rows[username] = replace(self.rows[username], sessions_revoked_at=at)
        self.audit.append((actor, "user.password_reset", username))
        return user


def service(store: MemoryUsers) -> UserService:
    passwords = iter(["first-password-0123", "second-password-0123"])
    return UserService(store, lambda p: f"hash({p})", lambda: T0, passwords=lambda: next(passwords))


async def test_a_new_login_gets_a_password_shown_once_and_stored_hashed() -> None:
    store = MemoryUsers({"onc"})
    done = await service(store).add(
        OPERATOR, NewUser(" j.moreau ", Role.CHARGE_NURSE, ("onc", "onc"), None)
    )
    assert done.password == "first-password-0123"
    assert store.hashes["j.moreau"] == "hash(first-password-0123)"
    assert (done.user.display_name, done.user.care_teams) == ("j.moreau", ("onc",))
    assert store.audit == [("operator:ops", "user.created", "j.moreau")]


@pytest.mark.parametrize(
    ("new", "error"),
    [
        (NewUser("x", Role.CLINICIAN, ("onc",)), Invalid),
        (NewUser("has space", Role.CLINICIAN, ("onc",)), Invalid),
        (NewUser("ok.name", Role.CLINICIAN, ()), Invalid),
        (NewUser("ok.name", Role.CLINICIAN, ("nope",)), NotFound),
    ],
)
async def test_refusals_of_a_new_login(new: NewUser, error: type[Exception]) -> None:
    store = MemoryUsers({"onc"})
    with pytest.raises(error):
        await service(store).add(OPERATOR, new)
    assert store.rows == {} and store.audit == []


async def test_a_taken_username_is_a_conflict() -> None:
    store = MemoryUsers({"onc"})
    users = service(store)
    await users.add(OPERATOR, NewUser("j.moreau", Role.CLINICIAN, ("onc",)))
    with pytest.raises(Conflict):
        await users.add(OPERATOR, NewUser("j.moreau", Role.ADMIN, ("onc",)))


async def test_deactivation_ends_the_sessions_once_and_a_reset_is_then_refused() -> None:
    store = MemoryUsers({"onc"})
    users = service(store)
    await users.add(OPERATOR, NewUser("j.moreau", Role.CLINICIAN, ("onc",)))

    reset = await users.reset_password(OPERATOR, "j.moreau")
    assert reset.password == "second-password-0123"
    assert reset.user.sessions_revoked_at == T0
    user, changed = await users.deactivate(OPERATOR, "j.moreau")
    assert (user.active, user.sessions_revoked_at, changed) == (False, T0, True)
    again, changed = await users.deactivate(OPERATOR, "j.moreau")
    assert changed is False and not again.active
    with pytest.raises(Conflict):
        await users.reset_password(OPERATOR, "j.moreau")
    assert [a for _, a, _ in store.audit] == [
        "user.created",
        "user.password_reset",
        "user.deactivated",
    ]
    assert await users.list(OPERATOR) == []
    assert [u.username for u in await users.list(OPERATOR, include_inactive=True)] == ["j.moreau"]


async def test_an_actor_with_care_teams_sees_only_users_of_those_teams() -> None:
    store = MemoryUsers({"onc", "haem"})
    users = service(store)
    await users.add(OPERATOR, NewUser("both.teams", Role.CLINICIAN, ("onc", "haem")))
    nurse = Actor("u-1", frozenset({"onc"}))
    assert await users.list(nurse) == []
    with pytest.raises(NotFound):
        await users.deactivate(nurse, "both.teams")
    with pytest.raises(NotFound):
        await users.add(nurse, NewUser("new.one", Role.CLINICIAN, ("haem",)))
