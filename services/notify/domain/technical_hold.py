"""The technical hold: whether a technical alert is paged now or only if it outlasts a short hold.

Pure (the instant is passed in). A technical condition that comes and goes within minutes (a
pump silent while its hub reconnects, a sensor reading out of range once, a battery warning the
pump withdraws) is noise at 3 a.m.: paging it and its all clear wakes a nurse twice for nothing.
So a **technical** alert of **MEDIUM, LOW or INFO** priority is held for ``hold_s`` seconds
after it arrives: if its end arrives inside the hold it is recorded and never paged; if it is
still open when the hold ends, it is paged then, like any alert. A **HIGH** alert and every
**physiological** alert are never held: this function returns "page now" for them before it
looks at the hold length.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from schemas.events import AlertKind, AlertPriority

#: The hold of ``VIGIL_NOTIFY_TECHNICAL_HOLD_S`` unless set: a pump whose hub reconnects, a
#: sensor fault the next reading clears, end within minutes; a condition still open after five
#: is worth a page.
DEFAULT_TECHNICAL_HOLD_S = 300.0

#: The priorities a technical alert may be held at. HIGH is never held.
HOLDABLE_TECHNICAL = frozenset({AlertPriority.MEDIUM, AlertPriority.LOW, AlertPriority.INFO})


def technical_hold_until(
    kind: AlertKind, priority: AlertPriority, at: datetime, hold_s: float
) -> datetime | None:
    """When an alert of ``kind`` and ``priority`` arriving ``at`` is paged if it is still open
    (the end of its hold), or None: page it now (physiological, HIGH, or no hold set)."""
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    if kind is not AlertKind.TECHNICAL or priority not in HOLDABLE_TECHNICAL or hold_s <= 0:
        return None
    return at + timedelta(seconds=hold_s)
