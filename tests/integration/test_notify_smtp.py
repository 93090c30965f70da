"""The SMTP adapter against a real SMTP server (aiosmtpd on 127.0.0.1, a free port)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any
from uuid import UUID

import pytest
from aiosmtpd.controller import Controller

from schemas.events import Page
from services.notify.adapters.smtp import SmtpSender
from services.notify.domain import compose_page_email, message_id_for, page_id_for
from tests.factories import make_alert

REFUSED = "nobody@hospital.example"
ONCALL_EMAIL = "oncall-onc1@hospital.example"
AT = datetime(2025, 3, 1, 2, 0, 2, tzinfo=UTC)


@dataclass
class CollectingHandler:
    """Keeps every accepted message; refuses one address the way a real relay does."""

    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    # Hook names are aiosmtpd's (handle_<SMTP verb>).
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address == REFUSED:
            return "550 5.1.1 <nobody@hospital.example>: Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued as VIGILTEST1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def smtp_server() -> Iterator[tuple[CollectingHandler, int]]:
    handler = CollectingHandler()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def _sender(port: int) -> SmtpSender:
    return SmtpSender(
        host="127.0.0.1", port=port, envelope_from="vigil-pages@localhost", timeout_s=5
    )


def _page_email(recipient: str) -> EmailMessage:
    alert = make_alert(
        patient_id="P-0001",
        code="FEVER_SINGLE",
        at=AT,
        alert_id=UUID("00000000-0000-5000-8000-000000000001"),
        dedup_key="P-0001:fever",
        device_id="thermo-17",
        rule_version="2025.03.1",
    )
    key = f"{alert.alert_id}:email:{recipient}"
    page = Page(
        page_id=page_id_for(key),
        alert_id=alert.alert_id,
        dedup_key=alert.dedup_key,
        patient_id=alert.patient_id,
        care_team_id="CT-ONC-1",
        channel="email",
        recipient=recipient,
        idempotency_key=key,
        created_at=AT,
    )
    return compose_page_email(
        alert,
        page,
        sender="vigil-pages@localhost",
        composed_at=AT,
    )


async def test_page_email_reaches_the_server_intact(
    smtp_server: tuple[CollectingHandler, int],
) -> None:
    """The server receives one message for the on-call address with subject and body fields."""
    handler, port = smtp_server
    message = _page_email(ONCALL_EMAIL)

    outcome = await _sender(port).send(message, recipient=ONCALL_EMAIL)

    assert outcome.accepted, outcome.detail
    assert outcome.reply_code == 250
    assert "queued as VIGILTEST1" in outcome.detail
    assert len(handler.received) == 1
    mail_from, rcpt_tos, content = handler.received[0]
    assert mail_from == "vigil-pages@localhost"
    assert rcpt_tos == [ONCALL_EMAIL]
    received = message_from_bytes(content, policy=policy.default)
    assert isinstance(received, EmailMessage)
    assert received["To"] == ONCALL_EMAIL
    assert received["Subject"] == "[VIGIL HIGH] Fever 38.6 °C — patient P-0001"
    assert received["Message-ID"] == message["Message-ID"]
    assert received["Message-ID"] == message_id_for(
        f"00000000-0000-5000-8000-000000000001:email:{ONCALL_EMAIL}"
    )
    assert received["X-Vigil-Dedup-Key"] == "P-0001:fever"
    body = received.get_content()
    assert "Patient:      P-0001" in body
    assert "Device:       thermo-17" in body
    assert "temperature: 38.6 °C >= limit 38.3 °C" in body
    assert "fever.single version 2025.03.1" in body
    assert "ACTION: call the caregiver of patient P-0001 now." in body


async def test_refused_recipient_is_a_failed_outcome_with_the_reason(
    smtp_server: tuple[CollectingHandler, int],
) -> None:
    """A 550 on RCPT comes back as a permanent failure carrying the server's words, not a raise."""
    handler, port = smtp_server

    outcome = await _sender(port).send(_page_email(REFUSED), recipient=REFUSED)

    assert not outcome.accepted
    assert outcome.reply_code == 550
    assert outcome.permanent
    assert "recipient refused" in outcome.detail
    assert "Recipient address rejected" in outcome.detail
    assert handler.received == []


async def test_unreachable_server_is_a_retryable_failure() -> None:
    """Nobody listening on the port gives a non-permanent failure naming the connection error."""
    outcome = await _sender(_free_port()).send(_page_email(ONCALL_EMAIL), recipient=ONCALL_EMAIL)

    assert not outcome.accepted
    assert outcome.reply_code is None
    assert not outcome.permanent
    assert "ConnectionRefusedError" in outcome.detail
