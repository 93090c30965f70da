"""Login: OAuth2 password flow issuing a signed token, throttled per username and address."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel

from services.api.adapters.credentials import DUMMY_HASH, issue_token, verify_password
from services.api.domain.throttle import LoginThrottle
from services.api.entrypoints.http.deps import (
    SESSION_COOKIE,
    Clock,
    CurrentPrincipal,
    Repository,
    Settings,
)

router = APIRouter(tags=["auth"])


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class Me(BaseModel):
    user_id: str
    username: str
    role: str
    care_teams: list[str]


@router.post("/auth/token", response_model=TokenResponse)
async def login(
    request: Request,
    response: Response,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    settings: Settings,
    repository: Repository,
    clock: Clock,
) -> TokenResponse:
    # Per username, a few failures a minute; per address ten times more, since a ward's
    # workstations often share one address and must not lock each other out.
    throttles: tuple[tuple[LoginThrottle, str], ...] = (
        (request.app.state.login_throttle, f"user:{form.username.lower()}"),
        (
            request.app.state.address_throttle,
            f"addr:{request.client.host if request.client else 'unknown'}",
        ),
    )
    now = clock()
    moment = now.timestamp()
    wait = max(throttle.retry_after(key, moment) for throttle, key in throttles)
    if wait > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many failed logins; try again later",
            headers={"Retry-After": str(int(wait) + 1)},
        )
    user = await repository.user_by_username(form.username)
    valid = verify_password(user["password_hash"] if user else DUMMY_HASH, form.password)
    if not (user and valid and user["active"]):
        for throttle, key in throttles:
            throttle.failed(key, moment)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
    throttles[0][0].succeeded(throttles[0][1])
    principal = await repository.principal(user["user_id"])
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong username or password")
    ttl = timedelta(minutes=settings.token_ttl_minutes)
    token = issue_token(principal, settings.token_secret.get_secret_value(), now, ttl)
    # The dashboard uses the same token as an HttpOnly cookie so that page scripts never hold it.
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(ttl.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=settings.cookie_secure,
    )
    return TokenResponse(access_token=token, expires_in=int(ttl.total_seconds()))


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(response: Response) -> Response:
    response.delete_cookie(SESSION_COOKIE)
    response.status_code = status.HTTP_204_NO_CONTENT
    return response


@router.get("/auth/me", response_model=Me)
async def me(principal: CurrentPrincipal) -> Me:
    return Me(
        user_id=principal.user_id,
        username=principal.username,
        role=principal.role.value,
        care_teams=sorted(principal.care_teams),
    )
