"""A care team's registry seen from the care-team API, decided without I/O: which references of
a change point outside the team, and who is on call now and next in the team's time zone.

A schedule's participants, an override's person and a policy's targets must be the team's own
people and schedules: a change that names another team's (or nobody's) is refused, so one team
cannot page another team's staff or read their rotation through its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.api.domain.clocks import local_time


def unknown_refs(
    targets: Iterable[tuple[str, str]], people: Iterable[str], schedules: Iterable[str]
) -> list[str]:
    """The ``kind:ref`` of each ``(kind, ref)`` target that is not one of the team's people
    (``person``) or schedules (``schedule``), in the order given; e-mail addresses are free."""
    known = {"person": set(people), "schedule": set(schedules)}
    return [f"{kind}:{ref}" for kind, ref in targets if kind in known and ref not in known[kind]]


def team_zone(name: str | None) -> str:
    """The team's IANA zone; UTC when unset or unknown."""
    if not name:
        return "UTC"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return "UTC"
    return name


@dataclass(frozen=True, slots=True)
class Shift:
    """Who is on one schedule at ``at`` and who is next, times in ``timezone``: ``until`` is
    when the current person hands over to ``next_person_id`` (None: nobody else ever takes
    over). ``*_local`` are the same times as text with the zone named."""

    schedule_id: str
    name: str
    person_id: str | None
    person_name: str | None
    until: datetime | None
    until_local: str | None
    next_person_id: str | None
    next_person_name: str | None


def shift(
    schedule_id: str,
    name: str,
    person_id: str | None,
    next_at: datetime | None,
    next_person_id: str | None,
    zone: str,
    names: Mapping[str, str],
) -> Shift:
    """The shift as the API answers it: times moved into the team's ``zone``, people named
    (None for someone no longer in the team's registry)."""
    tz = ZoneInfo(zone)
    return Shift(
        schedule_id=schedule_id,
        name=name,
        person_id=person_id,
        person_name=None if person_id is None else names.get(person_id),
        until=None if next_at is None else next_at.astimezone(tz),
        until_local=None if next_at is None else local_time(next_at, zone),
        next_person_id=next_person_id if next_at is not None else None,
        next_person_name=None
        if next_at is None or next_person_id is None
        else names.get(next_person_id),
    )
