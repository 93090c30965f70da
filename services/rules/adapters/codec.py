"""Kafka record bytes -> Observation, fast, with the validated contract as the fallback.

Ingest validated every telemetry record against ``schemas.events.Telemetry`` before it put it on
Kafka, so the rules read the handful of fields they need straight from the JSON instead of
re-validating the whole model per event. The record is decoded by ``msgspec`` into typed structs
that declare only those fields (the rest of the record, ``mqtt_topic``, ``seq``, ``detail``, is
skipped without building a Python object), with the two times parsed in C into aware
``datetime``s; one positional builder call then makes the ``Observation``. Anything unexpected (a
missing field, a type that does not fit, a naive time, an unknown message schema or unit) falls
back to full pydantic validation, which either yields the same Observation or raises
``ValidationError`` for the dead-letter path: a contract break is never silently skipped.
``reference_observation`` is that validated path on its own; the unit tests hold the two equal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from schemas.events import Telemetry
from services.rules.domain.observation import (
    Observation,
    clock_skewed,
    heartbeat,
    observe,
    pump_event,
    pump_status,
    temperature,
)

# Time zones are required: a naive time does not decode here (and pydantic refuses it too).
_AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]


# The device messages, by their ``schema`` tag. gc=False: these structs hold no cycles and live
# for one record, so the cycle collector need not track them.
class _Temperature(msgspec.Struct, tag_field="schema", tag="vigil.device.temperature.v1", gc=False):
    message_id: str
    seq: int
    device_time: _AwareTime
    value: float
    unit: str = "C"
    site: str = "unknown"


class _PumpStatus(msgspec.Struct, tag_field="schema", tag="vigil.device.pump_status.v1", gc=False):
    message_id: str
    seq: int
    device_time: _AwareTime
    state: str
    rate_ml_h: float
    volume_remaining_ml: float
    bag_volume_ml: float | None = None
    battery_pct: float | None = None


class _PumpEvent(msgspec.Struct, tag_field="schema", tag="vigil.device.pump_event.v1", gc=False):
    message_id: str
    seq: int
    device_time: _AwareTime
    event: str
    alarm: str | None = None


class _Heartbeat(msgspec.Struct, tag_field="schema", tag="vigil.device.heartbeat.v1", gc=False):
    message_id: str
    device_time: _AwareTime


class _Record(msgspec.Struct, gc=False):
    schema: Literal["vigil.telemetry.v1"]
    patient_id: str
    device_id: str
    ingest_time: _AwareTime
    message: _Temperature | _PumpStatus | _PumpEvent | _Heartbeat
    temperature_c: float | None = None
    flags: list[str] | None = None


_decode = msgspec.json.Decoder(_Record).decode


def _fahrenheit_to_celsius(value: float) -> float:
    # Exactly ``TemperatureReading.celsius``: the model's rounding, not a second opinion.
    return round((value - 32.0) * 5.0 / 9.0, 2)


def _observation(record: _Record) -> Observation:
    message = record.message
    flags = record.flags
    skew = clock_skewed(flags) if flags else False
    # The common channels first: this runs for every record the service consumes.
    if isinstance(message, _Temperature):
        celsius = record.temperature_c
        if celsius is None:
            # Ingest normalises to °C; a record without it is converted as the model would.
            if message.unit == "C":
                celsius = message.value
            elif message.unit == "F":
                celsius = _fahrenheit_to_celsius(message.value)
            else:
                raise ValueError("unknown unit")
        obs = temperature(
            record.patient_id,
            record.device_id,
            message.device_time,
            record.ingest_time,
            message.message_id,
            skew,
            celsius,
            message.site,
        )
        obs.seq = message.seq
        return obs
    if isinstance(message, _PumpStatus):
        obs = pump_status(
            record.patient_id,
            record.device_id,
            message.device_time,
            record.ingest_time,
            message.message_id,
            skew,
            message.state,
            message.rate_ml_h,
            message.volume_remaining_ml,
            message.bag_volume_ml,
            message.battery_pct,
        )
        obs.seq = message.seq
        return obs
    if isinstance(message, _PumpEvent):
        obs = pump_event(
            record.patient_id,
            record.device_id,
            message.device_time,
            record.ingest_time,
            message.message_id,
            skew,
            message.event,
            message.alarm or "",
        )
        obs.seq = message.seq
        return obs
    return heartbeat(
        record.patient_id,
        record.device_id,
        message.device_time,
        record.ingest_time,
        message.message_id,
        skew,
    )


def reference_observation(payload: bytes) -> Observation:
    """The Observation of one record through full contract validation (the fallback, and the
    reference the fast path is tested against); raises ``pydantic.ValidationError``."""
    return observe(Telemetry.model_validate_json(payload))


def decode_observation(payload: bytes) -> Observation:
    """The Observation of one telemetry record; raises ``pydantic.ValidationError`` when the
    record breaks the contract."""
    try:
        return _observation(_decode(payload))
    except (msgspec.DecodeError, ValueError, TypeError):
        # msgspec.ValidationError is a DecodeError; anything the fast path does not know how to
        # read exactly is the model's to decide.
        return reference_observation(payload)
