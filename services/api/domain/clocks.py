"""Infusion clocks for display: time to bag empty and time the infusion has been interrupted.

Pure functions of the pump's recent status reports; the dashboard shows them, the rules service
pages on its own clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


@dataclass(frozen=True, slots=True)
class PumpReport:
    device_time: datetime
    state: str
    rate_ml_h: float
    volume_remaining_ml: float


@dataclass(frozen=True, slots=True)
class InfusionClocks:
    """The clocks as of the pump's newest report (``as_of``, the pump's own clock): never
    counted against the server's clock, which the pump's may be ahead of or behind."""

    state: str | None
    bag_empty_at: datetime | None
    interrupted_for: timedelta | None
    as_of: datetime | None = None
    stopped_since: datetime | None = None


def infusion_clocks(reports: Sequence[PumpReport]) -> InfusionClocks:
    """Clocks from reports sorted by device time (oldest first)."""
    if not reports:
        return InfusionClocks(None, None, None)
    latest = reports[-1]
    bag_empty_at = None
    if latest.state == "running" and latest.rate_ml_h > 0:
        bag_empty_at = latest.device_time + timedelta(
            hours=latest.volume_remaining_ml / latest.rate_ml_h
        )
    interrupted_for = None
    since = None
    if latest.state != "running":
        since = latest.device_time
        for report in reversed(reports):
            if report.state == "running":
                break
            since = report.device_time
        interrupted_for = latest.device_time - since
    return InfusionClocks(latest.state, bag_empty_at, interrupted_for, latest.device_time, since)


def team_zone(zone: str) -> ZoneInfo:
    """The care team's zone; an unknown zone name is UTC."""
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def local_time(at: datetime, zone: str, *, seconds: bool = False) -> str:
    """``15 Jan 03:00 (Europe/Berlin)``: a time in the care team's zone, the zone named
    (``(UTC)`` for UTC and for an unknown zone name); ``03:00:07`` with ``seconds``. The month
    is always the English abbreviation, whatever the process's locale. A time without a UTC
    offset is refused: which instant it means is unknown."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("a time without a UTC offset cannot be shown in a zone")
    tz = team_zone(zone)
    local = at.astimezone(tz)
    clock = f"{local:%H:%M:%S}" if seconds else f"{local:%H:%M}"
    name = "UTC" if tz.key in ("UTC", "Etc/UTC") else tz.key
    return f"{local.day:02d} {MONTHS[local.month - 1]} {clock} ({name})"


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
