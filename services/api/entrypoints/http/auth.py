"""Login: OAuth2 password flow issuing a signed token, throttled per username and address."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel, Field

from services.api.adapters.credentials import (
    DUMMY_HASH,
    issue_token,
    read_token,
    verify_password,
)
from services.api.domain import fhir_scopes
from services.api.domain.access import Action
from services.api.domain.throttle import LoginThrottles
from services.api.entrypoints.http.deps import (
    SESSION_COOKIE,
    Clock,
    CurrentPrincipal,
    Repository,
    Settings,
    bearer_token,
)
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem

router = APIRouter(tags=["auth"])


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int
    scope: str = Field("", description="The FHIR scopes granted (space-separated; docs/fhir.md)")
    patient: str | None = Field(None, description="The patient of a patient/*.read scope")


class Me(BaseModel):
    user_id: str
    username: str
    role: str
    care_teams: list[str]


@router.post(
    "/auth/token",
    response_model=TokenResponse,
    responses={
        400: {"model": Problem, "description": "A scope or patient that cannot be granted."},
        401: {"model": Problem, "description": "Wrong username or password."},
        429: {
            "model": Problem,
            "description": "Too many failed logins from here or for this user; Retry-After "
            "says when to try again.",
        },
    },
)
async def login(
    request: Request,
    response: Response,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: Settings,
    repository: Repository,
    clock: Clock,
    patient: Annotated[
        str | None,
        Form(
            max_length=64,
            description="With scope patient/*.read: the one patient (of the user's care "
            "teams) the token may read through /fhir",
        ),
    ] = None,
) -> TokenResponse:
    """A bearer token (OAuth 2.0 password flow). ``scope`` may ask for FHIR scopes
    (``user/*.read``, the default for a role that reads patients, or ``patient/*.read`` with a
    ``patient``); the answer's ``scope`` says which were granted."""
    throttles: LoginThrottles = request.app.state.login_throttles
    address = request.client.host if request.client else "unknown"
    now = clock()
    moment = now.timestamp()
    wait = throttles.retry_after(form.username, address, moment)
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many failed logins; try again later",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    user = await repository.user_by_username(form.username)
    valid = verify_password(user["password_hash"] if user else DUMMY_HASH, form.password)
    if not (user and valid and user["active"]):
        throttles.failed(form.username, address, moment)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
    throttles.succeeded(form.username, address)
    principal = await repository.principal(user["user_id"])
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
    try:
        scopes = fhir_scopes.grant(
            " ".join(form.scopes), principal.may(Action.READ_PATIENT), patient
        )
    except fhir_scopes.ScopeError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"invalid_scope: {exc}") from exc
    if patient is not None and await repository.patient(principal.care_teams, patient) is None:
        # The same answer for a patient of another team as for none at all.
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid_scope: no such patient")
    ttl = timedelta(minutes=settings.token_ttl_minutes)
    token = issue_token(
        principal,
        settings.token_secret.get_secret_value(),
        now,
        ttl,
        scopes=scopes,
        patient=patient if fhir_scopes.PATIENT_READ in scopes else None,
    )
    # The dashboard uses the same token as an HttpOnly cookie so that page scripts never hold it.
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(ttl.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=settings.cookie_secure,
    )
    return TokenResponse(
        access_token=token,
        expires_in=int(ttl.total_seconds()),
        scope=" ".join(scopes),
        patient=patient if fhir_scopes.PATIENT_READ in scopes else None,
    )


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(
    request: Request,
    response: Response,
    settings: Settings,
    repository: Repository,
    bearer: Annotated[str | None, Depends(bearer_token)],
) -> Response:
    """Ends the session: the token sent (bearer, or the dashboard's cookie) is revoked until it
    would have expired, on every replica, and the cookie is deleted. Without a valid token there
    is nothing to revoke; the answer is the same."""
    token = bearer or request.cookies.get(SESSION_COOKIE)
    claims = read_token(token, settings.token_secret.get_secret_value()) if token else None
    if claims is not None and claims.token_id is not None and claims.expires_at is not None:
        await repository.revoke_token(claims.token_id, claims.user_id, claims.expires_at)
    response.delete_cookie(SESSION_COOKIE)
    response.status_code = status.HTTP_204_NO_CONTENT
    return response


@router.get("/auth/me", response_model=Me, responses={401: AUTHENTICATED[401]})
async def me(principal: CurrentPrincipal) -> Me:
    return Me(
        user_id=principal.user_id,
        username=principal.username,
        role=principal.role.value,
        care_teams=sorted(principal.care_teams),
    )
