"""The whole-course temperature window and the words the dashboard shows for a reading.

Pure functions: the API's hourly-temperature endpoint and the patient page both take their
window from :func:`course_window`, so the two always show the same hours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

#: The longest window served from the hourly aggregate: one 28-day blinatumomab course.
COURSE = timedelta(days=28)

Basis = Literal["requested", "cycle_start", "course_length"]


@dataclass(frozen=True, slots=True)
class CourseWindow:
    """UTC hours from ``since`` (the start of an hour) up to ``until`` (now).

    ``basis`` says where ``since`` came from: the caller's ``since``, the patient's current
    cycle start, or 28 days back for a patient with no cycle recorded. ``capped`` is true when
    that start lay more than 28 days before the current hour and was moved up to it."""

    since: datetime
    until: datetime
    basis: Basis
    capped: bool


def floor_hour(at: datetime) -> datetime:
    """The start of the UTC hour ``at`` lies in (in UTC: a +05:30 zone's hours are not UTC's)."""
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def course_window(
    now: datetime, *, requested: datetime | None, cycle_start: datetime | None
) -> CourseWindow:
    """The window a whole-course plot covers.

    ``requested`` wins; else the current cycle's start (the newest ``cycle_start`` not after
    ``now``); else 28 days back. The start is taken to the start of its UTC hour (hourly
    buckets begin on the hour) and never lies more than 28 days before the current hour: at
    most 672 whole hours (28 days) and the current one. A requested start after ``now`` is a
    ValueError, as is a time without a UTC offset."""
    for value in (now, requested, cycle_start):
        if value is not None and value.utcoffset() is None:
            raise ValueError("times must carry a UTC offset")
    basis: Basis
    if requested is not None:
        if requested > now:
            raise ValueError("since is after now")
        start, basis = requested, "requested"
    elif cycle_start is not None and cycle_start <= now:
        start, basis = cycle_start, "cycle_start"
    else:
        start, basis = now - COURSE, "course_length"
    earliest = floor_hour(now) - COURSE
    if start < earliest:
        return CourseWindow(since=earliest, until=now, basis=basis, capped=True)
    return CourseWindow(since=floor_hour(start), until=now, basis=basis, capped=False)


def reading_text(reading: dict[str, Any]) -> str:
    """``37.0 °C``, or ``37.0 °C (98.6 °F as sent)`` for a reading the device sent in °F, so a
    clinician can repeat back the number the caregiver read."""
    celsius = f"{float(reading['value_c']):.1f} °C"
    if reading.get("original_unit") == "F" and reading.get("original_value") is not None:
        return f"{celsius} ({float(reading['original_value']):.1f} °F as sent)"
    return celsius
