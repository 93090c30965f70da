"""The vocabulary of pages: why a page is sent (``PagePurpose``), what an alert phase calls for
(``purpose_of``), how a page id derives from its idempotency key, and the care team an alert
no care team covers is filed under. Whom to page is the escalation engine's
(``domain.escalation``).
"""

from __future__ import annotations

import uuid
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
