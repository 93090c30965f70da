"""A fleet of virtual home devices: what each would publish, and when. Pure.

Each simulated patient has a thermometer (``thermo-<patient>``) and an infusion pump
(``pump-<patient>``) that follow a scenario (``normal``, ``fever``, ``occlusion``). The fleet does
no I/O and never reads the clock: the caller passes the current time to ``Fleet.advance`` and asks
``Fleet.next_due`` when to call again, so a test drives a 28-day infusion in a loop and a given
seed, start time and sequence of calls always yield the same messages.

The publisher (``vigil_tools.simulator.publisher``) owns the MQTT connection and the wall
clock; this module must not import either.
"""

from __future__ import annotations

import heapq
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from uuid import NAMESPACE_URL, UUID, uuid5

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

DeviceMessageModel = TemperatureReading | PumpStatus | PumpEvent

# Message ids are name-based (device id and seq), so the same message always has the same id, as
# the contract asks of a retransmission, and a replay of the fleet reproduces them.
_MESSAGE_ID_NAMESPACE = uuid5(NAMESPACE_URL, "urn:vigil:simulator:message")

#: A 24-hour blinatumomab bag runs at 10 mL/h (Blincyto prescribing information).
BAG_RATE_ML_H = 10.0
BAG_VOLUME_ML = 240.0
# The pump's bag is changed a little before it runs dry, as a home-care nurse would, so that a
# long ``normal`` run never raises reservoir alarms of its own.
_BAG_CHANGE_AT_ML = 5.0
_BATTERY_DRAIN_PCT_H = 0.5

_NORMAL_LOW_C = 36.6
_NORMAL_HIGH_C = 37.2
_FEVER_FLOOR_C = 38.6
_FEVER_CEILING_C = 39.4


class Scenario(StrEnum):
    """What happens to one simulated patient's devices."""

    NORMAL = "normal"
    FEVER = "fever"
    OCCLUSION = "occlusion"


class ScenarioSpecError(ValueError):
    """A scenario spec such as ``fever:1,occlusion:1,normal:rest`` that cannot be applied."""


_SPEC_ENTRY = re.compile(r"^(?P<name>[a-z_]+):(?P<count>\d+|rest)$")


def parse_scenario_spec(spec: str, n_patients: int) -> tuple[Scenario, ...]:
    """One scenario per patient, in patient order, from a spec like ``fever:1,normal:rest``.

    Entries are ``name:count`` or ``name:rest`` and are assigned in order: ``fever:1,occlusion:2``
    makes patient 1 febrile and patients 2-3 occluded. ``rest`` (at most once) takes every patient
    the other entries leave over; without it, patients left over are ``normal``. An empty spec
    means everyone is ``normal``. Raises ``ScenarioSpecError`` saying what is wrong.
    """
    if n_patients < 1:
        raise ScenarioSpecError(f"the fleet needs at least one patient, got {n_patients}")
    entries: list[tuple[Scenario, int | None]] = []
    for raw in spec.split(","):
        entry = raw.strip().lower().replace(" ", "")
        if not entry:
            continue
        match = _SPEC_ENTRY.match(entry)
        if match is None:
            raise ScenarioSpecError(
                f"scenario entry {raw.strip()!r} is not 'name:count' or 'name:rest' "
                f"(example: 'fever:1,occlusion:1,normal:rest')"
            )
        name = match["name"]
        try:
            scenario = Scenario(name)
        except ValueError:
            known = ", ".join(s.value for s in Scenario)
            raise ScenarioSpecError(
                f"unknown scenario {name!r} in {spec!r}; known: {known}"
            ) from None
        count = None if match["count"] == "rest" else int(match["count"])
        entries.append((scenario, count))

    rest_entries = [scenario for scenario, count in entries if count is None]
    if len(rest_entries) > 1:
        raise ScenarioSpecError(f"'rest' may appear once in a scenario spec, not in {spec!r}")
    counted = sum(count for _, count in entries if count is not None)
    if counted > n_patients:
        raise ScenarioSpecError(
            f"scenario spec {spec!r} names {counted} patients but the fleet has {n_patients}"
        )
    left_over = n_patients - counted

    plan: list[Scenario] = []
    for scenario, count in entries:
        plan.extend([scenario] * (left_over if count is None else count))
    if not rest_entries:
        plan.extend([Scenario.NORMAL] * left_over)
    return tuple(plan)


def patient_id_for(number: int) -> str:
    """The id of the ``number``-th simulated patient, counting from 1: ``P-0001``."""
    if number < 1:
        raise ValueError("patients are numbered from 1")
    return f"P-{number:04d}"


