"""Home infusion courses with ground truth: what a family's devices send, when it reaches the
broker, and what really happened. Pure: no I/O, no clock; a seed gives the same course.

Each simulated home has an ambulatory pump and one thermometer, behind a home hub:

- **Spot-check thermometer** (every other home): the caregiver measures about four times a day
  at home-typical local times (morning, midday, after school, bedtime; each about 5 % skipped),
  and during a fever notices it within 45 min and re-measures about hourly until a reading is
  under 37.8 °C (and once more after it). Oral readings.
- **Continuous patch** (the other homes): a reading every 5 minutes (site ``skin_patch``), with
  about 1.5 probe-off episodes a day (10-40 min) whose readings are 33-35 °C.
- **Pump**: a status every minute; a 24-hour bag (240 mL at 10 mL/h) changed routinely a little
  before it runs out (30-100 min of drug left): paused 3-8 min, ``bag_changed``, restarted; the
  battery swapped at each bag change. A change falls behind only when another pump event is
  going on at its time; a running bag with 30 min of drug or less left and no change recorded
  is then a true ``bag_at_risk``.
- **Hub dropouts** (home Wi-Fi): about one a day, 10-60 min; the hub buffers both devices'
  messages and forwards them when the link is back, with their original device times, message
  ids and seqs, in device-time order, so they reach the broker late.
- **True events**: fevers (``single``: a peak of 38.4-39.2 °C for 1-3 h; ``sustained``: a
  plateau of 38.1-38.2 °C for 3-6 h; both on top of the circadian swing of ±0.15 °C, so a
  sustained fever near the 04:00 low sits at 37.95-38.05 °C), occlusions (downstream, cleared
  after 5-40 min), low batteries (cleared by a battery swap after 20-90 min) and pump stops (the
  infusion stopped for 45-150 min, then restarted).

**What counts as a fever** in the ground truth is the documented fever definition (one reading
≥ 38.3 °C, or ≥ 38.0 °C for 60 min; docs/rules.md) applied to the child's simulated core
temperature, minute by minute, with the thermometers' error (``READING_MARGIN_C``: readings are
the core plus noise of sd 0.03-0.04 °C, rounded to 0.1 °C) on the safe side of each limit:

- ``fever``: the core was ≥ 38.4 °C at some minute, or ≥ 38.1 °C for 60 minutes in a row. Every
  thermometer reading then meets the definition too: a page is owed (recall is measured on these).
- ``borderline_fever``: the core came within the margin of a limit (≥ 37.9 °C) but did not meet
  the definition by more than the margin: the readings may or may not show a fever, so no page
  is owed and a fever page during it is not a false page.

A fever's span runs from the first minute the core is ≥ 37.9 °C (a reading may show 38.0) to
the last minute it is ≥ 37.7 °C (a reading may still show 37.8, which clears nothing).

``plan_course`` returns a ``Course``: its homes, ``ground_truth`` (every true event, probe-off
episode and dropout, with patient, device, start and end) and ``deliveries()``, every message in
the order the hubs deliver them to the broker (``deliver_at``; a buffered message's is its
dropout's end).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Any
from uuid import NAMESPACE_URL, uuid5
from zoneinfo import ZoneInfo

from schemas.device import (
    PumpAlarmCode,
    PumpEvent,
    PumpEventKind,
    PumpState,
    PumpStatus,
    TemperatureReading,
    TemperatureSite,
    TemperatureUnit,
)
from schemas.topics import topic_for

_MESSAGE_ID_NAMESPACE = uuid5(NAMESPACE_URL, "urn:vigil:simulator:course-message")

BAG_RATE_ML_H = 10.0
BAG_VOLUME_ML = 240.0
PUMP_STATUS_INTERVAL = timedelta(minutes=1)
#: The documented fever definition (docs/rules.md, the rules' defaults).
FEVER_SINGLE_C = 38.3
FEVER_SUSTAINED_C = 38.0
FEVER_SUSTAINED_FOR = timedelta(minutes=60)
FEVER_CLEAR_C = 37.8
#: How far a thermometer reading can sit from the core it measures: rounding to 0.1 °C
#: (±0.05) plus the simulated noise (sd 0.03-0.04 °C), rounded up.
READING_MARGIN_C = 0.1
#: The rules' default lead of "bag at risk of running dry" (``bag_change_lead_minutes``).
BAG_AT_RISK_LEAD = timedelta(minutes=30)
PATCH_INTERVAL = timedelta(minutes=5)
#: Local times a caregiver usually takes a spot-check reading, with how far they wander.
SPOT_CHECK_TIMES: tuple[tuple[time, int], ...] = (
    (time(7, 30), 30),
    (time(12, 30), 45),
    (time(17, 30), 45),
    (time(21, 15), 30),
)
SPOT_CHECK_SKIP = 0.05
#: Events per home per day (Poisson); durations in minutes.
RATES_PER_DAY: dict[str, float] = {
    "fever": 0.3,
    "occlusion": 0.4,
    "low_battery": 0.15,
    "pump_stop": 0.15,
    "dropout": 1.0,
    "probe_off": 1.5,
}
DURATIONS_MIN: dict[str, tuple[float, float]] = {
    "occlusion": (5, 40),
    "low_battery": (20, 90),
    "pump_stop": (45, 150),
    "dropout": (10, 60),
    "probe_off": (10, 40),
}


class EventKind(StrEnum):
    FEVER = "fever"
    OCCLUSION = "occlusion"
    LOW_BATTERY = "low_battery"
    PUMP_STOP = "pump_stop"
    #: A fever within the thermometers' error of the definition: never owed a page, and a
    #: fever page during it is not false.
    BORDERLINE_FEVER = "borderline_fever"
    #: A running bag with no change recorded and at most ``BAG_AT_RISK_LEAD`` of drug left (a
    #: routine change held up by another pump event): owed the bag-at-risk page.
    BAG_AT_RISK = "bag_at_risk"
    #: Not clinical: recorded so a page can be explained, never owed a page.
    DROPOUT = "dropout"
    PROBE_OFF = "probe_off"


#: The events a clinician must be paged about (recall is measured for these).
PAGED_KINDS: tuple[EventKind, ...] = (
    EventKind.FEVER,
    EventKind.OCCLUSION,
    EventKind.PUMP_STOP,
    EventKind.LOW_BATTERY,
    EventKind.BAG_AT_RISK,
)


class ThermometerKind(StrEnum):
    SPOT_CHECK = "spot_check"
    PATCH = "patch"


@dataclass(frozen=True, slots=True)
class TrueEvent:
    """Something that really happened to a patient's device or body, start to end."""

    kind: EventKind
    patient_id: str
    device_id: str
    start: datetime
    end: datetime
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "patient_id": self.patient_id,
            "device_id": self.device_id,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "detail": self.detail,
        }

    @staticmethod
    def from_json(row: dict[str, Any]) -> TrueEvent:
        return TrueEvent(
            EventKind(row["kind"]),
            row["patient_id"],
            row["device_id"],
            datetime.fromisoformat(row["start"]),
            datetime.fromisoformat(row["end"]),
            row.get("detail", ""),
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One device message as the hub hands it to the broker."""

    deliver_at: datetime
    topic: str
    message: TemperatureReading | PumpStatus | PumpEvent
    buffered: bool

    @property
    def device_id(self) -> str:
        return self.message.device_id

    def payload(self) -> bytes:
        return self.message.model_dump_json(by_alias=True).encode()


@dataclass(frozen=True, slots=True)
class CourseSpec:
    patients: int = 10
    days: float = 6.0
    seed: int = 1
    #: Device time of the course's first moment; aware.
    start: datetime = datetime(2025, 1, 6, 8, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    #: The homes' (and care team's) time zone: spot checks follow its clock, nights are in it.
    zone: str = "Europe/Berlin"
    #: Patient ids are ``<prefix>-NN``: a run names its own patients.
    id_prefix: str = "PAB"

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if self.patients < 1 or self.days <= 0:
            raise ValueError("a course needs at least one patient and a positive length")

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)


@dataclass(slots=True)
class Home:
    patient_id: str
    thermometer_id: str
    pump_id: str
    thermometer: ThermometerKind
    events: list[TrueEvent] = field(default_factory=list)
    _messages: list[tuple[datetime, int, Any]] = field(default_factory=list)

    def dropouts(self) -> list[TrueEvent]:
        return [e for e in self.events if e.kind is EventKind.DROPOUT]


def _windows(
    rng: random.Random,
    start: datetime,
    end: datetime,
    per_day: float,
    minutes: tuple[float, float],
    taken: list[tuple[datetime, datetime]],
    gap: timedelta = timedelta(minutes=30),
) -> list[tuple[datetime, datetime]]:
    """Poisson-placed windows of ``minutes`` that overlap none of ``taken`` (nor each other)."""
    out: list[tuple[datetime, datetime]] = []
    days = (end - start).total_seconds() / 86400
    count = _poisson(rng, per_day * days)
    for _ in range(count):
        for _attempt in range(20):
            length = timedelta(minutes=rng.uniform(*minutes))
            begin = start + timedelta(seconds=rng.uniform(1800, (end - start).total_seconds()))
            if begin + length > end - timedelta(minutes=10):
                continue
            if any(begin < b + gap and a < begin + length + gap for a, b in taken + out):
                continue
            out.append((begin, begin + length))
            break
    return sorted(out)


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method; the means here are small.
    limit, k, p = pow(2.718281828459045, -mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


class _Seq:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.next = 1

    def take(self) -> tuple[Any, int]:
        seq = self.next
        self.next += 1
        return uuid5(_MESSAGE_ID_NAMESPACE, f"{self.device_id}/{seq}"), seq


@dataclass(slots=True)
class _Fever:
    rise_at: datetime
    peak_c: float
    plateau: timedelta
    rise: timedelta = timedelta(minutes=40)
    fall: timedelta = timedelta(minutes=90)

    def bump(self, t: datetime, baseline: float) -> float:
        """Degrees above the baseline at ``t``."""
        height = self.peak_c - baseline
        into = (t - self.rise_at).total_seconds()
        rise, plateau, fall = (x.total_seconds() for x in (self.rise, self.plateau, self.fall))
        if into < 0 or into > rise + plateau + fall:
            return 0.0
        if into < rise:
            return height * into / rise
        if into < rise + plateau:
            return height
        return height * (1 - (into - rise - plateau) / fall)


class _Body:
    """A child's core temperature over the course."""

    def __init__(self, rng: random.Random, zone: ZoneInfo) -> None:
        self.baseline = rng.uniform(36.6, 36.9)
        self.zone = zone
        self.fevers: list[_Fever] = []

    def core(self, t: datetime) -> float:
        local = t.astimezone(self.zone)
        hour = local.hour + local.minute / 60
        # Lowest around 04:00, highest around 16:00.
        circadian = 0.15 * -_cos_hours(hour - 4.0)
        bump = max((f.bump(t, self.baseline) for f in self.fevers), default=0.0)
        return self.baseline + circadian + bump


def _cos_hours(hours: float) -> float:
    import math

    return math.cos(2 * math.pi * hours / 24)


def _plan_home(spec: CourseSpec, number: int) -> Home:
    rng = random.Random(f"{spec.seed}/home/{number}")
    zone = ZoneInfo(spec.zone)
    patient_id = f"{spec.id_prefix}-{number:02d}"
    home = Home(
        patient_id,
        f"thermo-{patient_id}",
        f"pump-{patient_id}",
        ThermometerKind.SPOT_CHECK if number % 2 else ThermometerKind.PATCH,
    )
    start, end = spec.start, spec.end
    body = _Body(rng, zone)

    # Fevers: alternately single and sustained, away from each other.
    noticed_from: list[datetime] = []
    fever_windows = _windows(rng, start, end, RATES_PER_DAY["fever"], (240, 480), [])
    for i, (begin, _) in enumerate(fever_windows):
        if (i + number) % 2:
            fever = _Fever(begin, rng.uniform(38.4, 39.2), timedelta(minutes=rng.uniform(60, 180)))
        else:
            fever = _Fever(begin, rng.uniform(38.1, 38.2), timedelta(minutes=rng.uniform(180, 360)))
        body.fevers.append(fever)
        truth = _fever_truth(body, fever, patient_id, home.thermometer_id)
        if truth is not None:
            home.events.append(truth)
        noticed_from.append(_noticeable_from(body, fever))

    # Pump events, none overlapping another.
    taken: list[tuple[datetime, datetime]] = []
    pump_plan: list[tuple[EventKind, datetime, datetime]] = []
    for kind in (EventKind.OCCLUSION, EventKind.PUMP_STOP, EventKind.LOW_BATTERY):
        for a, b in _windows(
            rng, start, end, RATES_PER_DAY[kind.value], DURATIONS_MIN[kind.value], taken
        ):
            taken.append((a, b))
            pump_plan.append((kind, a, b))
    pump_plan.sort(key=lambda x: x[1])

    dropouts = _windows(
        rng, start, end, RATES_PER_DAY["dropout"], DURATIONS_MIN["dropout"], [], timedelta(hours=2)
    )
    for a, b in dropouts:
        home.events.append(TrueEvent(EventKind.DROPOUT, patient_id, "hub", a, b))

    messages: list[tuple[datetime, str, Any]] = []
    if home.thermometer is ThermometerKind.SPOT_CHECK:
        messages += _spot_checks(rng, spec, home, body, noticed_from)
    else:
        probe_off = _windows(
            rng, start, end, RATES_PER_DAY["probe_off"], DURATIONS_MIN["probe_off"], []
        )
        for a, b in probe_off:
            home.events.append(
                TrueEvent(EventKind.PROBE_OFF, patient_id, home.thermometer_id, a, b)
            )
        messages += _patch(rng, spec, home, body, probe_off)
    pump_messages, pump_events = _pump(rng, spec, home, pump_plan)
    messages += pump_messages
    home.events += pump_events
    home.events.sort(key=lambda e: (e.start, e.kind.value))

    # Deliveries: messages inside a dropout reach the broker when it ends.
    seqs = {home.thermometer_id: _Seq(home.thermometer_id), home.pump_id: _Seq(home.pump_id)}
    ordered = sorted(enumerate(messages), key=lambda im: (im[1][0], im[0]))
    for order, (_, (at, device_id, build)) in enumerate(ordered):
        message_id, seq = seqs[device_id].take()
        deliver_at, buffered = at, False
        for a, b in dropouts:
            if a <= at < b:
                deliver_at, buffered = b, True
                break
        home._messages.append((deliver_at, order, (build, message_id, seq, at, buffered)))
    home._messages.sort(key=lambda m: (m[0], m[1]))
    return home


def _core_minutes(body: _Body, fever: _Fever) -> list[tuple[datetime, float]]:
    """The core temperature minute by minute over the fever's whole bump."""
    t = fever.rise_at
    stop = fever.rise_at + fever.rise + fever.plateau + fever.fall
    out: list[tuple[datetime, float]] = []
    while t <= stop:
        out.append((t, body.core(t)))
        t += timedelta(minutes=1)
    return out


def _noticeable_from(body: _Body, fever: _Fever) -> datetime:
    """When a caregiver starts noticing the fever (the core first at 38.0 °C, or the end of
    its rise when it never gets there): the re-measuring rhythm starts from here."""
    for t, value in _core_minutes(body, fever):
        if value >= FEVER_SUSTAINED_C:
            return t
    return fever.rise_at + fever.rise


def _fever_truth(body: _Body, fever: _Fever, patient_id: str, device_id: str) -> TrueEvent | None:
    """The fever as the ground truth records it (see the module docstring): ``fever`` when the
    core met the definition by more than the reading margin, ``borderline_fever`` when it came
    within the margin of a limit, None when it never came near 38.0 °C."""
    minutes = _core_minutes(body, fever)
    margin = READING_MARGIN_C
    near = [t for t, v in minutes if v >= FEVER_SUSTAINED_C - margin]
    if not near:
        return None
    above = [t for t, v in minutes if v >= FEVER_CLEAR_C - margin]
    peak = max(v for _, v in minutes)
    longest = run = 0
    for _, value in minutes:
        run = run + 1 if value >= FEVER_SUSTAINED_C + margin else 0
        longest = max(longest, run)
    # ``run`` counts minutes at the level: n samples a minute apart span n - 1 minutes.
    sustained = timedelta(minutes=max(0, longest - 1)) >= FEVER_SUSTAINED_FOR
    owed = peak >= FEVER_SINGLE_C + margin or sustained
    shape = "single" if fever.peak_c >= FEVER_SINGLE_C else "sustained"
    return TrueEvent(
        EventKind.FEVER if owed else EventKind.BORDERLINE_FEVER,
        patient_id,
        device_id,
        near[0],
        above[-1],
        f"{shape}: core peak {peak:.2f} °C, {max(0, longest - 1)} min at >= "
        f"{FEVER_SUSTAINED_C + margin:.1f} °C",
    )


def _reading(device_id: str, at: datetime, value: float, site: TemperatureSite) -> Any:
    def build(message_id: Any, seq: int) -> TemperatureReading:
        return TemperatureReading(
            schema="vigil.device.temperature.v1",
            message_id=message_id,
            device_id=device_id,
            seq=seq,
            device_time=at,
            value=value,
            unit=TemperatureUnit.CELSIUS,
            site=site,
        )

    return build


def _spot_checks(
    rng: random.Random, spec: CourseSpec, home: Home, body: _Body, noticed_from: list[datetime]
) -> list[tuple[datetime, str, Any]]:
    zone = ZoneInfo(spec.zone)
    times: list[datetime] = []
    day = spec.start.astimezone(zone).date()
    while True:
        for wall, spread in SPOT_CHECK_TIMES:
            at = datetime.combine(day, wall, zone) + timedelta(minutes=rng.uniform(-spread, spread))
            if rng.random() < SPOT_CHECK_SKIP:
                continue
            if spec.start <= at < spec.end:
                times.append(at)
        day += timedelta(days=1)
        if datetime.combine(day, time(0), zone) >= spec.end:
            break
    # During a fever: noticed within 45 min, then about hourly until a reading under 37.8 °C,
    # and once more after it.
    for start in noticed_from:
        at = start + timedelta(minutes=rng.uniform(5, 45))
        normal_after = 0
        while at < spec.end and normal_after < 2:
            times.append(at)
            if body.core(at) < 37.8:
                normal_after += 1
            at += timedelta(minutes=rng.uniform(50, 70))
    times.sort()
    kept: list[datetime] = []
    for at in times:
        # Two readings within 15 min are one measurement.
        if kept and at - kept[-1] < timedelta(minutes=15):
            continue
        kept.append(at)
    return [
        (
            at,
            home.thermometer_id,
            _reading(
                home.thermometer_id,
                at,
                round(body.core(at) + rng.gauss(0.0, 0.04), 1),
                TemperatureSite.ORAL,
            ),
        )
        for at in kept
    ]


def _patch(
    rng: random.Random,
    spec: CourseSpec,
    home: Home,
    body: _Body,
    probe_off: list[tuple[datetime, datetime]],
) -> list[tuple[datetime, str, Any]]:
    out: list[tuple[datetime, str, Any]] = []
    at = spec.start + PATCH_INTERVAL * rng.random()
    while at < spec.end:
        if any(a <= at < b for a, b in probe_off):
            value = round(rng.uniform(33.0, 35.0), 1)
        else:
            value = round(body.core(at) + rng.gauss(0.0, 0.03), 1)
        out.append(
            (
                at,
                home.thermometer_id,
                _reading(home.thermometer_id, at, value, TemperatureSite.SKIN_PATCH),
            )
        )
        at += PATCH_INTERVAL
    return out


def _pump(
    rng: random.Random,
    spec: CourseSpec,
    home: Home,
    plan: list[tuple[EventKind, datetime, datetime]],
) -> tuple[list[tuple[datetime, str, Any]], list[TrueEvent]]:
    """A pump's messages, minute by minute, and the true events that really happened to it."""
    device_id = home.pump_id
    out: list[tuple[datetime, str, Any]] = []
    events: list[TrueEvent] = []
    state = PumpState.RUNNING
    volume = rng.uniform(60.0, BAG_VOLUME_ML)
    battery = rng.uniform(70.0, 100.0)
    change_at_ml = rng.uniform(5.0, 16.7)
    bag_change_until: datetime | None = None
    at_risk_since: datetime | None = None
    active: tuple[EventKind, datetime, datetime] | None = None
    pending = list(plan)
    t = spec.start + PUMP_STATUS_INTERVAL * rng.random()
    last = t

    def status(at: datetime) -> None:
        snapshot = (state, round(volume, 1), round(battery, 1))

        def build(message_id: Any, seq: int) -> PumpStatus:
            return PumpStatus(
                schema="vigil.device.pump_status.v1",
                message_id=message_id,
                device_id=device_id,
                seq=seq,
                device_time=at,
                state=snapshot[0],
                rate_ml_h=BAG_RATE_ML_H,
                volume_remaining_ml=snapshot[1],
                bag_volume_ml=BAG_VOLUME_ML,
                battery_pct=snapshot[2],
            )

        out.append((at, device_id, build))

    def event(at: datetime, kind: PumpEventKind, alarm: PumpAlarmCode | None = None) -> None:
        def build(message_id: Any, seq: int) -> PumpEvent:
            return PumpEvent(
                schema="vigil.device.pump_event.v1",
                message_id=message_id,
                device_id=device_id,
                seq=seq,
                device_time=at,
                event=kind,
                alarm=alarm,
            )

        out.append((at, device_id, build))

    while t < spec.end:
        hours = (t - last).total_seconds() / 3600
        last = t
        if state is PumpState.RUNNING:
            volume = max(volume - BAG_RATE_ML_H * hours, 0.0)
        battery = max(battery - 2.0 * hours, 5.0)
        changed = False
        # End of what is going on.
        if bag_change_until is not None and t >= bag_change_until:
            event(t, PumpEventKind.BAG_CHANGED)
            if at_risk_since is not None:
                events.append(
                    TrueEvent(EventKind.BAG_AT_RISK, home.patient_id, device_id, at_risk_since, t)
                )
                at_risk_since = None
            event(t, PumpEventKind.INFUSION_STARTED)
            volume, battery, state = BAG_VOLUME_ML, 100.0, PumpState.RUNNING
            change_at_ml = rng.uniform(5.0, 16.7)
            bag_change_until, changed = None, True
        if active is not None and t >= active[2]:
            kind, began, _ = active
            if kind is EventKind.OCCLUSION:
                event(t, PumpEventKind.ALARM_CLEARED, PumpAlarmCode.OCCLUSION_DOWNSTREAM)
                event(t, PumpEventKind.INFUSION_STARTED)
                state = PumpState.RUNNING
            elif kind is EventKind.PUMP_STOP:
                event(t, PumpEventKind.INFUSION_STARTED)
                state = PumpState.RUNNING
            else:
                event(t, PumpEventKind.ALARM_CLEARED, PumpAlarmCode.BATTERY_LOW)
                battery = 100.0
            events.append(TrueEvent(kind, home.patient_id, device_id, began, t))
            active, changed = None, True
        # Start of what is planned, if the pump is free (a clash is skipped, never recorded).
        while pending and pending[0][1] <= t:
            kind, _, planned_end = pending.pop(0)
            if active is not None or bag_change_until is not None:
                continue
            if kind is EventKind.OCCLUSION:
                event(t, PumpEventKind.ALARM_RAISED, PumpAlarmCode.OCCLUSION_DOWNSTREAM)
                state = PumpState.ALARMING
            elif kind is EventKind.PUMP_STOP:
                event(t, PumpEventKind.INFUSION_STOPPED)
                state = PumpState.STOPPED
            else:
                battery = 12.0
                event(t, PumpEventKind.ALARM_RAISED, PumpAlarmCode.BATTERY_LOW)
            active, changed = (kind, t, max(planned_end, t + PUMP_STATUS_INTERVAL)), True
        # The routine bag change, a little before the bag runs out.
        if (
            state is PumpState.RUNNING
            and active is None
            and bag_change_until is None
            and volume <= change_at_ml
        ):
            event(t, PumpEventKind.INFUSION_PAUSED)
            state = PumpState.PAUSED
            bag_change_until = t + timedelta(minutes=rng.uniform(3, 8))
            changed = True
        if (
            state is PumpState.RUNNING
            and at_risk_since is None
            # As the status reports it (0.1 mL).
            and round(volume, 1) <= BAG_RATE_ML_H * BAG_AT_RISK_LEAD.total_seconds() / 3600
        ):
            at_risk_since = t
        status(t)
        del changed
        t += PUMP_STATUS_INTERVAL
    if active is not None:
        events.append(TrueEvent(active[0], home.patient_id, device_id, active[1], spec.end))
    if at_risk_since is not None:
        events.append(
            TrueEvent(EventKind.BAG_AT_RISK, home.patient_id, device_id, at_risk_since, spec.end)
        )
    return out, events


@dataclass(frozen=True, slots=True)
class Course:
    spec: CourseSpec
    homes: tuple[Home, ...]

    @property
    def ground_truth(self) -> list[TrueEvent]:
        return sorted(
            (e for h in self.homes for e in h.events), key=lambda e: (e.start, e.patient_id)
        )

    def deliveries(self) -> Iterator[Delivery]:
        """Every message in broker-arrival order (ties: home order, then the hub's order)."""

        def home_stream(index: int, home: Home) -> Iterator[tuple[datetime, int, int, Delivery]]:
            for deliver_at, order, (build, message_id, seq, _at, buffered) in home._messages:
                message = build(message_id, seq)
                channel = (
                    "temperature"
                    if isinstance(message, TemperatureReading)
                    else ("pump-status" if isinstance(message, PumpStatus) else "pump-event")
                )
                yield (
                    deliver_at,
                    index,
                    order,
                    Delivery(deliver_at, topic_for(message.device_id, channel), message, buffered),
                )

        for *_, delivery in heapq.merge(
            *(home_stream(i, h) for i, h in enumerate(self.homes)), key=lambda x: x[:3]
        ):
            yield delivery

    def message_count(self) -> int:
        return sum(len(h._messages) for h in self.homes)


def plan_course(spec: CourseSpec) -> Course:
    """The course of ``spec``: the same seed, start and prefix always give the same course."""
    return Course(spec, tuple(_plan_home(spec, n) for n in range(1, spec.patients + 1)))
