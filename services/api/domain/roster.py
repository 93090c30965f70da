"""The roster: every patient of the caller's care teams on one screen, most urgent first.

Pure: the facts come in as read from the database (newest reading, newest pump report, the
devices bound now and when each was last heard from, the open alert episodes), the rows go out
with what the dashboard and the API show. A row states facts and their age, never a judgement
the rules service did not make: whether a temperature is a fever or a device is silent is what
the open alerts say (the rules decide that with the care team's own thresholds).

Urgency, most urgent first: an open alert nobody has acknowledged, by its priority; then an
acknowledged one, by its priority; then a pump that is not running; then no alert at all. Ties:
the older open alert first, then the patient id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.api.domain.clocks import local_time

#: The length of one blinatumomab cycle's continuous infusion.
CYCLE_DAYS = 28
PRIORITY_RANK = {"high": 0, "medium": 1, "low": 2, "info": 3}


@dataclass(frozen=True, slots=True)
class OpenAlert:
    dedup_key: str
    title: str
    priority: str
    opened_at: datetime
    acknowledged_by: str | None = None


@dataclass(frozen=True, slots=True)
class BoundDevice:
    device_id: str
    kind: str
    last_seen: datetime | None


@dataclass(frozen=True, slots=True)
class PatientFacts:
    patient_id: str
    care_team_id: str
    care_team_name: str
    timezone: str
    # The team's centre (organisation); None when it belongs to none.
    care_team_centre: str | None = None
    weight_kg: float | None = None
    cycle_start: datetime | None = None
    temperature_c: float | None = None
    temperature_at: datetime | None = None
    temperature_site: str | None = None
    pump_state: str | None = None
    pump_at: datetime | None = None
    rate_ml_h: float | None = None
    volume_remaining_ml: float | None = None
    battery_pct: float | None = None
    # When the pump last reported running, for a pump that is not running now.
    pump_running_at: datetime | None = None
    devices: tuple[BoundDevice, ...] = ()
    alerts: tuple[OpenAlert, ...] = ()


@dataclass(frozen=True, slots=True)
class RosterRow:
    patient_id: str
    care_team_id: str
    care_team_name: str
    timezone: str
    infusion_day: int | None
    infusion_day_text: str
    temperature_text: str
    temperature_age: timedelta | None
    pump_text: str
    bag_empty_at: datetime | None
    bag_text: str
    devices_text: tuple[str, ...]
    alerts: tuple[OpenAlert, ...]
    alerts_text: str
    urgency: tuple[int, float, str] = field(repr=False)
    #: When a pump that is not running now last reported running (named in ``pump_text``).
    pump_last_running_at: datetime | None = None
    #: The team's centre (organisation); None when it belongs to none.
    care_team_centre: str | None = None


def age_text(age: timedelta) -> str:
    """``just now``, ``7 min ago``, ``3 h 12 min ago``, ``2 d 4 h ago``; a time ahead of now
    (a device clock running fast) is ``ahead of now``."""
    seconds = int(age.total_seconds())
    if seconds < 0:
        return "ahead of now"
    if seconds < 60:
        return "just now"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min ago" if minutes else f"{hours} h ago"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h ago" if hours else f"{days} d ago"


def infusion_day(cycle_start: datetime | None, now: datetime) -> int | None:
    """Day 1 is the 24 h from the cycle's start; None before it or without a recorded start."""
    if cycle_start is None or now < cycle_start:
        return None
    return (now - cycle_start) // timedelta(days=1) + 1


def _day_text(day: int | None) -> str:
    if day is None:
        return "no cycle start recorded"
    if day > CYCLE_DAYS:
        return f"day {day} (past {CYCLE_DAYS})"
    return f"day {day} of {CYCLE_DAYS}"


def _pump(facts: PatientFacts, now: datetime) -> tuple[str, datetime | None, str]:
    """(pump text, predicted bag empty, bag text), as of the pump's own newest report."""
    if facts.pump_state is None or facts.pump_at is None:
        return "no pump report", None, "unknown"
    zone = facts.timezone
    text = f"{facts.pump_state}, reported {age_text(now - facts.pump_at)}"
    if facts.pump_state != "running":
        if facts.pump_running_at is not None:
            text += f"; last running at {local_time(facts.pump_running_at, zone)}"
        else:
            text += "; not reported running"
    if facts.battery_pct is not None:
        text += f"; battery {facts.battery_pct:.0f} %"
    if facts.volume_remaining_ml is None:
        return text, None, "unknown"
    bag = f"{facts.volume_remaining_ml:.0f} mL"
    empty_at = None
    if facts.pump_state == "running" and facts.rate_ml_h:
        empty_at = facts.pump_at + timedelta(hours=facts.volume_remaining_ml / facts.rate_ml_h)
        bag += f" at {facts.rate_ml_h:g} mL/h, empty about {local_time(empty_at, zone)}"
    else:
        bag += ", not running: no empty time"
    return text, empty_at, bag


