"""Quiet hours: whether a low-priority alert is paged now or held for the digest at their end.

Pure (the instant is passed in; zoneinfo only). A care team's quiet hours are a daily window of
local wall-clock time in its IANA time zone, e.g. 22:00-07:00; a window whose start is later
than its end crosses midnight. Only LOW and INFO alerts are ever held: HIGH and MEDIUM are
paged at once whatever the hour, and that check comes before the window is even looked at.

Daylight-saving changes resolve towards **shorter** quiet hours, because a held alarm is the
risk and a page is not: a start or end time the clock skips (spring forward) is taken at the
instant the clock jumps; a start the clock shows twice (fall back) is taken the second time and
an end the first time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from schemas.events import AlertPriority

#: The only priorities quiet hours may hold. HIGH and MEDIUM are never held (IEC 60601-1-8
#: high/medium alarms call for a response now; a parent at home is waiting for the call).
HOLDABLE = frozenset({AlertPriority.LOW, AlertPriority.INFO})


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Every day from ``start`` to ``end`` local time in ``timezone`` (crosses midnight when
    ``start > end``)."""

    timezone: str
    start: time
    end: time

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # raises for an unknown zone: refuse it when it is defined
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("quiet hours are local wall-clock times, without an offset")
        if self.start == self.end:
            raise ValueError("quiet hours start and end at different times")


@dataclass(frozen=True, slots=True)
class QuietSpan:
    """One night's quiet hours as instants: ``[starts_at, ends_at)``."""

    starts_at: datetime
    ends_at: datetime


def quiet_span_at(quiet: QuietHours, at: datetime) -> QuietSpan | None:
    """The quiet hours ``at`` falls in, or None when it is outside them."""
    _aware(at)
    zone = ZoneInfo(quiet.timezone)
    today = at.astimezone(zone).date()
    crosses_midnight = quiet.start > quiet.end
    # A window that crosses midnight may have started the local day before.
    for start_day in (today - timedelta(days=1), today):
        end_day = start_day + timedelta(days=1) if crosses_midnight else start_day
        starts_at = _instant(start_day, quiet.start, zone, latest=True)
        ends_at = _instant(end_day, quiet.end, zone, latest=False)
        if starts_at <= at < ends_at:
            return QuietSpan(starts_at, ends_at)
    return None


def held_until(priority: AlertPriority, quiet: QuietHours | None, at: datetime) -> datetime | None:
    """When an alert of ``priority`` arriving ``at`` is paged if quiet hours hold it (the end of
    the quiet hours it arrived in), or None: page it now."""
    _aware(at)
    if priority not in HOLDABLE or quiet is None:
        return None
    span = quiet_span_at(quiet, at)
    return None if span is None else span.ends_at


def all_clear_deferred_until(
    priority: AlertPriority,
    quiet: QuietHours | None,
    at: datetime,
    last_paged_at: datetime | None,
) -> datetime | None:
    """When the all clear of an alert of ``priority`` resolving ``at`` is sent to one recipient,
    if not now: the end of the quiet hours ``at`` falls in. None: send it now.

    An all clear is information, not a page, and must not wake anyone at night for an alarm
    that did not: during quiet hours it waits for their end, **unless** the alert is HIGH (its
    all clear is never held, like its page) or ``last_paged_at`` (the latest page about the
    alert that reached this recipient, or may have) falls inside these quiet hours: the alarm
    woke them tonight, they are awake and waiting to hear how it ended.
    """
    _aware(at)
    if priority is AlertPriority.HIGH or quiet is None:
        return None
    span = quiet_span_at(quiet, at)
    if span is None:
        return None
    if last_paged_at is not None and last_paged_at >= span.starts_at:
        return None
    return span.ends_at


def _instant(day: date, wall: time, zone: ZoneInfo, *, latest: bool) -> datetime:
    """The UTC instant ``wall`` on ``day`` in ``zone``: the later of two readings when the clock
    shows it twice and ``latest``, else the earlier; the jump itself when the clock skips it."""
    readings = []
    for fold in (0, 1):
        local = datetime.combine(day, wall, tzinfo=zone).replace(fold=fold)
        instant = local.astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):
            readings.append(instant)
    if readings:
        return max(readings) if latest else min(readings)
    # Skipped: fold 0 reads it with the offset before the jump (an instant after the jump),
    # fold 1 with the offset after it (an instant before). The jump lies between them.
    after = datetime.combine(day, wall, tzinfo=zone).replace(fold=0).astimezone(UTC)
    before = datetime.combine(day, wall, tzinfo=zone).replace(fold=1).astimezone(UTC)
    offset_after = after.astimezone(zone).utcoffset()
    low, high = before, after
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(zone).utcoffset() == offset_after:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


def _aware(at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")