def thermometer_id_for(patient_id: str) -> str:
    return f"thermo-{patient_id}"


def pump_id_for(patient_id: str) -> str:
    return f"pump-{patient_id}"


@dataclass(frozen=True, slots=True)
class ScenarioTiming:
    """When scenario events happen, in seconds after the fleet's start."""

    #: By this time a ``fever`` patient's temperature is at least 38.5 °C. It stays normal for the
    #: first quarter and climbs through 38.0 °C over the middle half of this span.
    fever_onset_s: float = 20.0
    #: An ``occlusion`` pump raises a downstream occlusion alarm and stops at this time.
    occlusion_after_s: float = 30.0
    #: If set, the occlusion clears and the infusion restarts at this time.
    occlusion_clear_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.fever_onset_s < 0 or self.occlusion_after_s < 0:
            raise ValueError("fever_onset_s and occlusion_after_s must not be negative")
        if (
            self.occlusion_clear_after_s is not None
            and self.occlusion_clear_after_s <= self.occlusion_after_s
        ):
            raise ValueError("occlusion_clear_after_s must be later than occlusion_after_s")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message a device is about to publish, with the topic it goes to."""

    topic: str
    channel: str
    message: DeviceMessageModel

    @property
    def device_id(self) -> str:
        return self.message.device_id

    def payload(self) -> bytes:
        # by_alias: the wire name of the version field is ``schema``, not ``schema_``.
        return self.message.model_dump_json(by_alias=True).encode()


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


class _Sequencer:
    """Per-device message numbering: seq strictly increases; the message id follows from it."""

    def __init__(self, device_id: str, seq_start: int) -> None:
        self._device_id = device_id
        self._next = seq_start

    def take(self) -> tuple[UUID, int]:
        seq = self._next
        self._next += 1
        return uuid5(_MESSAGE_ID_NAMESPACE, f"{self._device_id}/{seq}"), seq


class _PeriodicSchedule:
    """Readings due on a fixed grid; a call that comes late skips the missed slots."""

    def __init__(self, first_at: datetime, interval: timedelta) -> None:
        self.next_at = first_at
        self._interval = interval

    def due(self, now: datetime) -> bool:
        return now >= self.next_at

    def done(self, now: datetime) -> None:
        # A thermometer that was busy does not emit a backlog of stale readings: it measures now.
        missed = int(_seconds(now - self.next_at) // _seconds(self._interval))
        self.next_at += self._interval * (missed + 1)


class VirtualThermometer:
    """A thermometer that reads the patient's temperature every interval."""

    def __init__(
        self,
        device_id: str,
        scenario: Scenario,
        *,
        start: datetime,
        interval: timedelta,
        rng: random.Random,
        seq_start: int,
        timing: ScenarioTiming,
    ) -> None:
        self.device_id = device_id
        self.scenario = scenario
        self._start = start
        self._rng = rng
        self._timing = timing
        self._sequencer = _Sequencer(device_id, seq_start)
        # Devices start at random phases so a fleet does not publish in lockstep bursts.
        self._schedule = _PeriodicSchedule(start + interval * rng.random(), interval)
        self._baseline_c = rng.uniform(36.7, 37.0)
        self._peak_c = rng.uniform(38.9, 39.2)

    def next_due(self) -> datetime:
        return self._schedule.next_at

    def advance(self, now: datetime) -> list[DeviceMessageModel]:
        if not self._schedule.due(now):
            return []
        self._schedule.done(now)
        message_id, seq = self._sequencer.take()
        return [
            TemperatureReading(
                schema="vigil.device.temperature.v1",
                message_id=message_id,
                device_id=self.device_id,
                seq=seq,
                device_time=now,
                value=self._temperature_c(_seconds(now - self._start)),
                unit=TemperatureUnit.CELSIUS,
                # Oral is the site the 38.3 °C fever definition is written for.
                site=TemperatureSite.ORAL,
            )
        ]

    def _normal_c(self) -> float:
        value = self._baseline_c + self._rng.gauss(0.0, 0.08)
        return round(min(max(value, _NORMAL_LOW_C), _NORMAL_HIGH_C), 1)

    def _temperature_c(self, elapsed_s: float) -> float:
        if self.scenario is not Scenario.FEVER:
            return self._normal_c()
        onset = self._timing.fever_onset_s
        climb_from, climb_to = 0.25 * onset, 0.75 * onset
        if elapsed_s < climb_from:
            return self._normal_c()
        if elapsed_s < climb_to:
            share = (elapsed_s - climb_from) / (climb_to - climb_from)
            value = self._baseline_c + share * (self._peak_c - self._baseline_c)
            return round(value + self._rng.gauss(0.0, 0.05), 1)
        # The plateau is floored so that rounding never takes a febrile reading below 38.5 °C.
        value = self._peak_c + self._rng.gauss(0.0, 0.1)
        return round(min(max(value, _FEVER_FLOOR_C), _FEVER_CEILING_C), 1)


