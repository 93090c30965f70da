"""The rules' state of one patient: typed records, and its state record as ``msgspec`` writes it.

``PatientTrack`` (the fever state, the devices by id, the thermometer in use, the fever-unobserved
episode and timer) holds a ``DeviceTrack`` per device (last device time, last arrival, silence,
sensor fault, ``seq`` and its open gaps, the armed timers, and for a pump its ``PumpTrack``).
The state record is what ``ENCODER`` writes of a ``PatientTrack``; ``patient_from_record`` reads
it back, and reads the previous version's records too (docs/rules.md, "Rule state"). The records
that change on every event are slotted dataclasses rather than ``msgspec`` structs: setting a
struct's attribute costs about twice a slot's, and ``msgspec`` encodes and decodes dataclasses
all the same. The immutable values in them are structs written as arrays (``Gap`` here,
``fever.Reading``, ``pump_track.RaisedAlarm``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from services.rules.domain.config import PatientRules
from services.rules.domain.fever import FeverState
from services.rules.domain.instant import NEVER, Instant, never_if_none
from services.rules.domain.pump_track import PumpTrack

# The armed pump clocks in the previous version's ``pump_timers``, by kind.
_TIMER_FIELDS = {"bag": "bag_timer_at", "interruption": "int_timer_at"}


class Gap(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One open gap in a device's ``seq`` (``domain/sequence.py``): the first and last seq
    missing, and the ingest time it was seen at. In a state record it is the array
    ``[low, high, seen]``."""

    low: int
    high: int
    seen: float


@dataclass(slots=True)
class DeviceTrack:
    """When the engine last heard from one device, and whether it is alerted as silent or as a
    faulty sensor; for a pump, also the pump rules' record of it (``pump``). Encoded and
    decoded by ``msgspec`` as part of its patient's state record.

    ``last_t``: the newest device time the device reported. ``heard_t``: the latest ingest time
    of any of its messages, whatever its device time (what the silence timer counts from).
    ``silent_at``: the deadline its open silence alert fired at (an all clear is never dated
    before it). ``seq_hi``: the highest seq seen (docs/mqtt.md, section 4); ``gaps``: the gaps
    below it still open, None while there are none."""

    is_thermometer: bool
    last_t: Instant = NEVER
    heard_t: float = 0.0
    silent_key: str | None = None
    silent_at: float | None = None
    timer_at: float | None = None
    fault_key: str | None = None
    seq_hi: int | None = None
    gaps: list[Gap] | None = None
    gap_timer_at: float | None = None
    pump: PumpTrack | None = None

    def __post_init__(self) -> None:
        self.last_t = never_if_none(self.last_t)
        if not self.gaps:  # the previous version wrote no gaps as []
            self.gaps = None

    def silent_limit(self, rules: PatientRules, device_id: str) -> float:
        """How long this device may stay silent before it is alerted (s): its kind's limit,
        a spot-check thermometer's own (its registration)."""
        return rules.silent_s(device_id, self.is_thermometer)


@dataclass(slots=True)
class PatientTrack:
    """Everything the rules remember about one patient: its state record, encoded and decoded
    by ``msgspec``. The patient's compiled rules are not state (the config is): the engine
    keeps them beside it."""

    fever: FeverState = field(default_factory=FeverState)
    devices: dict[str, DeviceTrack] = field(default_factory=dict)
    thermometer_id: str = ""
    # The latest ingest time of a plausible temperature: "no temperature for 30 min" counts
    # from when the last one reached us.
    temp_heard_t: float = 0.0
    unobserved_key: str | None = None
    unobserved_at: float | None = None
    # Armed deadlines are state too: restoring them as they were (not recomputing them) makes
    # a restored engine fire exactly when the uninterrupted one would.
    unobserved_timer_at: float | None = None

    def pumps(self) -> dict[str, PumpTrack]:
        """The pump record of each of the patient's pumps, by device id."""
        return {d: track.pump for d, track in self.devices.items() if track.pump is not None}


# "deterministic": sets and dicts written in sorted order, so equal states give equal bytes.
ENCODER = msgspec.json.Encoder(order="deterministic")


def patient_from_record(data: dict[str, Any]) -> PatientTrack:
    """A patient's state from its record as JSON data: this version's (the ``PatientTrack``
    as ``msgspec`` encodes it), or the previous version's (``_previous_record``)."""
    if "pumps" in data:
        data = _previous_record(data)
    return msgspec.convert(data, PatientTrack)


def _previous_record(data: dict[str, Any]) -> dict[str, Any]:
    """The previous version's patient record in this version's shape. It held each pump's
    record under the patient's ``pumps`` (not on its device) and the armed pump clocks also
    as ``pump_timers`` ([kind, device, deadline]: the only record of them in records older
    than the pumps' own ``bag_timer_at``/``int_timer_at``); records from before the arrival
    clock name the newest message's ingest time instead of ``heard_t``/``temp_heard_t``."""
    devices = {d: dict(v) for d, v in data["devices"].items()}
    for device in devices.values():
        if "heard_t" not in device:
            device["heard_t"] = device["last_ingest_t"]
    for device_id, pump in data["pumps"].items():
        # Every pump has reported, so a pump without its device is only a defensive default.
        devices.setdefault(device_id, {"is_thermometer": False})["pump"] = dict(pump)
    for kind, device_id, deadline in data.get("pump_timers") or ():
        devices[device_id]["pump"][_TIMER_FIELDS[kind]] = float(deadline)
    upgraded = {k: v for k, v in data.items() if k not in ("pumps", "pump_timers")}
    upgraded["devices"] = devices
    if "temp_heard_t" not in upgraded:
        upgraded["temp_heard_t"] = upgraded["thermometer_ingest_t"]
    return upgraded
