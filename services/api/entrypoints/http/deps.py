"""Request dependencies: the repository, the clock and the authenticated principal.

A request authenticates with a bearer token (API clients) or with the dashboard's session
cookie. A write through the cookie must also carry the ``X-Requested-By`` header, which a page
of another site cannot add without a CORS preflight this API never grants (CSRF defence).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer

from services.api.adapters.audit import COVER_IN_FORCE
from services.api.adapters.credentials import read_token
from services.api.adapters.repository import ApiRepository
from services.api.domain.access import COVER_ACTIONS, Action, CoverScope, Principal
from services.api.settings import ApiSettings

SESSION_COOKIE = "vigil_session"
CSRF_HEADER = "X-Requested-By"

bearer_token = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def get_repository(request: Request) -> ApiRepository:
    repository: ApiRepository = request.app.state.repository
    return repository


def get_clock(request: Request) -> Callable[[], datetime]:
    clock: Callable[[], datetime] = request.app.state.clock
    return clock


Settings = Annotated[ApiSettings, Depends(get_settings)]
Repository = Annotated[ApiRepository, Depends(get_repository)]
Clock = Annotated[Callable[[], datetime], Depends(get_clock)]

_UNAUTHENTICATED = HTTPException(
    status_code=status.HTTP_401_UNAUTHORIZED,
    detail="not authenticated",
    headers={"WWW-Authenticate": "Bearer"},
)


async def get_principal(
    request: Request,
    settings: Settings,
    repository: Repository,
    bearer: Annotated[str | None, Depends(bearer_token)],
) -> Principal:
    token = bearer
    if token is None:
        token = request.cookies.get(SESSION_COOKIE)
        if (
            token is not None
            and request.method not in ("GET", "HEAD", "OPTIONS")
            and (request.headers.get(CSRF_HEADER) != "vigil-dashboard")
        ):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cookie writes need " + CSRF_HEADER)
    if token is None:
        raise _UNAUTHENTICATED
    claims = read_token(token, settings.token_secret.get_secret_value())
    if claims is None:
        raise _UNAUTHENTICATED
    if await repository.token_revoked(claims.token_id, claims.user_id, claims.issued_at):
        raise _UNAUTHENTICATED  # logged out, or the user's sessions were ended
    principal = await repository.principal(claims.user_id)
    if principal is None:
        raise _UNAUTHENTICATED
    # The FHIR interface reads the token's scopes (services.api.domain.fhir_scopes) from here.
    request.state.token_claims = claims
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require(action: Action) -> Callable[[Principal], Principal]:
    def check(principal: CurrentPrincipal) -> Principal:
        if not principal.may(action):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role may not {action.value}")
        return principal

    return check


def require_patient(action: Action) -> Callable[..., Any]:
    """``require`` for the routes of patients and their alerts, widened by regional cover
    (``cover_scope``)."""

    async def check(request: Request, principal: CurrentPrincipal, clock: Clock) -> Principal:
        if not principal.may(action):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role may not {action.value}")
        return await cover_scope(request, principal, action, clock)

    return check


async def cover_scope(
    request: Request, principal: Principal, action: Action, clock: Callable[[], datetime]
) -> Principal:
    """The principal widened by regional cover: while an agreement in force lets one of the
    caller's teams cover another, the principal also sees the covered team's monitored patients
    (a discharged one answers 404 through cover), and every audit entry of the request names the
    agreement (docs/regional-cover.md). The request's ``patient_id`` or ``dedup_key`` path
    parameter, when it has one, decides whether it is served under cover."""
    COVER_IN_FORCE.set(())
    if action not in COVER_ACTIONS or not principal.care_teams:
        return principal
    from services.notify.public import grants

    store = request.app.state.cover_store
    agreements = await store.in_force_covering(principal.care_teams)
    found = grants(principal.care_teams, agreements, clock())
    if not found:
        return principal
    widened = principal.covering(
        tuple(CoverScope(g.covered_team_id, g.agreement_id, g.version, g.ends) for g in found)
    )
    patient_id = request.path_params.get("patient_id")
    dedup_key = request.path_params.get("dedup_key")
    if patient_id is not None or dedup_key is not None:
        subject = await store.subject_team(patient_id, dedup_key)
        scope = widened.cover_of(subject[0]) if subject is not None else None
        if subject is not None and scope is not None:
            if subject[1]:  # a discharged patient is no longer the covering team's
                what = "patient" if patient_id is not None else "alert"
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such {what}")
            COVER_IN_FORCE.set((scope,))
            return widened
        # The caller's own patient (or none at all): served as without cover.
        return principal
    COVER_IN_FORCE.set(widened.cover)
    return widened
