"""Burst bundling: whether a patient's alert is paged at once or waits for a follow-up page.

Pure (times passed in, no clock, no I/O); the shell keeps each patient's window and pending
follow-up in PostgreSQL.

The rule, per patient:

- An alert arriving when no window is open is **paged at once** (a bundle of one, due now: it
  takes the same path and latency as with bundling off) and opens a window
  ``[at, at + group_wait_s)``. A safety-critical first alarm never waits for a burst that may
  not come.
- Further alerts arriving inside the window join **one follow-up bundle due when the window
  closes**; the due time never moves, so none of them waits longer than ``group_wait_s``.
- The window is half-open: an alert arriving exactly at its end, or later, starts afresh (paged
  at once, new window), because the follow-up is being paged at that instant.
- The follow-up's page does **not** open a new window (no Alertmanager ``group_interval``):
  only an alert paged at once opens one. That keeps the bound simple (every alert waits zero or at
  most ``group_wait_s``) and caps a patient at two pages per window, while a new
  condition after the window is told at once instead of waiting behind the last burst.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from schemas.events import AlertPriority

# Five seconds: a pump's alarm cascade (occlusion -> infusion stopped -> ...) arrives within a
# few seconds, and the whole device-to-handset budget is 30 s. The window no longer delays the
# first alarm; it bounds how long the rest of a burst waits for its one follow-up page.
DEFAULT_GROUP_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class BundleWindow:
    """A patient's latest window: opened by an alert paged at once, closing ``group_wait_s``
    later; ``follow_up`` holds the dedup keys waiting for the follow-up page (empty: none)."""

    opened_at: datetime
    closes_at: datetime
    follow_up: tuple[str, ...] = ()


class Placement(StrEnum):
    PAGE_NOW = "page_now"  # no open window: paged at once, and a window opens
    FOLLOW_UP = "follow_up"  # inside the window: waits for the follow-up page at its end
    ALREADY = "already"  # the dedup key waits in the follow-up already (a redelivery)


@dataclass(frozen=True, slots=True)
class BundleDecision:
    """Where the alert goes, when it is paged, and the window the shell keeps afterwards."""

    placement: Placement
    due_at: datetime
    window: BundleWindow


def place(
    window: BundleWindow | None, *, dedup_key: str, at: datetime, group_wait_s: float
) -> BundleDecision:
    """Where an alert for the window's patient arriving ``at`` goes."""
    _aware(at)
    if group_wait_s < 0:
        raise ValueError("group_wait_s cannot be negative")
    if window is not None and window.opened_at <= at < window.closes_at:
        if dedup_key in window.follow_up:
            return BundleDecision(Placement.ALREADY, window.closes_at, window)
        joined = BundleWindow(window.opened_at, window.closes_at, (*window.follow_up, dedup_key))
        return BundleDecision(Placement.FOLLOW_UP, window.closes_at, joined)
    if window is not None and at < window.opened_at:
        # A clock behind the one that opened the window (another instance): joining would wait
        # longer than group_wait_s, so page at once and leave the window as it is.
        return BundleDecision(Placement.PAGE_NOW, at, window)
    opened = BundleWindow(opened_at=at, closes_at=at + timedelta(seconds=group_wait_s))
    return BundleDecision(Placement.PAGE_NOW, at, opened)


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