class VirtualPump:
    """An ambulatory pump running a 24-hour bag; it reports status every interval."""

    def __init__(
        self,
        device_id: str,
        scenario: Scenario,
        *,
        start: datetime,
        interval: timedelta,
        rng: random.Random,
        seq_start: int,
        timing: ScenarioTiming,
    ) -> None:
        self.device_id = device_id
        self.scenario = scenario
        self.state = PumpState.RUNNING
        self._sequencer = _Sequencer(device_id, seq_start)
        self._schedule = _PeriodicSchedule(start + interval * rng.random(), interval)
        # The bag was hung some hours before the simulation started.
        self.volume_remaining_ml = rng.uniform(60.0, BAG_VOLUME_ML)
        self.battery_pct = rng.uniform(60.0, 100.0)
        self._flowed_until = start
        self._occlusion_at: datetime | None = None
        self._clear_at: datetime | None = None
        if scenario is Scenario.OCCLUSION:
            self._occlusion_at = start + timedelta(seconds=timing.occlusion_after_s)
            if timing.occlusion_clear_after_s is not None:
                self._clear_at = start + timedelta(seconds=timing.occlusion_clear_after_s)

    def next_due(self) -> datetime:
        pending = [self._schedule.next_at]
        pending += [t for t in (self._occlusion_at, self._clear_at) if t is not None]
        return min(pending)

    def advance(self, now: datetime) -> list[DeviceMessageModel]:
        out: list[DeviceMessageModel] = []
        state_changed = False
        # Scheduled transitions are stamped with the time they happened, not the time of the
        # call, so a late call reports the same alarm time a prompt one would.
        if self._occlusion_at is not None and self._occlusion_at <= now:
            at = self._occlusion_at
            self._occlusion_at = None
            out += self._flow_until(at)
            self.state = PumpState.ALARMING
            out.append(
                self._event(
                    at,
                    PumpEventKind.ALARM_RAISED,
                    PumpAlarmCode.OCCLUSION_DOWNSTREAM,
                    "downstream occlusion; infusion stopped",
                )
            )
            state_changed = True
        if self._clear_at is not None and self._clear_at <= now and self._occlusion_at is None:
            at = self._clear_at
            self._clear_at = None
            out += self._flow_until(at)
            out.append(
                self._event(at, PumpEventKind.ALARM_CLEARED, PumpAlarmCode.OCCLUSION_DOWNSTREAM)
            )
            out.append(self._event(at, PumpEventKind.INFUSION_STARTED, None))
            self.state = PumpState.RUNNING
            state_changed = True
        out += self._flow_until(now)
        # A state change is reported at once, as pumps do, besides the periodic status.
        if self._schedule.due(now) or state_changed:
            if self._schedule.due(now):
                self._schedule.done(now)
            out.append(self._status(now))
        return out

    def _flow_until(self, at: datetime) -> list[DeviceMessageModel]:
        if at <= self._flowed_until:
            return []
        hours = _seconds(at - self._flowed_until) / 3600.0
        self._flowed_until = at
        self.battery_pct = max(self.battery_pct - _BATTERY_DRAIN_PCT_H * hours, 5.0)
        if self.state is not PumpState.RUNNING:
            return []
        self.volume_remaining_ml -= BAG_RATE_ML_H * hours
        if self.volume_remaining_ml > _BAG_CHANGE_AT_ML:
            return []
        # A nurse hangs a new bag and swaps the battery before the pump runs dry; the event is
        # stamped with this step's time, at most one interval after the bag reached the mark.
        self.volume_remaining_ml = BAG_VOLUME_ML
        self.battery_pct = 100.0
        return [self._event(at, PumpEventKind.BAG_CHANGED, None)]

    def _event(
        self,
        at: datetime,
        kind: PumpEventKind,
        alarm: PumpAlarmCode | None,
        detail: str | None = None,
    ) -> PumpEvent:
        message_id, seq = self._sequencer.take()
        return PumpEvent(
            schema="vigil.device.pump_event.v1",
            message_id=message_id,
            device_id=self.device_id,
            seq=seq,
            device_time=at,
            event=kind,
            alarm=alarm,
            detail=detail,
        )

    def _status(self, now: datetime) -> PumpStatus:
        message_id, seq = self._sequencer.take()
        return PumpStatus(
            schema="vigil.device.pump_status.v1",
            message_id=message_id,
            device_id=self.device_id,
            seq=seq,
            device_time=now,
            state=self.state,
            rate_ml_h=BAG_RATE_ML_H,
            volume_remaining_ml=round(self.volume_remaining_ml, 2),
            bag_volume_ml=BAG_VOLUME_ML,
            battery_pct=round(self.battery_pct, 1),
        )


