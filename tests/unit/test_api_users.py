"""The logins' use cases (``services.api.service_layer.users``) over an in-memory store: a new
login gets a generated password that only its hash is stored for; the refusals; deactivation
ends the sessions once and is idempotent; a reset ends them too and is refused for a
deactivated login; an actor with care teams sees and changes only users of those teams; a role
or care-team change; a caller of the API (``as_role``) within the roles theirs may grant, never
changing themselves and never leaving a team without an active admin."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from services.api.domain.access import Role
from services.api.service_layer.enrolment import Actor, Conflict, Invalid, NotFound
from services.api.service_layer.users import Forbidden, NewUser, UserRecord, UserService

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

    async def set_role(self, actor: str, username: str, role: Role) -> UserRecord:
        user = self.rows[username] = replace(self.rows[username], role=role)
        self.audit.append((actor, "user.role_changed", username))
        return user

    async def set_care_teams(
        self, actor: str, username: str, care_teams: Sequence[str]
    ) -> UserRecord:
        user = self.rows[username] = replace(
            self.rows[username], care_teams=tuple(sorted(care_teams))
        )
        self.audit.append((actor, "user.care_teams_changed", username))
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


async def _team(store: MemoryUsers, *users: tuple[str, Role, tuple[str, ...]]) -> UserService:
    service_ = UserService(store, lambda p: f"hash({p})", lambda: T0, passwords=lambda: "pw")
    for username, role, teams in users:
        await service_.add(OPERATOR, NewUser(username, role, teams))
    return service_


async def test_role_and_care_team_changes_are_audited_and_idempotent() -> None:
    store = MemoryUsers({"onc", "haem"})
    users = await _team(store, ("j.moreau", Role.CLINICIAN, ("onc",)))
    user, changed = await users.set_role(OPERATOR, "j.moreau", Role.CHARGE_NURSE)
    assert (user.role, changed) == (Role.CHARGE_NURSE, True)
    _, changed = await users.set_role(OPERATOR, "j.moreau", Role.CHARGE_NURSE)
    assert changed is False
    user, changed = await users.set_care_teams(OPERATOR, "j.moreau", ["haem", "onc"])
    assert (user.care_teams, changed) == (("haem", "onc"), True)
    with pytest.raises(Invalid):
        await users.set_care_teams(OPERATOR, "j.moreau", [])
    with pytest.raises(NotFound):
        await users.set_care_teams(OPERATOR, "j.moreau", ["nope"])
    assert [a for _, a, _ in store.audit] == [
        "user.created",
        "user.role_changed",
        "user.care_teams_changed",
    ]
    await users.deactivate(OPERATOR, "j.moreau")
    with pytest.raises(Conflict):
        await users.set_role(OPERATOR, "j.moreau", Role.CLINICIAN)


async def test_a_charge_nurse_manages_only_roles_up_to_their_own() -> None:
    store = MemoryUsers({"onc"})
    users = await _team(
        store,
        ("the.admin", Role.ADMIN, ("onc",)),
        ("the.auditor", Role.AUDITOR, ("onc",)),
        ("a.nurse", Role.CLINICIAN, ("onc",)),
    )
    charge = Actor("u-charge", frozenset({"onc"}))
    as_charge = {"as_role": Role.CHARGE_NURSE}
    for role in (Role.ADMIN, Role.AUDITOR):
        with pytest.raises(Forbidden):
            await users.add(charge, NewUser("new.one", role, ("onc",)), **as_charge)
    for username in ("the.admin", "the.auditor"):
        with pytest.raises(Forbidden):
            await users.reset_password(charge, username, **as_charge)
        with pytest.raises(Forbidden):
            await users.deactivate(charge, username, **as_charge)
    with pytest.raises(Forbidden):
        await users.set_role(charge, "a.nurse", Role.ADMIN, **as_charge)
    user, _ = await users.set_role(charge, "a.nurse", Role.CHARGE_NURSE, **as_charge)
    assert user.role is Role.CHARGE_NURSE
    done = await users.add(charge, NewUser("new.one", Role.CLINICIAN, ("onc",)), **as_charge)
    assert done.user.role is Role.CLINICIAN


async def test_no_self_change_and_no_team_left_without_an_admin() -> None:
    store = MemoryUsers({"onc", "haem"})
    users = await _team(
        store,
        ("admin.a", Role.ADMIN, ("onc", "haem")),
        ("admin.b", Role.ADMIN, ("onc",)),
    )
    a_id = store.rows["admin.a"].user_id
    admin_a = Actor(a_id, frozenset({"onc", "haem"}))
    admin_b = Actor(store.rows["admin.b"].user_id, frozenset({"onc"}))
    as_admin = {"as_role": Role.ADMIN}
    with pytest.raises(Conflict, match="yourself"):
        await users.deactivate(admin_a, "admin.a", **as_admin)
    with pytest.raises(Conflict, match="yourself"):
        await users.set_role(admin_a, "admin.a", Role.CLINICIAN, **as_admin)
    # admin.a is haem's only admin: neither deactivated, demoted nor moved out of it by
    # another admin of both teams.
    other = Actor("u-other", frozenset({"onc", "haem"}))
    with pytest.raises(Conflict, match="haem would have no active admin"):
        await users.set_care_teams(other, "admin.a", ["onc"], **as_admin)
    with pytest.raises(Conflict, match="haem would have no active admin"):
        await users.set_role(other, "admin.a", Role.CHARGE_NURSE, **as_admin)
    with pytest.raises(Conflict, match="haem would have no active admin"):
        await users.deactivate(other, "admin.a", **as_admin)
    # admin.b leaves onc to admin.a: allowed.
    user, _ = await users.set_role(admin_a, "admin.b", Role.CHARGE_NURSE, **as_admin)
    assert user.role is Role.CHARGE_NURSE
    with pytest.raises(NotFound):  # admin.a's teams are not all among admin.b's
        await users.deactivate(admin_b, "admin.a", **as_admin)
    # The operator on the command line is held to none of it.
    user, changed = await users.deactivate(OPERATOR, "admin.a")
    assert changed and not user.active
    assert [a for _, a, _ in store.audit].count("user.deactivated") == 1
