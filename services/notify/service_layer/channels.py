"""The channels a page goes out on, behind one protocol, and the registry they are found in.

A ``Channel`` takes an ``OutboundPage`` (the page's address on that channel and its forms: the
e-mail, the short text, the PagerDuty event, each composed only when a channel asks for it)
and returns the provider's answer as a ``SendOutcome``; it never raises for a delivery problem.
``EscalationService`` and ``OutageWatch`` look the channel up by ``pages.channel`` in a
``ChannelRegistry`` built by the composition root (``bootstrap.py``): a new channel is one
adapter implementing ``Channel`` and its registration there. The e-mail, SMS and PagerDuty
channels below are thin wrappers over their providers' ports (``adapters/smtp.py``,
``adapters/twilio.py``, ``adapters/pagerduty.py`` implement those).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Protocol

from services.notify.domain.routing import EMAIL, PAGERDUTY, SMS
from services.notify.service_layer.ports import PageSender, SendOutcome


@dataclass(frozen=True, slots=True)
class OutboundPage:
    """One page as every channel could send it; a channel calls the form it sends."""

    # The address on the page's channel: an e-mail address, a phone number, a routing key.
    recipient: str
    email: Callable[[], EmailMessage]
    # The short text an SMS (or any text-only channel) carries.
    text: Callable[[], str]
    # The PagerDuty Events v2 event.
    event: Callable[[], dict[str, object]]


class Channel(Protocol):
    @property
    def name(self) -> str:
        """As ``contact_methods.channel`` and ``pages.channel`` store it."""
        ...

    async def send(self, page: OutboundPage) -> SendOutcome:
        """Hand the page to the provider; failures are returned, never raised."""
        ...

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        """The provider's id of a page to ``to`` carrying ``reference`` that it took after
        ``since``; None when it has none or cannot tell (a channel with no lookup)."""
        ...

    @property
    def lookup_note(self) -> str:
        """Why a page cut short by a stop stays unknown on this channel (``find_sent`` found
        nothing, or there is no lookup): the delivery log's words."""
        ...


class ChannelRegistry(Mapping[str, Channel]):
    """The channels this instance can send on, by name."""

    def __init__(self, channels: Iterable[Channel] = ()) -> None:
        self._channels: dict[str, Channel] = {}
        for channel in channels:
            if channel.name in self._channels:
                raise ValueError(f"channel {channel.name!r} registered twice")
            self._channels[channel.name] = channel

    def __getitem__(self, name: str) -> Channel:
        return self._channels[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._channels)

    def __len__(self) -> int:
        return len(self._channels)


def not_configured(channel: str) -> SendOutcome:
    """A page for a channel this instance has no sender for: refused for good, never retried
    on that channel."""
    return SendOutcome(
        accepted=False, detail=f"{channel} channel not configured", refused_for_good=True
    )


# -- the providers' ports and the channels over them -------------------------------------------


class SmsProvider(Protocol):
    async def send_sms(self, *, to: str, body: str) -> SendOutcome: ...

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None: ...


class EventProvider(Protocol):
    async def enqueue(self, event: dict[str, object]) -> SendOutcome: ...


class EmailChannel:
    """Pages by e-mail through a mail server (``adapters.smtp.SmtpSender``). E-mail has no
    delivery lookup."""

    name = EMAIL
    lookup_note = "e-mail has no delivery lookup"

    def __init__(self, sender: PageSender) -> None:
        self._sender = sender

    async def send(self, page: OutboundPage) -> SendOutcome:
        return await self._sender.send(page.email(), recipient=page.recipient)

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return None


class SmsChannel:
    """Pages by SMS (``adapters.twilio.TwilioSms``); a message is found by the reference in
    its text."""

    name = SMS
    lookup_note = "the provider's message list did not confirm it"

    def __init__(self, provider: SmsProvider) -> None:
        self._provider = provider

    async def send(self, page: OutboundPage) -> SendOutcome:
        return await self._provider.send_sms(to=page.recipient, body=page.text())

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return await self._provider.find_sent(to=to, reference=reference, since=since)


class PagerDutyChannel:
    """Pages as PagerDuty Events v2 events (``adapters.pagerduty.PagerDutyEvents``); an event
    resent with the same dedup_key folds onto its incident, and there is no lookup."""

    name = PAGERDUTY
    lookup_note = "PagerDuty has no lookup of an event"

    def __init__(self, provider: EventProvider) -> None:
        self._provider = provider

    async def send(self, page: OutboundPage) -> SendOutcome:
        return await self._provider.enqueue(page.event())

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return None


def provider_channels(
    *, email: PageSender | None, sms: SmsProvider | None, webhook: EventProvider | None
) -> ChannelRegistry:
    """The registry of the three providers' channels, those given."""
    channels: list[Channel] = []
    if email is not None:
        channels.append(EmailChannel(email))
    if sms is not None:
        channels.append(SmsChannel(sms))
    if webhook is not None:
        channels.append(PagerDutyChannel(webhook))
    return ChannelRegistry(channels)
