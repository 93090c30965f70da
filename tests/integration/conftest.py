"""Fixtures the integration tests of notify share: an SMTP server that keeps what it receives,
and a server that speaks Twilio's Messages resource (tests/support/notify.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.notify import SmtpSink, TwilioLikeServer


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def twilio() -> Iterator[TwilioLikeServer]:
    with TwilioLikeServer() as server:
        yield server