_CHANNEL_OF: dict[type[DeviceMessageModel], str] = {
    TemperatureReading: "temperature",
    PumpStatus: "pump-status",
    PumpEvent: "pump-event",
}


def channel_of(message: DeviceMessageModel) -> str:
    """The MQTT channel a device message belongs on."""
    return _CHANNEL_OF[type(message)]


@dataclass(frozen=True, slots=True)
class SimulatedPatient:
    patient_id: str
    scenario: Scenario
    thermometer: VirtualThermometer
    pump: VirtualPump


class Fleet:
    """All simulated patients' devices, advanced together by the caller's clock."""

    def __init__(
        self,
        scenarios: Sequence[Scenario],
        *,
        start: datetime,
        interval_s: float,
        seed: int,
        timing: ScenarioTiming | None = None,
        seq_start: int | None = None,
        first_patient: int = 1,
    ) -> None:
        """``scenarios`` has one entry per patient (see ``parse_scenario_spec``), numbered from
        ``first_patient`` (two fleets on one broker stay apart by numbering from apart).

        ``seq_start`` defaults to ``start`` in epoch milliseconds: a simulator restarted later
        then numbers above the previous run, as a device that keeps its sequence across reboots
        would, provided no device published more than 1,000 messages a second.
        """
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        timing = timing or ScenarioTiming()
        interval = timedelta(seconds=interval_s)
        first_seq = seq_start if seq_start is not None else int(start.timestamp() * 1000)
        self.start = start
        self.patients: tuple[SimulatedPatient, ...] = tuple(
            self._patient(number, scenario, start, interval, seed, first_seq, timing)
            for number, scenario in enumerate(scenarios, start=first_patient)
        )
        if not self.patients:
            raise ValueError("the fleet needs at least one patient")
        self._devices: tuple[VirtualThermometer | VirtualPump, ...] = tuple(
            device for p in self.patients for device in (p.thermometer, p.pump)
        )
        self._due: list[tuple[datetime, int]] = [
            (device.next_due(), index) for index, device in enumerate(self._devices)
        ]
        heapq.heapify(self._due)

    @staticmethod
    def _patient(
        number: int,
        scenario: Scenario,
        start: datetime,
        interval: timedelta,
        seed: int,
        seq_start: int,
        timing: ScenarioTiming,
    ) -> SimulatedPatient:
        patient_id = patient_id_for(number)
        thermo_id, pump_id = thermometer_id_for(patient_id), pump_id_for(patient_id)
        # One generator per device, seeded by its id: a device's readings do not change when
        # the fleet grows or when other devices are advanced more or less often.
        return SimulatedPatient(
            patient_id=patient_id,
            scenario=scenario,
            thermometer=VirtualThermometer(
                thermo_id,
                scenario,
                start=start,
                interval=interval,
                rng=random.Random(f"{seed}/{thermo_id}"),
                seq_start=seq_start,
                timing=timing,
            ),
            pump=VirtualPump(
                pump_id,
                scenario,
                start=start,
                interval=interval,
                rng=random.Random(f"{seed}/{pump_id}"),
                seq_start=seq_start,
                timing=timing,
            ),
        )

    def next_due(self) -> datetime:
        """The earliest time at which some device has something to publish."""
        return self._due[0][0]

    def advance(self, now: datetime) -> list[Outgoing]:
        """Everything the devices publish up to ``now``, in publish order per device."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        out: list[Outgoing] = []
        # A heap of (next due, device) keeps a call proportional to the devices that are due,
        # not to the fleet: with staggered devices, most calls find one or two.
        while self._due and self._due[0][0] <= now:
            _, index = heapq.heappop(self._due)
            device = self._devices[index]
            for message in device.advance(now):
                channel = channel_of(message)
                out.append(Outgoing(topic_for(message.device_id, channel), channel, message))
            # Every device's next due time is after ``now`` once it has advanced to ``now``.
            heapq.heappush(self._due, (device.next_due(), index))
        return out
