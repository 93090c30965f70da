"""What the summaries notify sends beside escalations have in common (the outage summary,
``outage.py``; the cover summary, ``cover_summary.py``): the e-mail, one try through the
channel registry, and when to try again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from uuid import UUID

from services.notify.domain.backoff import backoff_delay_s
from services.notify.domain.message import message_id_for
from services.notify.service_layer.channels import ChannelRegistry, OutboundPage, not_configured
from services.notify.service_layer.ports import SendOutcome
from vigil.runtime import log_fields


def summary_email(
    *,
    sender: str,
    recipient: str,
    subject: str,
    body: str,
    now: datetime,
    purpose: str,
    page_id: UUID,
) -> EmailMessage:
    """The e-mail of a summary. Its Message-ID is the same on every try, so a mail system
    that got it once can drop a repeat."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = message_id_for(f"{purpose.replace('_', '-')}:{page_id}")
    message["X-Vigil-Purpose"] = purpose
    message.set_content(body)
    return message


async def try_summary(
    channels: ChannelRegistry,
    *,
    channel: str,
    page_id: UUID,
    recipient: str,
    email: Callable[[], EmailMessage],
    text: Callable[[], str],
    event: Callable[[], dict[str, object]],
    purpose: str,
    log: logging.Logger,
) -> SendOutcome:
    """One try of a summary on its channel. A channel with no sender here, or a sender that
    raises, is a failed try with its reason (a channel's bug must not stop the clock round),
    logged to ``log`` as ``<purpose>_send_crashed``."""
    sender = channels.get(channel)
    if sender is None:
        return not_configured(channel)
    try:
        return await sender.send(
            OutboundPage(recipient=recipient, email=email, text=text, event=event)
        )
    except Exception as exc:
        log.exception(f"{purpose}_send_crashed", extra=log_fields(page_id=str(page_id)))
        return SendOutcome(False, f"{type(exc).__name__}: {exc}")


def next_try_in(
    outcome: SendOutcome, tries: int, *, max_tries: int, base_s: float, cap_s: float
) -> float | None:
    """Seconds until the next try of a summary, None when there is none: sent, refused for
    good, or ``max_tries`` made."""
    if outcome.accepted or outcome.permanent or tries >= max_tries:
        return None
    return backoff_delay_s(tries, base_s=base_s, cap_s=cap_s)
