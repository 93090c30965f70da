"""Who is on call at a given instant: rotations that hand off at a wall-clock time, and overrides.

Pure: the instant is passed in. A rotation hands off at ``handoff_time`` in its own time zone
(zoneinfo), so a 08:00 hand-off stays at 08:00 local across daylight-saving changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True)
class Override:
    """``person_id`` covers the schedule from ``starts_at`` (inclusive) to ``ends_at``."""

    person_id: str
    starts_at: datetime
    ends_at: datetime


@dataclass(frozen=True, slots=True)
class Rotation:
    """Participants take ``shift_days``-day shifts in order, the first from ``start_date``."""

    schedule_id: str
    timezone: str
    start_date: date
    handoff_time: time
    shift_days: int
    participants: tuple[str, ...]
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # raises for an unknown zone: refuse it when it is defined
        if self.shift_days < 1:
            raise ValueError("shift_days must be at least 1")


def on_call_at(rotation: Rotation, at: datetime) -> str | None:
    """The person on call at ``at``; None before the rotation starts or when it has nobody."""
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    # The latest override wins when two overlap: it is the most recent decision someone made.
    for override in reversed(rotation.overrides):
        if override.starts_at <= at < override.ends_at:
            return override.person_id
    if not rotation.participants:
        return None
    local = at.astimezone(ZoneInfo(rotation.timezone))
    shift_day = local.date()
    if local.time().replace(tzinfo=None) < rotation.handoff_time:
        # Before today's hand-off the previous day's shift is still on.
        shift_day -= timedelta(days=1)
    days = (shift_day - rotation.start_date).days
    if days < 0:
        return None
    index = (days // rotation.shift_days) % len(rotation.participants)
    return rotation.participants[index]


def next_change(rotation: Rotation, at: datetime) -> tuple[datetime, str | None] | None:
    """When the person on call next changes after ``at``, and who takes over (None: nobody);
    None when nobody else ever takes over (one participant and no override ahead).

    The on-call person can only change at a hand-off or at an override's start or end, so those
    instants are tried in order: every day's hand-off over one whole turn of the rotation (and
    the day it starts, if later) and every override boundary after ``at``."""
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    now = on_call_at(rotation, at)
    zone = ZoneInfo(rotation.timezone)
    first_day = at.astimezone(zone).date() - timedelta(days=1)
    turn = rotation.shift_days * max(1, len(rotation.participants)) + 2
    days = [first_day + timedelta(days=n) for n in range(turn)]
    if rotation.start_date > first_day:
        days.append(rotation.start_date)
    candidates = {datetime.combine(day, rotation.handoff_time, tzinfo=zone) for day in days}
    for override in rotation.overrides:
        candidates.update((override.starts_at, override.ends_at))
    for instant in sorted(c for c in candidates if c > at):
        who = on_call_at(rotation, instant)
        if who != now:
            return instant, who
    return None