def _devices(facts: PatientFacts, now: datetime) -> tuple[str, ...]:
    if not facts.devices:
        return ("no device bound",)
    return tuple(
        f"{d.kind} {d.device_id}: "
        + (f"last seen {age_text(now - d.last_seen)}" if d.last_seen else "never heard from")
        for d in facts.devices
    )


def _urgency(facts: PatientFacts) -> tuple[int, float, str]:
    unacknowledged = [a for a in facts.alerts if a.acknowledged_by is None]
    acknowledged = [a for a in facts.alerts if a.acknowledged_by is not None]
    for group, offset in ((unacknowledged, 0), (acknowledged, 10)):
        if group:
            top = min(PRIORITY_RANK.get(a.priority, 4) for a in group)
            oldest = min(a.opened_at for a in group if PRIORITY_RANK.get(a.priority, 4) == top)
            return (offset + top, oldest.timestamp(), facts.patient_id)
    if facts.pump_state is not None and facts.pump_state != "running":
        return (20, 0.0, facts.patient_id)
    return (30, 0.0, facts.patient_id)


def roster_row(facts: PatientFacts, now: datetime) -> RosterRow:
    day = infusion_day(facts.cycle_start, now)
    if facts.temperature_c is not None and facts.temperature_at is not None:
        age: timedelta | None = now - facts.temperature_at
        site = f" ({facts.temperature_site})" if facts.temperature_site else ""
        temperature = f"{facts.temperature_c:.1f} °C{site}, {age_text(now - facts.temperature_at)}"
    else:
        age, temperature = None, "no reading"
    pump, empty_at, bag = _pump(facts, now)
    alerts = tuple(
        sorted(facts.alerts, key=lambda a: (PRIORITY_RANK.get(a.priority, 4), a.opened_at))
    )
    if alerts:
        waiting = sum(1 for a in alerts if a.acknowledged_by is None)
        alerts_text = f"{len(alerts)} open" + (f", {waiting} not acknowledged" if waiting else "")
    else:
        alerts_text = "none open"
    return RosterRow(
        patient_id=facts.patient_id,
        care_team_id=facts.care_team_id,
        care_team_name=facts.care_team_name,
        timezone=facts.timezone,
        infusion_day=day,
        infusion_day_text=_day_text(day),
        temperature_text=temperature,
        temperature_age=age,
        pump_text=pump,
        bag_empty_at=empty_at,
        bag_text=bag,
        devices_text=_devices(facts, now),
        alerts=alerts,
        alerts_text=alerts_text,
        urgency=_urgency(facts),
        pump_last_running_at=(
            facts.pump_running_at
            if facts.pump_state is not None and facts.pump_state != "running"
            else None
        ),
        care_team_centre=facts.care_team_centre,
    )


SORTS = ("urgency", "patient", "day", "bag")


def roster(facts: Iterable[PatientFacts], now: datetime, sort: str = "urgency") -> list[RosterRow]:
    """The rows, sorted: ``urgency`` (default), ``patient`` (id), ``day`` (furthest into the
    cycle first), ``bag`` (soonest predicted empty first; none last)."""
    rows = [roster_row(f, now) for f in facts]
    return sort_rows(rows, sort)


def sort_rows(rows: Sequence[RosterRow], sort: str) -> list[RosterRow]:
    if sort == "patient":
        return sorted(rows, key=lambda r: r.patient_id)
    if sort == "day":
        return sorted(rows, key=lambda r: (-(r.infusion_day or 0), r.patient_id))
    if sort == "bag":
        far = datetime.max.replace(tzinfo=UTC)
        return sorted(rows, key=lambda r: (r.bag_empty_at or far, r.patient_id))
    if sort == "urgency":
        return sorted(rows, key=lambda r: r.urgency)
    raise ValueError(f"unknown sort {sort!r}; one of {', '.join(SORTS)}")
