"""The vocabulary of pages: why a page is sent (``PagePurpose``), what an alert phase calls for
(``purpose_of``), how a page id derives from its idempotency key, and the care team an alert
no care team covers is filed under; and routing: for a command of the escalation engine
(``domain.escalation``, which decides whom to page), on which channel and address each
recipient is paged, where an all clear goes, and where a page goes once its channel failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from schemas.events import AlertPhase

# pages.care_team_id is NOT NULL; this marks an escalation (and its pages) of an alert whose
# patient is not registered with any care team.
UNASSIGNED_CARE_TEAM: Final = "unassigned"

# Page ids are derived from the idempotency key so that a redelivered alert, a replay and a
# second notify instance all name the same page.
_PAGE_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:vigil:notify:page")


class PagePurpose(StrEnum):
    """Why a page is sent; it sets the wording of the message."""

    ALERT = "alert"
    ESCALATION = "escalation"
    ALL_CLEAR = "all_clear"
    # The first page of the alerts quiet hours held: one per recipient when they end, listing
    # every held alert nobody acknowledged (resolved ones as "resolved at ...").
    QUIET_DIGEST = "quiet_digest"
    # Not pages to a person: PagerDuty Events v2 acknowledge / resolve sent to the integration
    # that was triggered, so its incident follows what happened in Vigil.
    UPSTREAM_ACKNOWLEDGE = "upstream_acknowledge"
    UPSTREAM_RESOLVE = "upstream_resolve"
    # A message to a caregiver at home (``domain.caregiver``): its words are composed when it
    # is decided; no acknowledgement link, never cancelled by an acknowledgement.
    CAREGIVER = "caregiver"


def page_id_for(key: str) -> uuid.UUID:
    return uuid.uuid5(_PAGE_NAMESPACE, key)


def purpose_of(phase: AlertPhase) -> PagePurpose | None:
    """The page a phase calls for, or None when the phase is recorded only."""
    if phase is AlertPhase.START:
        return PagePurpose.ALERT
    if phase is AlertPhase.ESCALATE:
        return PagePurpose.ESCALATION
    if phase is AlertPhase.END:
        return PagePurpose.ALL_CLEAR
    # continue and de-escalate repeat an episode the clinician already holds; paging again
    # for each would train people to ignore the pager.
    return None


# -- who is paged, on which channel ------------------------------------------------------------

# Channel names, as ``contact_methods.channel`` and ``pages.channel`` store them.
EMAIL: Final = "email"
SMS: Final = "sms"
# A PagerDuty Events v2 integration (its routing key is the address).
PAGERDUTY: Final = "webhook"

# Page statuses of a page that reached its person, or may have: accepted by the provider, its
# delivery receipt, still in flight, or left unknown by a stop.
_MAY_HAVE_REACHED: Final = frozenset({"sent", "delivered", "sending", "unknown"})
# The key part of a fallback page sent because every channel of a person failed.
UNDELIVERABLE: Final = ":undeliverable"


class RecipientKind(StrEnum):
    """Who a page is for, as the engine names it (``<kind>:<id>``)."""

    PERSON = "person"
    # An address named by the policy itself; paged by e-mail.
    ADDRESS = "email"
    # The care team's fallback address: ``fallback:`` in the engine's ``paged``,
    # ``fallback:<care team>`` on a page.
    FALLBACK = "fallback"
    # A caregiver contact of the patient (``caregiver:<contact id>``): no failover to the care
    # team's addresses.
    CAREGIVER = "caregiver"


@dataclass(frozen=True, slots=True)
class Recipient:
    kind: RecipientKind
    id: str

    @classmethod
    def parse(cls, ref: str) -> Recipient:
        """``person:<id>``, ``email:<address>`` or ``fallback:[<care team>]``."""
        kind, _, rest = ref.partition(":")
        return cls(RecipientKind(kind), rest)

    @classmethod
    def fallback_of(cls, care_team_id: str) -> Recipient:
        return cls(RecipientKind.FALLBACK, care_team_id)

    @property
    def ref(self) -> str:
        return f"{self.kind.value}:{self.id}"


@dataclass(frozen=True, slots=True)
class ContactMethod:
    """One of a person's contact methods; they are tried in ``rank`` order."""

    rank: int
    channel: str
    address: str


@dataclass(frozen=True, slots=True)
class SentPage:
    """A page already written about the escalation (or its bundle) that asked someone to act:
    what the all clear is routed from."""

    recipient: Recipient
    rank: int
    channel: str
    address: str
    idempotency_key: str
    status: str
    created_at: datetime
    updated_at: datetime | None = None

    def on_behalf_of(self, recipient: Recipient) -> bool:
        """This page was for ``recipient``: their own, or the fallback address paged because
        every channel of theirs failed (its key names them before ``:undeliverable``)."""
        if self.recipient == recipient:
            return True
        return (
            self.recipient.kind is RecipientKind.FALLBACK
            and f":{recipient.ref}{UNDELIVERABLE}#" in self.idempotency_key
        )


