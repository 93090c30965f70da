"""The care team's logins: ``GET /api/users``, ``POST /api/users``, ``POST
/api/users/{username}/deactivate``, ``POST /api/users/{username}/reset-password``, ``PUT
/api/users/{username}/role`` and ``PUT /api/users/{username}/care-teams``.

Each needs ``manage_users`` (charge nurse, admin) and is the use case of
``services.api.service_layer.users`` that ``vigil admin users`` runs, with the caller's role:
a charge nurse adds, changes and manages only clinicians and charge nurses, an admin any role
(``services.api.domain.access.may_grant``; else 403). A user is seen only when all of their care
teams are among the caller's; any other answers 404, as one that does not exist. Nobody
deactivates themselves or changes their own role or teams, and no change leaves one of the
user's teams without an active admin (409). A new password is in the answer once, with
``Cache-Control: no-store``; only its hash is kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from services.api.domain.access import Action, Principal, Role
from services.api.entrypoints.http.deps import require
from services.api.entrypoints.http.enrolment import _actor, _http
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem, Responses
from services.api.service_layer.enrolment import EnrolmentError
from services.api.service_layer.users import Forbidden, Issued, NewUser, UserRecord, UserService

router = APIRouter(prefix="/api", tags=["users"], responses=AUTHENTICATED)
Manager = Annotated[Principal, Depends(require(Action.MANAGE_USERS))]

_DESCRIBED = {
    403: "The caller's role may not manage users, or may not hand out this role or manage a "
    "user who holds it (a charge nurse: clinicians and charge nurses only), or a write through "
    "the dashboard's cookie without the X-Requested-By header.",
    404: "No such user (or care team) in the caller's care teams: a user with a team that is "
    "not the caller's answers the same as one that does not exist.",
    409: "Not allowed as it stands: the username is taken; the user is deactivated; the caller "
    "would deactivate themselves or change their own role or teams; one of the user's care "
    "teams would have no active admin left.",
}


def _errors(*codes: int) -> Responses:
    return {code: {"model": Problem, "description": _DESCRIBED[code]} for code in codes}


def get_users(request: Request) -> UserService:
    service: UserService = request.app.state.users
    return service


Service = Annotated[UserService, Depends(get_users)]


class UserOut(BaseModel):
    username: str
    display_name: str
    role: Role
    care_teams: list[str]
    active: bool
    created_at: datetime
    deactivated_at: datetime | None = Field(
        description="When the user was deactivated (and every session of theirs ended); null "
        "while active."
    )
    sessions_ended_at: datetime | None = Field(
        description="Tokens issued before this time are refused (set by a deactivation or a "
        "password reset); null when never."
    )


class IssuedOut(BaseModel):
    user: UserOut
    password: str = Field(
        description="The generated password, shown this once and stored only as its hash: hand "
        "it to the person, who should change it."
    )


class ChangedOut(BaseModel):
    user: UserOut
    changed: bool = Field(description="False: it already was so; nothing changed.")


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(
        min_length=2,
        max_length=100,
        description="What the person logs in with: letters, digits, _ . @ -, starting with a "
        "letter or digit.",
    )
    role: Role
    care_teams: list[str] = Field(
        min_length=1, description="The care teams whose patients they see; each the caller's."
    )
    display_name: str | None = Field(
        default=None, max_length=200, description="The name shown for them; default: username."
    )


class RoleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role


class CareTeamsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    care_teams: list[str] = Field(
        min_length=1,
        description="All of the user's care teams from now on (replacing the present ones); "
        "each the caller's.",
    )


def _user(u: UserRecord) -> UserOut:
    return UserOut(
        username=u.username,
        display_name=u.display_name,
        role=u.role,
        care_teams=list(u.care_teams),
        active=u.active,
        created_at=u.created_at,
        # Only an active user's sessions can be ended later, so a deactivated user's end of
        # sessions is their deactivation.
        deactivated_at=None if u.active else u.sessions_revoked_at,
        sessions_ended_at=u.sessions_revoked_at,
    )


def _issued(done: Issued, response: Response) -> IssuedOut:
    response.headers["Cache-Control"] = "no-store"
    return IssuedOut(user=_user(done.user), password=done.password)


def _refused(error: EnrolmentError) -> Exception:
    if isinstance(error, Forbidden):
        return HTTPException(status.HTTP_403_FORBIDDEN, str(error))
    return _http(error)


@router.get("/users", response_model=list[UserOut])
async def list_users(
    principal: Manager, service: Service, include_inactive: bool = False
) -> list[UserOut]:
    """The users all of whose care teams are the caller's, by username; deactivated ones too
    with `include_inactive`. Never a password or its hash."""
    found = await service.list(_actor(principal), include_inactive=include_inactive)
    return [_user(u) for u in found]


@router.post(
    "/users",
    response_model=IssuedOut,
    status_code=status.HTTP_201_CREATED,
    responses=_errors(403, 404, 409),
)
async def add_user(
    body: UserIn, principal: Manager, service: Service, response: Response
) -> IssuedOut:
    """Add a login with its role and care teams. The answer holds its generated password,
    once. Audited `user.created`."""
    try:
        done = await service.add(
            _actor(principal),
            NewUser(body.username, body.role, tuple(body.care_teams), body.display_name),
            as_role=principal.role,
        )
    except EnrolmentError as error:
        raise _refused(error) from None
    return _issued(done, response)


@router.post(
    "/users/{username}/deactivate", response_model=ChangedOut, responses=_errors(403, 404, 409)
)
async def deactivate_user(username: str, principal: Manager, service: Service) -> ChangedOut:
    """The user can no longer log in, and every token issued to them is refused from now on,
    as a logged-out one is. Again: nothing changes (`changed` false). Audited
    `user.deactivated`."""
    try:
        user, changed = await service.deactivate(
            _actor(principal), username, as_role=principal.role
        )
    except EnrolmentError as error:
        raise _refused(error) from None
    return ChangedOut(user=_user(user), changed=changed)


@router.post(
    "/users/{username}/reset-password",
    response_model=IssuedOut,
    responses=_errors(403, 404, 409),
)
async def reset_password(
    username: str, principal: Manager, service: Service, response: Response
) -> IssuedOut:
    """A new generated password for an active user, in the answer once; every token issued to
    them before is refused from now on. Audited `user.password_reset`."""
    try:
        done = await service.reset_password(_actor(principal), username, as_role=principal.role)
    except EnrolmentError as error:
        raise _refused(error) from None
    return _issued(done, response)


@router.put("/users/{username}/role", response_model=ChangedOut, responses=_errors(403, 404, 409))
async def set_role(username: str, body: RoleIn, principal: Manager, service: Service) -> ChangedOut:
    """Give an active user another role, in force from their next request. Audited
    `user.role_changed` (from, to)."""
    try:
        user, changed = await service.set_role(
            _actor(principal), username, body.role, as_role=principal.role
        )
    except EnrolmentError as error:
        raise _refused(error) from None
    return ChangedOut(user=_user(user), changed=changed)


@router.put(
    "/users/{username}/care-teams", response_model=ChangedOut, responses=_errors(403, 404, 409)
)
async def set_care_teams(
    username: str, body: CareTeamsIn, principal: Manager, service: Service
) -> ChangedOut:
    """Make these the active user's care teams, in force from their next request. Audited
    `user.care_teams_changed` (from, to)."""
    try:
        user, changed = await service.set_care_teams(
            _actor(principal), username, body.care_teams, as_role=principal.role
        )
    except EnrolmentError as error:
        raise _refused(error) from None
    return ChangedOut(user=_user(user), changed=changed)
