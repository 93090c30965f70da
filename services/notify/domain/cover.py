"""Regional cover: when a covering care team acts for a covered one, decided without I/O.

A cover agreement names a covering team, a covered team and the hours of cover in one time zone:
the days on which a window starts (Monday 0 to Sunday 6), the local time it starts and the local
time it ends (an end not after the start ends the next day, so 20:00-08:00 runs across midnight;
an end equal to the start is 24 hours), and exception dates on which no window starts. Windows
are taken on the zone's wall clock and compared as instants, so the night of a clock change is an
hour shorter or longer. A start or end that falls in the hour a spring change skips is read with
the offset before the change (02:30 becomes 03:30); one that falls in the hour an autumn change
repeats is its first occurrence.

Outside every window the covered team alone sees its patients and is paged. Only the newest
signed-off version of an agreement is in force; a revoked version ends the agreement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True)
class CoverHours:
    timezone: str
    days: frozenset[int]
    starts: time
    ends: time
    exceptions: frozenset[date] = frozenset()

    def __post_init__(self) -> None:
        ZoneInfo(self.timezone)  # an unknown zone raises here, before anything is stored
        if not self.days or not self.days <= frozenset(range(7)):
            raise ValueError("days are 0 (Monday) to 6 (Sunday), at least one")
        if self.starts.tzinfo is not None or self.ends.tzinfo is not None:
            raise ValueError("starts and ends are wall-clock times without an offset")


@dataclass(frozen=True, slots=True)
class Window:
    starts: datetime  # aware
    ends: datetime  # aware, after starts
    local_date: date  # the local date the window starts on


def _at(day: date, moment: time, zone: ZoneInfo) -> datetime:
    # fold=0: the first of a repeated hour; a skipped hour keeps the offset before the change.
    local = datetime.combine(day, moment, tzinfo=zone)
    return local.astimezone(ZoneInfo("UTC"))


def window_on(hours: CoverHours, day: date) -> Window | None:
    """The window that starts on local date ``day``; None when no window starts that day."""
    if day.weekday() not in hours.days or day in hours.exceptions:
        return None
    zone = ZoneInfo(hours.timezone)
    start = _at(day, hours.starts, zone)
    end_day = day if hours.ends > hours.starts else day + timedelta(days=1)
    end = _at(end_day, hours.ends, zone)
    if end <= start:  # a window squeezed to nothing by a clock change
        return None
    return Window(start, end, day)


def window_at(hours: CoverHours, at: datetime) -> Window | None:
    """The window in force at instant ``at`` (aware); None outside cover."""
    if at.tzinfo is None:
        raise ValueError("at must be aware")
    local_day = at.astimezone(ZoneInfo(hours.timezone)).date()
    for day in (local_day - timedelta(days=1), local_day):
        window = window_on(hours, day)
        if window is not None and window.starts <= at < window.ends:
            return window
    return None


def last_window(hours: CoverHours, at: datetime) -> Window | None:
    """The latest window that had ended by ``at`` (aware), within the eight days before it; the
    night a morning summary tells of."""
    if at.tzinfo is None:
        raise ValueError("at must be aware")
    local_day = at.astimezone(ZoneInfo(hours.timezone)).date()
    for back in range(9):
        window = window_on(hours, local_day - timedelta(days=back))
        if window is not None and window.ends <= at:
            return window
    return None


@dataclass(frozen=True, slots=True)
class Agreement:
    """The version of an agreement in force (the newest signed off)."""

    agreement_id: str
    version: int
    covering_team_id: str
    covered_team_id: str
    hours: CoverHours
    signed_off_at: datetime
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class CoverGrant:
    """A covered team the covering team acts for at that moment, and the agreement that allows
    it (named in every audit entry of what is done under it)."""

    agreement_id: str
    version: int
    covering_team_id: str
    covered_team_id: str
    ends: datetime


def _in_force(agreements: Iterable[Agreement], at: datetime) -> list[tuple[Agreement, Window]]:
    found = []
    for agreement in agreements:
        if agreement.revoked:
            continue
        window = window_at(agreement.hours, at)
        if window is not None:
            found.append((agreement, window))
    # Two agreements covering one team at once: the one signed off first acts.
    found.sort(key=lambda pair: (pair[0].signed_off_at, pair[0].agreement_id))
    return found


def grants(
    teams: frozenset[str], agreements: Iterable[Agreement], at: datetime
) -> list[CoverGrant]:
    """The covered teams that ``teams`` (a user's care teams) act for at ``at``, one grant per
    covered team; a team already among ``teams`` needs no grant."""
    chosen: dict[str, CoverGrant] = {}
    for agreement, window in _in_force(agreements, at):
        covered = agreement.covered_team_id
        if covered in teams or covered in chosen:
            continue
        if agreement.covering_team_id not in teams:
            continue
        chosen[covered] = CoverGrant(
            agreement.agreement_id,
            agreement.version,
            agreement.covering_team_id,
            covered,
            window.ends,
        )
    return list(chosen.values())


@dataclass(frozen=True, slots=True)
class PagedTeam:
    """Whose on-call is paged for an alert of ``covered_team_id``'s patient: the team itself, or
    the covering team under ``agreement`` (thresholds and the protocol stay the covered team's)."""

    care_team_id: str
    covered_team_id: str
    agreement_id: str | None = None
    version: int | None = None
    window_ends: datetime | None = None

    @property
    def covering(self) -> bool:
        return self.agreement_id is not None


def paged_team(care_team_id: str, agreements: Iterable[Agreement], at: datetime) -> PagedTeam:
    """Who is paged for an alert of a ``care_team_id`` patient opened at ``at``."""
    for agreement, window in _in_force(agreements, at):
        if agreement.covered_team_id == care_team_id:
            return PagedTeam(
                agreement.covering_team_id,
                care_team_id,
                agreement.agreement_id,
                agreement.version,
                window.ends,
            )
    return PagedTeam(care_team_id, care_team_id)
