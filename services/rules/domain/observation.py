"""Observation: the slim, internal form of one telemetry event, built once at the edge.

The Kafka contract (``schemas.events.Telemetry``) is a validated pydantic model; the rules' hot
path reads a handful of fields per event, so it works on this slotted record with times as POSIX
seconds instead. ``observe`` is the only place that crosses from one to the other, and it keeps
the original ``datetime`` objects so an alert reproduces them exactly (offset included).
"""

from __future__ import annotations

from datetime import datetime

from schemas.device import HeartbeatMessage, PumpEvent, PumpStatus, TemperatureReading
from schemas.events import Telemetry

TEMPERATURE = 0
PUMP_STATUS = 1
PUMP_EVENT = 2
# The pipeline heartbeat: passed through as one alert, never given to a clinical rule.
HEARTBEAT = 3

CLOCK_SKEW_FLAG = "device_clock_skew"


class Observation:
    """One device message as the rules see it. Plain attributes, no validation: trusted input."""

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


def observe(event: Telemetry) -> Observation:
    """The Observation of a validated telemetry event."""
    message = event.message
    skew = CLOCK_SKEW_FLAG in event.flags
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
    )
