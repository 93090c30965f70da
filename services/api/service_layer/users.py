"""The care-team API's logins: list them, add one with its role and care teams, deactivate one,
reset a password, change a role or the care teams. Behind ``vigil admin users`` and the API's
``/api/users`` routes.

A new login and a reset are given a generated password, returned once and stored only as its
argon2 hash: whoever runs the command hands it to the person, who should change it. A
deactivated user can no longer log in, and every token issued to them before is refused from
then on, as a logged-out token is (``api_users.sessions_revoked_at``, migration 0044, checked
with each request); a password reset ends their sessions the same way. Each change and its
audit entry (``user.created``, ``user.deactivated``, ``user.password_reset``,
``user.role_changed``, ``user.care_teams_changed``) are written in one transaction by the store;
the password or its hash is never audited. Deactivating a user already inactive, or setting the
role or care teams they already have, changes nothing and writes no audit entry. A role or
care-team change takes effect at the user's next request (the API reads both with each one).

An actor with care teams (``Actor.care_teams``) sees and changes only users all of whose teams
are among theirs; an operator on the command line (``None``) every user. A caller of the API
also names their role (``as_role``): they hand out and manage only the roles that role may
grant (``services.api.domain.access.may_grant``, else ``Forbidden``); they neither deactivate
themselves nor change their own role or teams; and no change of theirs leaves one of the user's
care teams without an active admin (``Conflict``). The operator on the command line is held to
none of these three: it is how a team without an admin gets one back.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.api.domain.access import Role, may_grant
from services.api.service_layer.enrolment import (
    Actor,
    Conflict,
    EnrolmentError,
    Invalid,
    NotFound,
)

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{1,99}$")
#: Passwords are generated: 20 URL-safe characters (120 bits), more than the 12 the API asks.
PASSWORD_BYTES = 15


class Forbidden(EnrolmentError):
    """The caller's role may not hand out this role, or manage a user who holds it."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: str
    username: str
    display_name: str
    role: Role
    active: bool
    care_teams: tuple[str, ...]
    created_at: datetime
    sessions_revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewUser:
    username: str
    role: Role
    care_teams: tuple[str, ...]
    display_name: str | None = None


@dataclass(frozen=True, slots=True)
class Issued:
    """A user and the password just set for them: shown to the caller once, never stored."""

    user: UserRecord
    password: str


class UserStore(Protocol):
    async def users(self) -> list[UserRecord]:
        """Every login, by username."""
        ...

    async def user(self, username: str) -> UserRecord | None: ...

    async def unknown_teams(self, care_teams: Sequence[str]) -> list[str]:
        """The ids among ``care_teams`` that name no care team."""
        ...

    async def add(
        self, actor: str, user_id: str, new: NewUser, display_name: str, password_hash: str
    ) -> UserRecord | None:
        """Insert the login, its teams and the ``user.created`` audit entry; None when the
        username is taken."""
        ...

    async def deactivate(self, actor: str, username: str, at: datetime) -> UserRecord:
        """Mark the user inactive with their sessions ended at ``at``, audited."""
        ...

    async def set_password(
        self, actor: str, username: str, password_hash: str, at: datetime
    ) -> UserRecord:
        """Store the new hash, end the user's sessions at ``at``, audited."""
        ...

    async def set_role(self, actor: str, username: str, role: Role) -> UserRecord:
        """Give the user ``role``, audited (``user.role_changed``, from and to)."""
        ...

    async def set_care_teams(
        self, actor: str, username: str, care_teams: Sequence[str]
    ) -> UserRecord:
        """Make ``care_teams`` the user's teams, audited (``user.care_teams_changed``)."""
        ...


def generate_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


