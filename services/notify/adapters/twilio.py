"""SMS through Twilio's REST API (Messages resource), with httpx.

Owns the request shape (form-encoded ``To``/``From``/``Body``/``StatusCallback``, basic auth with
the account sid and auth token) and turns every answer into a ``SendOutcome``; it never raises
for a delivery problem and never logs the body (PHI). Twilio has no idempotency header, so
``find_sent`` looks a message up by the reference written into its body: a restarted notify uses
it to learn whether a send cut short by a crash was accepted before sending again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

import httpx

from services.notify.service_layer.ports import SendOutcome

# Twilio's final failure statuses for a message; the others are on the way or delivered.
FAILED_STATUSES = frozenset({"failed", "undelivered", "canceled"})


class TwilioSms:
    def __init__(
        self,
        *,
        base_url: str,
        account_sid: str,
        auth_token: str,
        from_number: str,
        status_callback_url: str | None = None,
        timeout_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._sid = account_sid
        self._from = from_number
        self._callback = status_callback_url
        self._client = client or httpx.AsyncClient(
            auth=(account_sid, auth_token), timeout=timeout_s
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def _messages_url(self) -> str:
        return f"{self._base}/2010-04-01/Accounts/{self._sid}/Messages.json"

    async def send_sms(self, *, to: str, body: str) -> SendOutcome:
        form = {"To": to, "From": self._from, "Body": body}
        if self._callback is not None:
            form["StatusCallback"] = self._callback
        try:
            response = await self._client.post(self._messages_url, data=form)
        except httpx.HTTPError as exc:
            return SendOutcome(accepted=False, detail=f"{type(exc).__name__}: {exc}")
        return _outcome(response)

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        """The sid of a message to ``to`` whose body carries ``reference``, sent after ``since``."""
        params = {"To": to, "DateSent>": since.date().isoformat(), "PageSize": "100"}
        response = await self._client.get(self._messages_url, params=params)
        response.raise_for_status()
        for message in response.json().get("messages", []):
            if (
                reference in str(message.get("body", ""))
                and message.get("status") not in FAILED_STATUSES
            ):
                return str(message["sid"])
        return None


def _outcome(response: httpx.Response) -> SendOutcome:
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code in (200, 201):
        status = str(data.get("status", ""))
        sid = data.get("sid")
        if status in FAILED_STATUSES:
            return SendOutcome(accepted=False, detail=f"twilio status {status}", provider_id=sid)
        return SendOutcome(
            accepted=True,
            detail=f"{response.status_code} {status}".strip(),
            reply_code=response.status_code,
            provider_id=None if sid is None else str(sid),
        )
    # Twilio's error body: {"code": 21211, "message": "...", "status": 400}
    detail = f"{response.status_code} twilio error {data.get('code')}: {data.get('message')}"
    # 4xx other than 429 will not succeed on a retry of the same request (bad number, auth).
    return SendOutcome(
        accepted=False,
        detail=detail,
        refused_for_good=400 <= response.status_code < 500 and response.status_code != 429,
    )


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """``X-Twilio-Signature`` of a webhook Twilio sends: HMAC-SHA1 over the URL and the sorted
    form fields, base64-encoded. notify checks it on SMS replies and status callbacks."""
    payload = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()
