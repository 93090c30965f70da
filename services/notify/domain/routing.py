"""Deciding what an alert phase means for paging: page someone, and whom, or only record it.

Pure: the caller looks up the care team's on-call address and the start page of the alert's
thread, then asks ``decide``. Writing the page, sending it and retrying are not done here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final, Literal

from schemas.events import Alert, AlertPhase, Page

Channel = Literal["email"]
CHANNEL_EMAIL: Final[Channel] = "email"

# pages.care_team_id is NOT NULL; this marks a page that no care team could be found for.
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


class Route(StrEnum):
    """How the recipient was found."""

    CARE_TEAM = "care_team"
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class OnCall:
    """The care team responsible for a patient and its on-call address (may be blank)."""

    care_team_id: str
    email: str


@dataclass(frozen=True, slots=True)
class ThreadRoot:
    """The start page of an alert episode; later phases reply to it and the all-clear follows it."""

    idempotency_key: str
    recipient: str
    care_team_id: str
    route: Route


@dataclass(frozen=True, slots=True)
class PageOrder:
    """A decision to page ``recipient`` about an alert phase."""

    purpose: PagePurpose
    channel: Channel
    recipient: str
    care_team_id: str
    route: Route
    route_detail: str | None
    idempotency_key: str
    page_id: uuid.UUID

    def to_page(self, alert: Alert, *, created_at: datetime) -> Page:
        return Page(
            page_id=self.page_id,
            alert_id=alert.alert_id,
            dedup_key=alert.dedup_key,
            patient_id=alert.patient_id,
            care_team_id=self.care_team_id,
            channel=self.channel,
            recipient=self.recipient,
            idempotency_key=self.idempotency_key,
            created_at=created_at,
        )


@dataclass(frozen=True, slots=True)
class RecordOnly:
    """The phase is kept in the alert log but nobody is paged for it."""

    reason: str


NotifyDecision = PageOrder | RecordOnly


def idempotency_key(alert_id: uuid.UUID, channel: str, recipient: str) -> str:
    """One delivery per (alert phase, channel, recipient); alert_id is per dedup_key+phase."""
    return f"{alert_id}:{channel}:{recipient}"


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


def decide(
    alert: Alert,
    *,
    oncall: OnCall | None,
    thread: ThreadRoot | None,
    fallback_email: str,
    channel: Channel = CHANNEL_EMAIL,
) -> NotifyDecision:
    """What to do about one alert phase.

    ``oncall`` is None when the patient is unknown; ``thread`` is the start page of the episode
    when one was sent. An alert that cannot be routed goes to ``fallback_email``: it never vanishes.
    """
    purpose = purpose_of(alert.phase)
    if purpose is None:
        return RecordOnly(reason=f"phase {alert.phase.value} updates the open page thread")

    if purpose is PagePurpose.ALL_CLEAR and thread is not None:
        # The all-clear goes to whoever received the start page, even after a shift hand-off:
        # that is the person holding the worry.
        return _order(
            alert, purpose, channel, thread.recipient, thread.care_team_id, thread.route, None
        )

    if oncall is None:
        return _order(
            alert,
            purpose,
            channel,
            fallback_email,
            UNASSIGNED_CARE_TEAM,
            Route.FALLBACK,
            f"patient {alert.patient_id} is not registered with a care team",
        )
    if not oncall.email.strip():
        return _order(
            alert,
            purpose,
            channel,
            fallback_email,
            oncall.care_team_id,
            Route.FALLBACK,
            f"care team {oncall.care_team_id} has no on-call address",
        )
    return _order(alert, purpose, channel, oncall.email, oncall.care_team_id, Route.CARE_TEAM, None)


def _order(
    alert: Alert,
    purpose: PagePurpose,
    channel: Channel,
    recipient: str,
    care_team_id: str,
    route: Route,
    route_detail: str | None,
) -> PageOrder:
    recipient = recipient.strip()
    key = idempotency_key(alert.alert_id, channel, recipient)
    return PageOrder(
        purpose=purpose,
        channel=channel,
        recipient=recipient,
        care_team_id=care_team_id,
        route=route,
        route_detail=route_detail,
        idempotency_key=key,
        page_id=page_id_for(key),
    )
