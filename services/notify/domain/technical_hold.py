"""The technical hold: whether a technical alert is paged now or only if it outlasts a short hold.

Pure (the instant is passed in). A technical condition that comes and goes within minutes (a
pump silent while its hub reconnects, a sensor reading out of range once, a battery warning the
pump withdraws) is noise at 3 a.m.: paging it and its all clear wakes a nurse twice for nothing.
So a **technical** alert of **MEDIUM, LOW or INFO** priority is held for ``hold_s`` seconds
after it arrives: if its end arrives inside the hold it is recorded and never paged; if it is
still open when the hold ends, it is paged then, like any alert. A **HIGH** alert and every
**physiological** alert are never held: this function returns "page now" for them before it
looks at the hold length.

A **device silence** (rule ``device_silent``) is held longer, ``silence_hold_s``: a home's Wi-Fi
dropout of up to an hour is routine (the hub buffers both devices' data and forwards it when the
link is back, and the pump alarms at the bedside meanwhile), so the silence is on the dashboard
from its limit but pages only when it outlasts this hold too. The silence hold is never shorter
than the technical hold, and a technical hold of 0 turns both off.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from schemas.events import AlertKind, AlertPriority

#: The hold of ``VIGIL_NOTIFY_TECHNICAL_HOLD_S`` unless set: a pump whose hub reconnects, a
#: sensor fault the next reading clears, end within minutes; a condition still open after five
#: is worth a page.
DEFAULT_TECHNICAL_HOLD_S = 300.0

#: The hold of ``VIGIL_NOTIFY_SILENCE_HOLD_S`` unless set: with the rules' 15-min pump silence
#: limit, a pump not heard from for 60 min is paged (a hub dropout forwards its buffer well
#: within that), still three hours before the 4-hour supervised-restart limit.
DEFAULT_SILENCE_HOLD_S = 2700.0

#: The rules whose alerts say "nothing has arrived from this device" (services/rules).
SILENCE_RULES = frozenset({"device_silent"})

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


def hold_seconds(rule_id: str, hold_s: float, silence_hold_s: float) -> float:
    """The hold for an alert of ``rule_id``: ``silence_hold_s`` for a device silence (never less
    than ``hold_s``), ``hold_s`` for every other rule; 0 when the technical hold is off."""
    if hold_s <= 0:
        return 0.0
    if rule_id in SILENCE_RULES:
        return max(hold_s, silence_hold_s)
    return hold_s
