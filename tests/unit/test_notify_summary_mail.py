"""The summaries' shared sending: the e-mail, one try through the channels, the next try."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from services.notify.service_layer.channels import ChannelRegistry, OutboundPage
from services.notify.service_layer.ports import SendOutcome
from services.notify.service_layer.summary_mail import next_try_in, summary_email, try_summary

NOW = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
PAGE = uuid.UUID("00000000-0000-4000-8000-000000000001")
LOG = logging.getLogger("test.summary_mail")


class _Channel:
    def __init__(self, name: str, outcome: SendOutcome | Exception) -> None:
        self.name = name
        self.outcome = outcome
        self.sent: list[OutboundPage] = []

    async def send(self, page: OutboundPage) -> SendOutcome:
        self.sent.append(page)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return None

    @property
    def lookup_note(self) -> str:
        return "no lookup"


def _email() -> EmailMessage:
    return summary_email(
        sender="vigil@example.org",
        recipient="oncall@example.org",
        subject="Overnight",
        body="One fever, acknowledged.",
        now=NOW,
        purpose="cover_summary",
        page_id=PAGE,
    )


def test_the_email_is_the_same_message_on_every_try() -> None:
    first, again = _email(), _email()
    assert first["Message-ID"] == again["Message-ID"]
    assert first["X-Vigil-Purpose"] == "cover_summary"
    assert (first["From"], first["To"], first["Subject"]) == (
        "vigil@example.org",
        "oncall@example.org",
        "Overnight",
    )
    assert first.get_content().strip() == "One fever, acknowledged."
    other = summary_email(
        sender="vigil@example.org",
        recipient="oncall@example.org",
        subject="Overnight",
        body="x",
        now=NOW,
        purpose="outage_summary",
        page_id=PAGE,
    )
    assert other["Message-ID"] != first["Message-ID"]


async def _try(registry: ChannelRegistry, channel: str = "email") -> SendOutcome:
    return await try_summary(
        registry,
        channel=channel,
        page_id=PAGE,
        recipient="oncall@example.org",
        email=_email,
        text=lambda: "Overnight",
        event=lambda: {},
        purpose="cover_summary",
        log=LOG,
    )


async def test_a_try_is_the_channels_answer() -> None:
    channel = _Channel("email", SendOutcome(True, "250 ok"))
    outcome = await _try(ChannelRegistry([channel]))
    assert outcome.accepted and outcome.detail == "250 ok"
    assert [page.recipient for page in channel.sent] == ["oncall@example.org"]


async def test_a_channel_not_configured_is_refused_for_good() -> None:
    channel = _Channel("email", SendOutcome(True, "250 ok"))
    outcome = await _try(ChannelRegistry([channel]), channel="sms")
    assert not outcome.accepted and outcome.permanent
    assert channel.sent == []


async def test_a_channel_that_raises_is_a_failed_try(caplog: pytest.LogCaptureFixture) -> None:
    channel = _Channel("email", RuntimeError("boom"))
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        outcome = await _try(ChannelRegistry([channel]))
    assert not outcome.accepted and not outcome.permanent
    assert outcome.detail == "RuntimeError: boom"
    assert [r.message for r in caplog.records] == ["cover_summary_send_crashed"]


def test_next_try() -> None:
    failed = SendOutcome(False, "451 try later")
    assert next_try_in(failed, 1, max_tries=5, base_s=2.0, cap_s=60.0) is not None
    assert next_try_in(failed, 5, max_tries=5, base_s=2.0, cap_s=60.0) is None
    assert next_try_in(SendOutcome(True, "ok"), 1, max_tries=5, base_s=2.0, cap_s=60.0) is None
    refused = SendOutcome(False, "550 no such user", refused_for_good=True)
    assert next_try_in(refused, 1, max_tries=5, base_s=2.0, cap_s=60.0) is None
