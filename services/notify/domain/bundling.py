"""Burst bundling: which pending page a new alert for a patient joins, and when a bundle is due.

Pure (times passed in, no clock, no I/O). A bundle opens with the first alert of a patient and
is due exactly ``group_wait_s`` later; the due time never moves, so no alert waits longer than
the window for its page (a HIGH alert included: bundling trades at most ``group_wait_s`` for one
page instead of several). The window is half-open, ``[opened_at, opened_at + group_wait_s)``:
an alert arriving exactly at the due time starts its own bundle, because the bundle it would
have joined is being paged at that instant. An alert arriving after a bundle was paged starts a
new bundle (a new condition gets a page of its own rather than a quiet update of a page that may
already be acknowledged). The shell stores pending bundles in PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from schemas.events import AlertPriority

# Five seconds: bedside monitors already hold a continuous-parameter alarm about 6 s, a pump's
# alarm cascade (occlusion -> infusion stopped -> ...) arrives within a few seconds, and the
# whole device-to-handset budget is 30 s, so 5 s folds a burst at a sixth of that budget.
DEFAULT_GROUP_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class PendingBundle:
    """A patient's bundle that has not been paged yet."""

    opened_at: datetime
    due_at: datetime
    members: tuple[str, ...]


class Placement(StrEnum):
    JOIN = "join"  # the alert waits with the pending bundle
    ALREADY = "already"  # the dedup key is in the pending bundle already (a redelivery)
    START = "start"  # the alert opens a new bundle, due group_wait_s from now


@dataclass(frozen=True, slots=True)
class BundleDecision:
    placement: Placement
    due_at: datetime


def place(
    pending: PendingBundle | None, *, dedup_key: str, at: datetime, group_wait_s: float
) -> BundleDecision:
    """Where an alert arriving ``at`` goes: into ``pending`` or into a new bundle."""
    _aware(at)
    if group_wait_s < 0:
        raise ValueError("group_wait_s cannot be negative")
    if pending is not None and at < pending.due_at:
        if dedup_key in pending.members:
            return BundleDecision(Placement.ALREADY, pending.due_at)
        return BundleDecision(Placement.JOIN, pending.due_at)
    return BundleDecision(Placement.START, at + timedelta(seconds=group_wait_s))


def is_due(bundle: PendingBundle, now: datetime) -> bool:
    """A bundle is paged at its due time, not a moment later."""
    _aware(now)
    return now >= bundle.due_at


def is_bundled(members: tuple[str, ...]) -> bool:
    """A bundle of one alert is paged as a plain alert (its own thread, its own dedup key)."""
    return len(members) > 1


_RANK = {
    AlertPriority.HIGH: 3,
    AlertPriority.MEDIUM: 2,
    AlertPriority.LOW: 1,
    AlertPriority.INFO: 0,
}


def bundle_priority(priorities: tuple[AlertPriority, ...]) -> AlertPriority:
    """A bundle is as urgent as its most urgent alert."""
    if not priorities:
        raise ValueError("a bundle has at least one alert")
    return max(priorities, key=_RANK.__getitem__)


def _aware(at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