class UserService:
    def __init__(
        self,
        store: UserStore,
        hasher: Callable[[str], str],
        clock: Callable[[], datetime],
        *,
        passwords: Callable[[], str] = generate_password,
    ) -> None:
        self._store = store
        self._hash = hasher
        self._clock = clock
        self._passwords = passwords

    async def list(
        self, actor: Actor, *, care_team: str | None = None, include_inactive: bool = False
    ) -> list[UserRecord]:
        """The users the actor may see (of ``care_team`` only, when given); active ones unless
        ``include_inactive``."""
        return [
            u
            for u in await self._store.users()
            if _visible(actor, u)
            and (include_inactive or u.active)
            and (care_team is None or care_team in u.care_teams)
        ]

    async def add(self, actor: Actor, new: NewUser, *, as_role: Role | None = None) -> Issued:
        """A new login with a generated password; ``as_role``: the caller's role, which must
        be allowed to grant ``new.role``."""
        _grantable(as_role, new.role)
        username = new.username.strip()
        if not USERNAME.match(username):
            raise Invalid(
                "a username is 2-100 letters, digits or _ . @ -, starting with a letter or digit",
                "username",
            )
        teams = await self._teams(actor, new.care_teams)
        display = (new.display_name or "").strip() or username
        if len(display) > 200:
            raise Invalid("a display name has at most 200 characters", "display_name")
        password = self._passwords()
        created = await self._store.add(
            actor.audit_id,
            f"u-{uuid.uuid4().hex[:10]}",
            NewUser(username, new.role, teams, display),
            display,
            self._hash(password),
        )
        if created is None:
            raise Conflict(f"username {username!r} is taken")
        return Issued(created, password)

    async def deactivate(
        self, actor: Actor, username: str, *, as_role: Role | None = None
    ) -> tuple[UserRecord, bool]:
        """The user made inactive, their sessions ended; ``changed`` False when they already
        were inactive (nothing written)."""
        user = await self._find(actor, username, as_role)
        if not user.active:
            return user, False
        if as_role is not None:
            self._not_self(actor, user, "deactivate")
            await self._admins_left(user, role=None, care_teams=())
        return await self._store.deactivate(actor.audit_id, user.username, self._clock()), True

    async def reset_password(
        self, actor: Actor, username: str, *, as_role: Role | None = None
    ) -> Issued:
        """A new generated password for an active user; their sessions end."""
        user = await self._find(actor, username, as_role)
        if not user.active:
            raise Conflict(f"user {username!r} is deactivated")
        password = self._passwords()
        done = await self._store.set_password(
            actor.audit_id, user.username, self._hash(password), self._clock()
        )
        return Issued(done, password)

    async def set_role(
        self, actor: Actor, username: str, role: Role, *, as_role: Role | None = None
    ) -> tuple[UserRecord, bool]:
        """Give an active user another role; ``changed`` False when they already hold it."""
        user = await self._find(actor, username, as_role)
        _grantable(as_role, role)
        if not user.active:
            raise Conflict(f"user {username!r} is deactivated")
        if user.role == role:
            return user, False
        if as_role is not None:
            self._not_self(actor, user, "change the role of")
            await self._admins_left(user, role=role, care_teams=user.care_teams)
        return await self._store.set_role(actor.audit_id, user.username, role), True

    async def set_care_teams(
        self,
        actor: Actor,
        username: str,
        care_teams: Sequence[str],
        *,
        as_role: Role | None = None,
    ) -> tuple[UserRecord, bool]:
        """Make ``care_teams`` an active user's teams (all of them, at least one, each one the
        actor sees); ``changed`` False when they already are."""
        user = await self._find(actor, username, as_role)
        teams = await self._teams(actor, care_teams)
        if not user.active:
            raise Conflict(f"user {username!r} is deactivated")
        if set(teams) == set(user.care_teams):
            return user, False
        if as_role is not None:
            self._not_self(actor, user, "change the care teams of")
            await self._admins_left(user, role=user.role, care_teams=teams)
        return await self._store.set_care_teams(actor.audit_id, user.username, teams), True

    async def _teams(self, actor: Actor, care_teams: Sequence[str]) -> tuple[str, ...]:
        teams = tuple(dict.fromkeys(t.strip() for t in care_teams if t.strip()))
        if not teams:
            raise Invalid("a user needs at least one care team", "care_teams")
        hidden = [t for t in teams if not actor.sees(t)]
        unknown = await self._store.unknown_teams(teams)
        if hidden or unknown:
            raise NotFound("no such care team: " + ", ".join(dict.fromkeys(hidden + unknown)))
        return teams

    async def _find(self, actor: Actor, username: str, as_role: Role | None) -> UserRecord:
        user = await self._store.user(username)
        if user is None or not _visible(actor, user):
            raise NotFound(f"no such user: {username}")
        if as_role is not None and not may_grant(as_role, user.role):
            raise Forbidden(f"a {as_role.value} may not manage a user who is {user.role.value}")
        return user

    @staticmethod
    def _not_self(actor: Actor, user: UserRecord, what: str) -> None:
        if user.user_id == actor.audit_id:
            raise Conflict(f"you may not {what} yourself")

    async def _admins_left(
        self, user: UserRecord, *, role: Role | None, care_teams: Sequence[str]
    ) -> None:
        """Refuse a change after which a care team of ``user`` has no active admin, when it
        has one now (``role`` None: the user deactivated)."""
        if not user.active or user.role is not Role.ADMIN:
            return
        kept = set(care_teams) if role is Role.ADMIN else set()
        others = [
            u
            for u in await self._store.users()
            if u.active and u.role is Role.ADMIN and u.user_id != user.user_id
        ]
        for team in user.care_teams:
            if team not in kept and not any(team in u.care_teams for u in others):
                raise Conflict(f"care team {team} would have no active admin left")


def _grantable(as_role: Role | None, role: Role) -> None:
    if as_role is not None and not may_grant(as_role, role):
        raise Forbidden(f"a {as_role.value} may not grant the role {role.value}")


def _visible(actor: Actor, user: UserRecord) -> bool:
    return actor.care_teams is None or all(actor.sees(t) for t in user.care_teams)
