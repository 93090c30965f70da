"""Password hashing (argon2id) and signed access tokens (JWT, HS256)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.api.domain.access import Principal, Role

_HASHER = PasswordHasher()
_ALGORITHM = "HS256"


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# A hash to verify against when the user does not exist, so a wrong username costs the same
# time as a wrong password and does not reveal which usernames exist.
DUMMY_HASH = hash_password("not-a-user-password")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid token says: the user, the role, the granted scopes (space-separated, empty
    on a token without any) and the patient of a patient-level scope."""

    user_id: str
    role: Role
    scope: str = ""
    patient: str | None = None
    # The token's own id (``jti``) and expiry: logout revokes it by id until then. None on a
    # token issued before tokens had ids (it cannot be revoked; it expires by its ``exp``).
    token_id: str | None = None
    expires_at: datetime | None = None
    # When it was issued (``iat``): a token issued at or before the user's sessions were ended
    # by an administrator is refused. None on a token without it.
    issued_at: datetime | None = None


def issue_token(
    principal: Principal,
    secret: str,
    now: datetime,
    ttl: timedelta,
    *,
    scopes: Sequence[str] = (),
    patient: str | None = None,
) -> str:
    claims: dict[str, object] = {
        "sub": principal.user_id,
        "name": principal.username,
        "role": principal.role.value,
        "iat": int(now.timestamp()),
        "exp": int((now + ttl).timestamp()),
        "scope": " ".join(scopes),
        "jti": uuid.uuid4().hex,
    }
    if patient is not None:
        claims["patient"] = patient
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def read_token(token: str, secret: str) -> TokenClaims | None:
    """The claims of a valid token, or None. Care teams are read fresh from the database on
    each request, so removing someone from a team takes effect at once."""
    try:
        claims = jwt.decode(token, secret, algorithms=[_ALGORITHM], options={"require": ["exp"]})
        scope, patient, jti = claims.get("scope", ""), claims.get("patient"), claims.get("jti")
        iat = claims.get("iat")
        return TokenClaims(
            user_id=str(claims["sub"]),
            role=Role(claims["role"]),
            scope=scope if isinstance(scope, str) else "",
            patient=patient if isinstance(patient, str) else None,
            token_id=jti if isinstance(jti, str) else None,
            expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
            issued_at=datetime.fromtimestamp(int(iat), UTC) if iat is not None else None,
        )
    except (jwt.PyJWTError, KeyError, ValueError):
        return None
