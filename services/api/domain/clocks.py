"""Infusion clocks for display: time to bag empty and time the infusion has been interrupted.

Pure functions of the pump's recent status reports; the dashboard shows them, the rules service
pages on its own clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class PumpReport:
    device_time: datetime
    state: str
    rate_ml_h: float
    volume_remaining_ml: float


@dataclass(frozen=True, slots=True)
class InfusionClocks:
    state: str | None
    bag_empty_at: datetime | None
    interrupted_for: timedelta | None


def infusion_clocks(reports: Sequence[PumpReport], now: datetime) -> InfusionClocks:
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
    if latest.state != "running":
        since = latest.device_time
        for report in reversed(reports):
            if report.state == "running":
                break
            since = report.device_time
        interrupted_for = max(timedelta(0), now - since)
    return InfusionClocks(latest.state, bag_empty_at, interrupted_for)