@dataclass(frozen=True, slots=True)
class Deliver:
    """A page to write: for ``recipient`` at ``rank``, on ``channel`` to ``address``; its key is
    the command's key plus ``key_suffix``."""

    recipient: Recipient
    rank: int
    channel: str
    address: str
    has_next_channel: bool = False
    key_suffix: str = ""
    route_detail: str | None = None


@dataclass(frozen=True, slots=True)
class ResolveUpstream:
    """The all clear of a person reached through PagerDuty: no page of its own; the resolve
    event sent to the integration with the trigger's dedup_key is it (queued when the chain
    stops, whoever stops it)."""

    recipient: Recipient
    address: str


@dataclass(frozen=True, slots=True)
class ToFallback:
    """Nobody to page for this recipient: the care team's fallback address is paged instead."""

    reason: str


Route = Deliver | ResolveUpstream | ToFallback


def reached(recipient: Recipient, pages: Sequence[SentPage]) -> tuple[SentPage, ...]:
    """Where ``recipient`` was reached, or may have been: their pages (or the fallback pages
    sent for them) that a provider accepted, or may have; one per (recipient, rank, channel,
    address), in that order."""
    seen: dict[tuple[str, int, str, str], SentPage] = {}
    for page in pages:
        if page.status in _MAY_HAVE_REACHED and page.on_behalf_of(recipient):
            seen.setdefault((page.recipient.ref, page.rank, page.channel, page.address), page)
    return tuple(seen[k] for k in sorted(seen))


def last_paged_at(recipient: Recipient, pages: Sequence[SentPage]) -> datetime | None:
    """When ``recipient`` was last paged about the alert (a page reached them or may have; its
    delivery receipt counts): what ``all_clear_deferred_until`` compares with quiet hours. The
    fallback address counts every fallback page."""
    times = [
        max(p.created_at, p.updated_at or p.created_at)
        for p in pages
        if p.status in _MAY_HAVE_REACHED
        and (
            p.on_behalf_of(recipient)
            or (
                recipient.kind is RecipientKind.FALLBACK
                and not recipient.id
                and p.recipient.kind is RecipientKind.FALLBACK
            )
        )
    ]
    return max(times, default=None)


def route(
    recipient: Recipient,
    purpose: PagePurpose,
    contacts: Sequence[ContactMethod],
    sent: Sequence[SentPage] = (),
) -> tuple[Route, ...]:
    """Who is paged for one of the engine's commands, on which channel.

    - an address the policy names: e-mailed there;
    - a person: their first contact method (the later ones are the failover);
    - the all clear of a person: every channel a page about the alert reached them on, or may
      have (``sent``: the pages written about it so far), including the fallback address paged
      when all of theirs failed; PagerDuty's is the upstream resolve. Nothing reached: their
      first contact method, as for a page;
    - nobody to page (a person without contact methods, the fallback address itself): the care
      team's fallback address.
    """
    if recipient.kind is RecipientKind.ADDRESS and recipient.id:
        return (Deliver(recipient, 0, EMAIL, recipient.id),)
    if recipient.kind is RecipientKind.PERSON:
        if purpose is PagePurpose.ALL_CLEAR:
            where = reached(recipient, sent)
            if where:
                return tuple(_all_clear_to(recipient, page) for page in where)
        if contacts:
            first = contacts[0]
            if purpose is PagePurpose.ALL_CLEAR and first.channel == PAGERDUTY:
                return (ResolveUpstream(recipient, first.address),)
            return (
                Deliver(
                    recipient,
                    first.rank,
                    first.channel,
                    first.address,
                    has_next_channel=len(contacts) > 1,
                ),
            )
        return (ToFallback(f"person {recipient.id} has no contact method"),)
    if recipient.kind is RecipientKind.ADDRESS:
        return (ToFallback("escalation step names a schedule that no longer exists"),)
    return (ToFallback("paged through the fallback address before"),)


def _all_clear_to(recipient: Recipient, page: SentPage) -> Route:
    if page.channel == PAGERDUTY:
        return ResolveUpstream(page.recipient, page.address)
    if page.recipient.kind is RecipientKind.FALLBACK:
        return Deliver(
            page.recipient,
            page.rank,
            page.channel,
            page.address,
            key_suffix=UNDELIVERABLE,
            route_detail=f"every channel of {recipient.ref} failed",
        )
    return Deliver(page.recipient, page.rank, page.channel, page.address)


def after_failure(
    recipient: Recipient, failed_rank: int, contacts: Sequence[ContactMethod], *, next_channel: bool
) -> Deliver | ToFallback | None:
    """Where a page goes once its channel gave up: the person's next contact method (when the
    verdict allows one), else the care team's fallback address (``:undeliverable``), so a page
    never ends in silence; nothing after the fallback address itself failed."""
    if next_channel and recipient.kind is RecipientKind.PERSON:
        later = [m for m in contacts if m.rank > failed_rank]
        if later:
            return Deliver(
                recipient,
                later[0].rank,
                later[0].channel,
                later[0].address,
                has_next_channel=len(later) > 1,
            )
    if recipient.kind in (RecipientKind.FALLBACK, RecipientKind.CAREGIVER):
        return None
    return ToFallback(f"every channel of {recipient.ref} failed")
