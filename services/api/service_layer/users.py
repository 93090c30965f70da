"""The care-team API's logins: list them, add one with its role and care teams, deactivate one,
reset a password. Behind ``vigil admin users``.

A new login and a reset are given a generated password, returned once and stored only as its
argon2 hash: whoever runs the command hands it to the person, who should change it. A
deactivated user can no longer log in, and every token issued to them before is refused from
then on, as a logged-out token is (``api_users.sessions_revoked_at``, migration 0044, checked
with each request); a password reset ends their sessions the same way. Each change and its
audit entry (``user.created``, ``user.deactivated``, ``user.password_reset``) are written in one
transaction by the store; the password or its hash is never audited. Deactivating a user already
inactive changes nothing and writes no audit entry.

An actor with care teams (``Actor.care_teams``) sees and changes only users all of whose teams
are among theirs; an operator on the command line (``None``) every user.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.api.domain.access import Role
from services.api.service_layer.enrolment import Actor, Conflict, Invalid, NotFound

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{1,99}$")
#: Passwords are generated: 20 URL-safe characters (120 bits), more than the 12 the API asks.
PASSWORD_BYTES = 15


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

    async def add(self, actor: Actor, new: NewUser) -> Issued:
        username = new.username.strip()
        if not USERNAME.match(username):
            raise Invalid(
                "a username is 2-100 letters, digits or _ . @ -, starting with a letter or digit",
                "username",
            )
        teams = tuple(dict.fromkeys(t.strip() for t in new.care_teams if t.strip()))
        if not teams:
            raise Invalid("a user needs at least one care team", "care_teams")
        hidden = [t for t in teams if not actor.sees(t)]
        unknown = await self._store.unknown_teams(teams)
        if hidden or unknown:
            raise NotFound("no such care team: " + ", ".join(dict.fromkeys(hidden + unknown)))
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

    async def deactivate(self, actor: Actor, username: str) -> tuple[UserRecord, bool]:
        """The user made inactive, their sessions ended; ``changed`` False when they already
        were inactive (nothing written)."""
        user = await self._find(actor, username)
        if not user.active:
            return user, False
        return await self._store.deactivate(actor.audit_id, user.username, self._clock()), True

    async def reset_password(self, actor: Actor, username: str) -> Issued:
        """A new generated password for an active user; their sessions end."""
        user = await self._find(actor, username)
        if not user.active:
            raise Conflict(f"user {username!r} is deactivated")
        password = self._passwords()
        done = await self._store.set_password(
            actor.audit_id, user.username, self._hash(password), self._clock()
        )
        return Issued(done, password)

    async def _find(self, actor: Actor, username: str) -> UserRecord:
        user = await self._store.user(username)
        if user is None or not _visible(actor, user):
            raise NotFound(f"no such user: {username}")
        return user


def _visible(actor: Actor, user: UserRecord) -> bool:
    return actor.care_teams is None or all(actor.sees(t) for t in user.care_teams)
