"""notify's HTTP routers over an in-memory escalation service: the signed acknowledgement links
and Twilio's webhooks (status codes, bodies, what reaches the service), and that nothing else is
served: a care team's paging is managed through the care-team API. The same routes against
PostgreSQL are exercised by tests/integration/test_notify_escalation.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest

from services.notify.adapters.twilio import twilio_signature
from services.notify.api import create_app
from services.notify.domain.ack_token import AckClaim, InvalidAckToken
from services.notify.service_layer.escalation import AckOutcome, AckResult
from services.notify.settings import NotifySettings

NOW = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


class FakeEscalations:
    """``EscalationCommands`` in memory: records every call, answers what a test sets."""

    def __init__(self) -> None:
        self.valid_tokens: dict[str, UUID] = {}
        self.sms: list[tuple[str, str]] = []
        self.statuses: list[tuple[str, str, str | None]] = []

    def check_token(self, token: str) -> AckClaim:
        if token not in self.valid_tokens:
            raise InvalidAckToken("forged")
        return AckClaim(self.valid_tokens[token], "email:a@example.org", NOW + timedelta(hours=1))

    async def acknowledge_token(self, token: str) -> AckResult:
        if token not in self.valid_tokens:
            return AckResult(AckOutcome.REFUSED, detail="forged")
        return AckResult(AckOutcome.ACKNOWLEDGED, self.valid_tokens.pop(token))

    async def acknowledge_sms(self, *, sender: str, body: str) -> AckResult:
        self.sms.append((sender, body))
        if body.strip() != "1":
            return AckResult(AckOutcome.REFUSED, detail="reply 1 to acknowledge")
        return AckResult(AckOutcome.ACKNOWLEDGED, uuid.uuid4())

    async def sms_status(self, *, message_sid: str, status: str, error_code: str | None) -> bool:
        self.statuses.append((message_sid, status, error_code))
        return True


@dataclass
class Api:
    client: httpx.AsyncClient
    service: FakeEscalations


@asynccontextmanager
async def _api(**settings: Any) -> AsyncIterator[Api]:
    service = FakeEscalations()
    app = create_app(NotifySettings(**settings), service=service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notify.test") as client:
        yield Api(client, service)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with _api() as api:
        yield api


# -- acknowledgement links and Twilio ---------------------------------------------------------


async def test_ack_links_and_twilio_webhooks_need_no_bearer_token(api: Api) -> None:
    """The signed link and Twilio's signature are their credentials: no header is asked for."""
    api.service.valid_tokens["tok"] = uuid.uuid4()
    assert (await api.client.get("/ack/tok")).status_code == 200
    assert (await api.client.post("/twilio/status", data={"MessageSid": "SM1"})).status_code == 204


async def test_ack_link_get_only_shows_a_button_and_post_acknowledges_once(api: Api) -> None:
    """A mail scanner's GET acknowledges nothing; the POST does, a second POST is refused."""
    api.service.valid_tokens["tok"] = uuid.uuid4()
    page = await api.client.get("/ack/tok")
    assert page.status_code == 200
    assert '<form method="post" action="/ack/tok">' in page.text
    assert "tok" in api.service.valid_tokens
    done = await api.client.post("/ack/tok")
    assert (done.status_code, "Acknowledged. Escalation stopped." in done.text) == (200, True)
    again = await api.client.post("/ack/tok")
    assert again.status_code == 410
    assert "Not acknowledged: forged." in again.text


async def test_ack_link_with_a_bad_token_is_410_and_escapes_it(api: Api) -> None:
    page = await api.client.get("/ack/<b>")
    assert page.status_code == 410
    assert "This link cannot be used: forged." in page.text


async def test_twilio_webhooks_are_refused_without_twilios_signature() -> None:
    """With an auth token set, an unsigned or wrongly signed form is 403 and reaches nothing;
    Twilio's own signature of the public URL and the form is accepted (the control)."""
    async with _api(twilio_auth_token="a" * 32, public_base_url="https://vigil.example") as api:
        form = {"From": "+15550001", "Body": "1"}
        assert (await api.client.post("/twilio/sms", data=form)).status_code == 403
        bad = {"X-Twilio-Signature": "nope"}
        assert (await api.client.post("/twilio/sms", data=form, headers=bad)).status_code == 403
        assert api.service.sms == []
        signed = {
            "X-Twilio-Signature": twilio_signature(
                "a" * 32, "https://vigil.example/twilio/sms", form
            )
        }
        reply = await api.client.post("/twilio/sms", data=form, headers=signed)
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/xml")
        assert "<Message>Acknowledged. Escalation stopped.</Message>" in reply.text
        assert api.service.sms == [("+15550001", "1")]


async def test_sms_status_callback_is_passed_on(api: Api) -> None:
    form = {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert (await api.client.post("/twilio/status", data=form)).status_code == 204
    assert api.service.statuses == [("SM1", "undelivered", "30003")]


# -- nothing else ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("put", "/care-teams/CT-1"),
        ("get", "/people/p1"),
        ("get", "/schedules/s1/oncall"),
        ("put", "/care-teams/CT-1/quiet-hours"),
        ("get", "/care-teams/CT-1/early-cycle-escalation"),
        ("get", "/pipeline-outages"),
        ("get", "/alerts/k1/timeline"),
        ("post", "/alerts/k1/acknowledge"),
        ("post", "/alerts/k1/snooze"),
    ],
)
async def test_the_former_management_routes_are_not_served(
    api: Api, method: str, path: str
) -> None:
    """A care team's paging, alerts and outages are the care-team API's (``/api/...``)."""
    assert (await api.client.request(method, path, json={})).status_code == 404


async def test_openapi_operations_keep_their_ids_and_order(api: Api) -> None:
    """Clients are generated from the operation ids: moving a route between routers must not
    rename or reorder them."""
    document = (await api.client.get("/openapi.json")).json()
    operations = [
        operation["operationId"]
        for methods in document["paths"].values()
        for operation in methods.values()
    ]
    assert operations == [
        "ack_page_ack__token__get",
        "ack_link_ack__token__post",
        "sms_reply_twilio_sms_post",
        "sms_status_twilio_status_post",
    ]
