"""Observation: the slim, internal form of one telemetry event, built once at the edge.

The Kafka contract (``schemas.events.Telemetry``) is a validated pydantic model; the rules' hot
path reads a handful of fields per event, so it works on this slotted record with times as POSIX
seconds instead. ``observe`` is the only place that crosses from one to the other, and it keeps
the original ``datetime`` objects so an alert reproduces them exactly (offset included).

Two ways in: the keyword constructor (readable, for tests and tools) and the positional builders
``temperature``, ``pump_status``, ``pump_event`` and ``heartbeat``, which the edge decoders call
once per record. The builders fill the slots directly, with no keyword binding and no defaults
to merge, at well under half the cost of the keyword call; both give equal records (tested).
The replay's archive reader makes an ``ArchivedObservation`` instead, in C, from each row: the
rules take either (``ObservationLike``).
Identifiers are not interned: the engine keeps the first copy of each id as its dict key, and
interning only added the interpreter's interned-string table to the state (+0.95 MB per 10,000
devices under tracemalloc, measured with ``bench/rules.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from schemas.device import HeartbeatMessage, PumpEvent, PumpStatus, TemperatureReading
from schemas.events import Telemetry

TEMPERATURE = 0
PUMP_STATUS = 1
PUMP_EVENT = 2
# The pipeline heartbeat: passed through as one alert, never given to a clinical rule.
HEARTBEAT = 3

# Ingest's flags for a device clock it found far off (services/ingest/domain/validation.py);
# such an event does not move the event-time watermark. ``device_clock_skew`` is the name
# records written before the split carried.
CLOCK_SKEW_FLAGS = frozenset({"device_clock_ahead", "device_clock_behind", "device_clock_skew"})


def clock_skewed(flags: tuple[str, ...] | list[str] | None) -> bool:
    """Whether ingest flagged the device clock of a record as far off."""
    if not flags:
        return False
    return not CLOCK_SKEW_FLAGS.isdisjoint(flags)


_new = object.__new__


class Observation:
    """One device message as the rules see it. Plain attributes, no validation: trusted input.
    No ``__eq__``: records are compared field by field where that matters (tests)."""

    __slots__ = (
        "alarm",
        "bag_volume_ml",
        "battery_pct",
        "channel",
        "clock_skew",
        "device_id",
        "device_time",
        "event",
        "ingest_t",
        "ingest_time",
        "message_id",
        "patient_id",
        "pump_state",
        "rate_ml_h",
        "seq",
        "site",
        "t",
        "temperature_c",
        "volume_remaining_ml",
    )

    def __init__(
        self,
        *,
        patient_id: str,
        device_id: str,
        channel: int,
        device_time: datetime,
        ingest_time: datetime,
        message_id: str,
        temperature_c: float = 0.0,
        site: str = "unknown",
        pump_state: str = "",
        rate_ml_h: float = 0.0,
        volume_remaining_ml: float = 0.0,
        bag_volume_ml: float | None = None,
        battery_pct: float | None = None,
        event: str = "",
        alarm: str = "",
        clock_skew: bool = False,
        seq: int | None = None,
    ) -> None:
        self.patient_id = patient_id
        self.device_id = device_id
        self.channel = channel
        self.device_time = device_time
        self.ingest_time = ingest_time
        self.t = device_time.timestamp()
        self.ingest_t = ingest_time.timestamp()
        self.message_id = message_id
        self.temperature_c = temperature_c
        self.site = site
        self.pump_state = pump_state
        self.rate_ml_h = rate_ml_h
        self.volume_remaining_ml = volume_remaining_ml
        self.bag_volume_ml = bag_volume_ml
        self.battery_pct = battery_pct
        self.event = event
        self.alarm = alarm
        self.clock_skew = clock_skew
        # The device's sequence number (docs/mqtt.md, section 4); None where it is not known.
        self.seq = seq


class ArchivedObservation(msgspec.Struct, gc=False, array_like=True):
    """An observation as the readings archive stores it, built in C from one row of the
    replay's archive query (``ArchivedObservation(*row)``: the query sends these fields in this
    order). Times are POSIX seconds; ``device_time`` and ``ingest_time`` are made from them
    when read, in UTC: the engine reads them only to build an alert, so most events never make
    them. An archived time is UTC with microseconds, and the seconds carry it exactly (a
    double holds microseconds to within a tenth of one at today's epoch).

    A field the row's kind does not have is None (the query sends NULL, which costs neither
    the server nor the client a value): ``temperature_c`` and ``site`` are set on a
    temperature; ``pump_state``, ``rate_ml_h`` and ``volume_remaining_ml`` on a pump status
    (``bag_volume_ml`` and ``battery_pct`` when the pump reported them); ``event`` and
    ``alarm`` (``""`` when the event names none) on a pump event. The rules read a field
    only for the kinds that have it, and say so where they read it (``ObservationLike``).
    Not tracked by the cyclic collector: it holds strings and numbers only. Encoded as an
    array of its fields (``array_like``): the form a sealed archive day stores its rows in
    (``vigil_tools.replay.seal``)."""

    channel: int
    patient_id: str
    device_id: str
    t: float
    ingest_t: float
    message_id: str
    clock_skew: bool
    temperature_c: float | None
    site: str | None
    pump_state: str | None
    rate_ml_h: float | None
    volume_remaining_ml: float | None
    bag_volume_ml: float | None
    battery_pct: float | None
    event: str | None
    alarm: str | None

    @property
    def device_time(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    @property
    def ingest_time(self) -> datetime:
        return datetime.fromtimestamp(self.ingest_t, UTC)

    @property
    def seq(self) -> int | None:
        """Not read from the archive: an archive replay decides no sequence gap (the rows of
        a day are read in device order, not in the order the device numbered them)."""
        return None


#: What the rules take: a live observation or an archived one (the replay's).
ObservationLike = Observation | ArchivedObservation


def temperature(
    patient_id: str,
    device_id: str,
    device_time: datetime,
    ingest_time: datetime,
    message_id: str,
    clock_skew: bool,
    temperature_c: float,
    site: str,
) -> Observation:
    """A temperature ``Observation``, positionally (the decoders' fast path)."""
    obs: Observation = _new(Observation)
    obs.patient_id = patient_id
    obs.device_id = device_id
    obs.channel = TEMPERATURE
    obs.device_time = device_time
    obs.ingest_time = ingest_time
    obs.t = device_time.timestamp()
    obs.ingest_t = ingest_time.timestamp()
    obs.message_id = message_id
    obs.temperature_c = temperature_c
    obs.site = site
    obs.pump_state = ""
    obs.rate_ml_h = 0.0
    obs.volume_remaining_ml = 0.0
    obs.bag_volume_ml = None
    obs.battery_pct = None
    obs.event = ""
    obs.alarm = ""
    obs.clock_skew = clock_skew
    obs.seq = None
    return obs


def pump_status(
    patient_id: str,
    device_id: str,
    device_time: datetime,
    ingest_time: datetime,
    message_id: str,
    clock_skew: bool,
    pump_state: str,
    rate_ml_h: float,
    volume_remaining_ml: float,
    bag_volume_ml: float | None,
    battery_pct: float | None,
) -> Observation:
    """A pump status ``Observation``, positionally (the decoders' fast path)."""
    obs: Observation = _new(Observation)
    obs.patient_id = patient_id
    obs.device_id = device_id
    obs.channel = PUMP_STATUS
    obs.device_time = device_time
    obs.ingest_time = ingest_time
    obs.t = device_time.timestamp()
    obs.ingest_t = ingest_time.timestamp()
    obs.message_id = message_id
    obs.temperature_c = 0.0
    obs.site = "unknown"
    obs.pump_state = pump_state
    obs.rate_ml_h = rate_ml_h
    obs.volume_remaining_ml = volume_remaining_ml
    obs.bag_volume_ml = bag_volume_ml
    obs.battery_pct = battery_pct
    obs.event = ""
    obs.alarm = ""
    obs.clock_skew = clock_skew
    obs.seq = None
    return obs


def pump_event(
    patient_id: str,
    device_id: str,
    device_time: datetime,
    ingest_time: datetime,
    message_id: str,
    clock_skew: bool,
    event: str,
    alarm: str,
) -> Observation:
    """A pump event ``Observation`` (``alarm`` is "" when the event names none)."""
    obs: Observation = _new(Observation)
    obs.patient_id = patient_id
    obs.device_id = device_id
    obs.channel = PUMP_EVENT
    obs.device_time = device_time
    obs.ingest_time = ingest_time
    obs.t = device_time.timestamp()
    obs.ingest_t = ingest_time.timestamp()
    obs.message_id = message_id
    obs.temperature_c = 0.0
    obs.site = "unknown"
    obs.pump_state = ""
    obs.rate_ml_h = 0.0
    obs.volume_remaining_ml = 0.0
    obs.bag_volume_ml = None
    obs.battery_pct = None
    obs.event = event
    obs.alarm = alarm
    obs.clock_skew = clock_skew
    obs.seq = None
    return obs


def heartbeat(
    patient_id: str,
    device_id: str,
    device_time: datetime,
    ingest_time: datetime,
    message_id: str,
    clock_skew: bool,
) -> Observation:
    """A pipeline heartbeat ``Observation``."""
    return Observation(
        patient_id=patient_id,
        device_id=device_id,
        channel=HEARTBEAT,
        device_time=device_time,
        ingest_time=ingest_time,
        message_id=message_id,
        clock_skew=clock_skew,
    )


def observe(event: Telemetry) -> Observation:
    """The Observation of a validated telemetry event."""
    message = event.message
    skew = clock_skewed(event.flags)
    if isinstance(message, TemperatureReading):
        celsius = event.temperature_c if event.temperature_c is not None else message.celsius()
        return Observation(
            channel=TEMPERATURE,
            temperature_c=celsius,
            site=message.site.value,
            patient_id=event.patient_id,
            device_id=event.device_id,
            device_time=message.device_time,
            ingest_time=event.ingest_time,
            message_id=str(message.message_id),
            clock_skew=skew,
            seq=message.seq,
        )
    if isinstance(message, PumpStatus):
        return Observation(
            channel=PUMP_STATUS,
            pump_state=message.state.value,
            rate_ml_h=message.rate_ml_h,
            volume_remaining_ml=message.volume_remaining_ml,
            bag_volume_ml=message.bag_volume_ml,
            battery_pct=message.battery_pct,
            patient_id=event.patient_id,
            device_id=event.device_id,
            device_time=message.device_time,
            ingest_time=event.ingest_time,
            message_id=str(message.message_id),
            clock_skew=skew,
            seq=message.seq,
        )
    if isinstance(message, HeartbeatMessage):
        return Observation(
            channel=HEARTBEAT,
            patient_id=event.patient_id,
            device_id=event.device_id,
            device_time=message.device_time,
            ingest_time=event.ingest_time,
            message_id=str(message.message_id),
            clock_skew=skew,
        )
    assert isinstance(message, PumpEvent)
    return Observation(
        channel=PUMP_EVENT,
        event=message.event.value,
        alarm=message.alarm.value if message.alarm is not None else "",
        patient_id=event.patient_id,
        device_id=event.device_id,
        device_time=message.device_time,
        ingest_time=event.ingest_time,
        message_id=str(message.message_id),
        clock_skew=skew,
        seq=message.seq,
    )
