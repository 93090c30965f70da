"""Kafka record bytes -> Observation, fast, with the validated contract as the fallback.

Ingest validated every telemetry record against ``schemas.events.Telemetry`` before it put it on
Kafka, so the rules read the handful of fields they need straight from the JSON (``orjson``)
instead of re-validating the whole model per event. Anything unexpected (a missing field, a type
that does not fit) falls back to full pydantic validation, which either yields the same
Observation or raises ``ValidationError`` for the dead-letter path: a contract break is never
silently skipped.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from schemas.events import Telemetry
from services.rules.domain.observation import (
    CLOCK_SKEW_FLAG,
    HEARTBEAT,
    PUMP_EVENT,
    PUMP_STATUS,
    TEMPERATURE,
    Observation,
    observe,
)

_CHANNELS = {
    "vigil.device.temperature.v1": TEMPERATURE,
    "vigil.device.pump_status.v1": PUMP_STATUS,
    "vigil.device.pump_event.v1": PUMP_EVENT,
    "vigil.device.heartbeat.v1": HEARTBEAT,
}


def _aware(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value


def _fast(data: dict[str, Any]) -> Observation:
    # Each channel builds its Observation in one call, without an intermediate dict of the
    # common fields: this runs for every record the service consumes.
    if data.get("schema") != "vigil.telemetry.v1":
        raise ValueError("not a telemetry record")
    message = data["message"]
    channel = _CHANNELS[message["schema"]]
    flags = data.get("flags")
    skew = CLOCK_SKEW_FLAG in flags if flags else False
    if channel == PUMP_STATUS:
        return Observation(
            patient_id=data["patient_id"],
            device_id=data["device_id"],
            channel=channel,
            device_time=_aware(message["device_time"]),
            ingest_time=_aware(data["ingest_time"]),
            message_id=message["message_id"],
            clock_skew=skew,
            pump_state=message["state"],
            rate_ml_h=float(message["rate_ml_h"]),
            volume_remaining_ml=float(message["volume_remaining_ml"]),
            bag_volume_ml=message.get("bag_volume_ml"),
            battery_pct=message.get("battery_pct"),
        )
    if channel == TEMPERATURE:
        celsius = data.get("temperature_c")
        if not isinstance(celsius, int | float) or message.get("unit", "C") != "C":
            raise ValueError("needs the model to normalise the unit")
        return Observation(
            patient_id=data["patient_id"],
            device_id=data["device_id"],
            channel=channel,
            device_time=_aware(message["device_time"]),
            ingest_time=_aware(data["ingest_time"]),
            message_id=message["message_id"],
            clock_skew=skew,
            temperature_c=float(celsius),
            site=message.get("site", "unknown"),
        )
    common: dict[str, Any] = {
        "patient_id": data["patient_id"],
        "device_id": data["device_id"],
        "channel": channel,
        "device_time": _aware(message["device_time"]),
        "ingest_time": _aware(data["ingest_time"]),
        "message_id": message["message_id"],
        "clock_skew": skew,
    }
    if channel == HEARTBEAT:
        return Observation(**common)
    return Observation(event=message["event"], alarm=message.get("alarm") or "", **common)


def decode_observation(payload: bytes) -> Observation:
    """The Observation of one telemetry record; raises ``pydantic.ValidationError`` when the
    record breaks the contract."""
    try:
        return _fast(orjson.loads(payload))
    except (ValueError, KeyError, TypeError, AttributeError):
        return observe(Telemetry.model_validate_json(payload))
