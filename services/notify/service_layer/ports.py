"""What the service layer needs from the outside world, as protocols, plus the values they return.

The PostgreSQL, SMTP and Kafka adapters implement these; unit tests pass in-memory fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import Protocol
from uuid import UUID

from schemas.events import Alert, Page
from services.notify.domain import PagePurpose
from services.notify.domain.escalation import EarlyCycle
from services.notify.domain.message import FIRST_PAGE, PageContext

# recipient_ref of a page sent to a care team's fallback address.
FALLBACK_PREFIX = "fallback:"
# notify_bundles.kind of the alerts quiet hours held.
QUIET_DIGEST_KIND = "quiet_digest"
# notify_bundles.kind of a technical alert held to see whether it outlasts the technical hold.
TECHNICAL_HOLD_KIND = "technical_hold"


@dataclass(frozen=True, slots=True)
class PageJob:
    """One claimed escalation page: everything needed to compose and send it on its channel."""

    page: Page
    alert: Alert
    escalation_id: UUID
    recipient_ref: str
    contact_rank: int
    purpose: PagePurpose
    tries: int
    was_sending: bool
    has_next_channel: bool
    claimed_at: datetime
    updated_at: datetime | None
    # Set for a page shared by the escalations of a bundle: every alert it lists, in order.
    bundle_id: UUID | None = None
    bundle: tuple[Alert, ...] = ()
    # "burst" (a patient's alarms within group_wait) or "quiet_digest" (held by quiet hours).
    bundle_kind: str | None = None
    # For each alert of ``bundle``: when it resolved, None while it is still active.
    resolved_at: tuple[datetime | None, ...] = ()
    # The escalation's frozen ``PolicySnapshot.early_cycle``: the alert is in the CRS window
    # (the page says so, and how the chain differs for it). None for any other alert.
    early_cycle: EarlyCycle | None = None
    # What the page says beyond its alert: the care team's time zone, which repeat it is, since
    # when the episode is open, the all clear's own alert, readings as the device sent them.
    context: PageContext = FIRST_PAGE
    # The ``delivery_attempts.attempt`` this job's outcome is recorded on: the attempt written
    # ``in_flight`` before the page is handed to the provider or, for a page found in flight
    # after a stop (``was_sending``), the attempt then recorded ``unknown`` until it is resolved.
    # None: no attempt was opened (a provider's failure receipt), a new row is written.
    attempt: int | None = None
    # ``attempt`` is that unknown attempt, already counted in ``tries``: its outcome resolves
    # it rather than adding one.
    resolving: bool = False
    # Found in flight after a stop, and its chain was acknowledged or resolved since: its outcome
    # is looked up where the provider allows it, and it is not sent again.
    chain_stopped: bool = False
    # A caregiver page (purpose ``caregiver``): its subject and body as decided
    # (``caregiver_messages``); None for any other page, or when its words are missing.
    caregiver: tuple[str, str] | None = None

    @property
    def is_digest(self) -> bool:
        return self.bundle_kind == QUIET_DIGEST_KIND


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What the mail server said about one message."""

    accepted: bool
    detail: str
    reply_code: int | None = None
    # The provider's own id for the message (Twilio's sid, PagerDuty's dedup_key), when known.
    provider_id: str | None = None
    # Set by non-SMTP channels for an answer that no retry can change (bad number, bad key).
    refused_for_good: bool = False
    # Nothing can tell whether the provider took the page (an attempt cut short by a stop):
    # recorded ``unknown``, neither sent nor failed.
    unknown: bool = False
    # When the provider answered (set by the service as the send returns): the attempt's
    # time. None (an outcome no provider gave now: reconciled, left unknown) takes the time
    # the batch's outcomes are recorded.
    answered_at: datetime | None = None

    @property
    def permanent(self) -> bool:
        """A 5xx SMTP reply or a final refusal: retrying the same message will not help."""
        if self.refused_for_good:
            return True
        return self.reply_code is not None and 500 <= self.reply_code < 600


class NotifyRepository(Protocol):
    async def record_alert(self, alert: Alert) -> bool:
        """Store an alert phase; False when it was already stored."""
        ...


class PageSender(Protocol):
    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        """Hand one message to the mail server; failures are returned, never raised."""
        ...
