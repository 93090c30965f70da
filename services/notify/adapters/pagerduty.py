"""Pages as PagerDuty Events API v2 events (``POST /v2/enqueue``), with httpx.

Owns the HTTP exchange and its reading: 202 is accepted (``{status, message, dedup_key}``),
400 is a malformed event (no retry helps), 429 and 5xx are worth a retry. A resent event with
the same ``dedup_key`` folds onto the same incident, which is what makes a resend after a crash
harmless. Never logs the event (its summary carries PHI).
"""

from __future__ import annotations

import httpx

from services.notify.service_layer.ports import SendOutcome


class PagerDutyEvents:
    def __init__(
        self, *, base_url: str, timeout_s: float = 10.0, client: httpx.AsyncClient | None = None
    ) -> None:
        self._url = base_url.rstrip("/") + "/v2/enqueue"
        self._client = client or httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def enqueue(self, event: dict[str, object]) -> SendOutcome:
        try:
            response = await self._client.post(self._url, json=event)
        except httpx.HTTPError as exc:
            return SendOutcome(accepted=False, detail=f"{type(exc).__name__}: {exc}")
        try:
            data = response.json()
        except ValueError:
            data = {}
        text = f"{response.status_code} {data.get('status', '')}: {data.get('message', '')}"
        if response.status_code == 202:
            return SendOutcome(
                accepted=True,
                detail=text,
                reply_code=202,
                provider_id=str(data.get("dedup_key") or event.get("dedup_key")),
            )
        return SendOutcome(
            accepted=False,
            detail=text,
            refused_for_good=response.status_code == 400,
        )
