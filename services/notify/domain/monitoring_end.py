"""Whether a new alert of a patient whose monitoring has ended may still page.

The care-team API records a patient's end of infusion and discharge (``patients``); the rules
stop paging from those times, but they learn of them only at their next configuration reload,
so an alert decided in between (a timer falling due, a reading already in flight) can still
reach notify. Notify checks it when it takes the alert in hand, on the alert's device time,
as the rules do:

- from the discharge on (a device time at or after it, the discharge instant included:
  the rules' own comparison), no alert of the patient is paged;
- from the end of infusion on, no alert raised on one of their pumps is paged (fever is still
  watched until the discharge);
- a caregiver's own request for a call is a person asking, not a monitoring rule: it is paged
  whatever the discharge.

Pure: what the patient's record says comes in, the reason not to page (or None) goes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.notify.domain.caregiver import Category, category_of
from services.notify.domain.cover import Agreement

#: Why an alert was not paged (the timeline's ``not_paged`` entry, the audit, the metric).
DISCHARGED = "discharged"
INFUSION_ENDED = "infusion ended"


@dataclass(frozen=True, slots=True)
class PatientStanding:
    """What notify needs of a patient's record to route a new alert: their care team, when
    their infusion ended and when they were discharged (None: not recorded), and whether the
    alert's device is a pump."""

    care_team_id: str
    infusion_ended_at: datetime | None = None
    discharged_at: datetime | None = None
    device_is_pump: bool = False
    # The regional-cover agreements in force in which the patient's team is covered
    # (``domain.cover``): who is paged depends on the moment the alert opens.
    cover: tuple[Agreement, ...] = ()


def why_not_paged(
    standing: PatientStanding | None, *, device_time: datetime, rule_id: str
) -> str | None:
    """Why an alert of ``device_time`` raised by ``rule_id`` must page nobody: ``discharged``
    or ``infusion ended``; None while the patient is monitored (or unknown to the registry:
    such an alert goes to the fallback chain, never dropped)."""
    if standing is None or category_of(rule_id) is Category.CALL_REQUEST:
        return None
    if standing.discharged_at is not None and device_time >= standing.discharged_at:
        return DISCHARGED
    if (
        standing.device_is_pump
        and standing.infusion_ended_at is not None
        and device_time >= standing.infusion_ended_at
    ):
        return INFUSION_ENDED
    return None
