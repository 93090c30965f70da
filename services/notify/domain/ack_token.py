"""Signed acknowledgement links: who may acknowledge which escalation, until when.

Pure: the secret and the current time are passed in. A token is
``base64url(claims) "." base64url(HMAC-SHA256(secret, claims))``; single use is enforced by the
shell, which stores ``token_digest`` when the token is spent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID


class InvalidAckToken(ValueError):
    """The token is malformed, forged or expired; ``reason`` says which, never the claims."""


@dataclass(frozen=True, slots=True)
class AckClaim:
    escalation_id: UUID
    recipient: str
    expires_at: datetime


def sign_ack_token(claim: AckClaim, secret: bytes) -> str:
    body = json.dumps(
        {
            "e": str(claim.escalation_id),
            "r": claim.recipient,
            "x": int(claim.expires_at.timestamp()),
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()
    mac = hmac.new(secret, body, hashlib.sha256).digest()
    return f"{_b64(body)}.{_b64(mac)}"


def verify_ack_token(token: str, secret: bytes, *, now: datetime) -> AckClaim:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        body_part, mac_part = token.split(".", 1)
        body, mac = _unb64(body_part), _unb64(mac_part)
    except ValueError as exc:
        raise InvalidAckToken("malformed") from exc
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise InvalidAckToken("bad signature")
    try:
        data = json.loads(body)
        claim = AckClaim(
            escalation_id=UUID(data["e"]),
            recipient=str(data["r"]),
            expires_at=datetime.fromtimestamp(int(data["x"]), UTC),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidAckToken("malformed claims") from exc
    if now >= claim.expires_at:
        raise InvalidAckToken("expired")
    return claim


def token_digest(token: str) -> str:
    """What is stored to spend a token: a digest, so the table holds nothing usable."""
    return hashlib.sha256(token.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc
