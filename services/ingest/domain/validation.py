"""Validation of one MQTT message: accept it as Telemetry, or reject it with a reason.

Every outcome is explicit. A rejected message becomes a DeadLetter carrying a stable reason code,
a human-readable detail (never payload values: they are PHI) and the raw payload, so nothing is
dropped silently. Conditions that make a reading suspect but still worth keeping (a device clock
far off, an implausible temperature) are flags on the accepted Telemetry, not rejections.

An implausible temperature is the sensor-fault case: the reading is kept with the flag
``implausible_temperature`` and ``temperature_c`` left empty, so no fever rule can read it as a
fever, while the rules still see a technical event on the telemetry stream (a probe off the skin
for hours is itself worth telling the care team about).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import orjson
from pydantic import ValidationError

from schemas.device import (
    PLAUSIBLE_MAX_C,
    PLAUSIBLE_MIN_C,
    AnyDeviceMessage,
    HeartbeatMessage,
    PumpEvent,
    PumpStatus,
    TemperatureReading,
    device_message_adapter,
)
from schemas.events import DeadLetter, Telemetry
from schemas.topics import CHANNEL_SCHEMAS, MQTT_PREFIX, DeviceTopic, parse_topic
from services.ingest.domain.registry import BindingIndex
from services.ingest.domain.times import as_device_utc, as_utc

SERVICE = "ingest"
_DEVICE_MESSAGE = device_message_adapter()

# A device sends on a handful of topics, each thousands of times: their parse is remembered
# (``DeviceTopic`` is immutable). Only device topics (a registered account's id and a channel,
# as the broker's ACL allows), and at most _TOPICS_KEPT of them.
_TOPICS_KEPT = 100_000
_device_topics: dict[str, DeviceTopic] = {}


def parse_device_topic(topic: str) -> DeviceTopic | None:
    """``schemas.topics.parse_topic``, remembered for the topics that are a device's."""
    known = _device_topics.get(topic)
    if known is not None:
        return known
    parsed = parse_topic(topic)
    if parsed is not None:
        if len(_device_topics) >= _TOPICS_KEPT:
            _device_topics.clear()
        _device_topics[topic] = parsed
    return parsed


class RejectReason(StrEnum):
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_CHANNEL = "unknown_channel"
    INVALID_JSON = "invalid_json"
    UNKNOWN_SCHEMA = "unknown_schema"
    SCHEMA_VALIDATION = "schema_validation"
    TOPIC_MISMATCH = "topic_mismatch"
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    NO_BINDING = "no_binding"
    # Same device and seq as an accepted message but another message id: a device that gave a
    # retransmission a new id, or reused a seq. Not dropped silently: an operator decides.
    DUPLICATE_SEQ = "duplicate_seq"


class Flag(StrEnum):
    DEVICE_CLOCK_AHEAD = "device_clock_ahead"
    DEVICE_CLOCK_BEHIND = "device_clock_behind"
    IMPLAUSIBLE_TEMPERATURE = "implausible_temperature"


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    max_payload_bytes: int = 64 * 1024
    max_clock_ahead: timedelta = timedelta(minutes=5)
    max_clock_behind: timedelta = timedelta(days=7)
    # Outside this range a body temperature is a sensor fault (probe off the skin, a fault),
    # not a fever or hypothermia: it is kept and flagged, and no fever rule sees it.
    plausible_min_c: float = PLAUSIBLE_MIN_C
    plausible_max_c: float = PLAUSIBLE_MAX_C


@dataclass(frozen=True, slots=True)
class Accepted:
    telemetry: Telemetry


@dataclass(frozen=True, slots=True)
class Rejected:
    dead_letter: DeadLetter

    @property
    def reason(self) -> str:
        return self.dead_letter.reason


def _first_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"]) or "payload"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


# Telemetry built from values it keeps as they are, without validating them again (see
# ``_telemetry``): what ``Telemetry.model_construct`` does, less its generic work.
_TELEMETRY_FIELDS_SET = frozenset(Telemetry.model_fields) - {"schema_"}
_TELEMETRY_SCHEMA = Telemetry.model_fields["schema_"].default
_DEVICE_MESSAGE_TYPES = (TemperatureReading, PumpStatus, PumpEvent, HeartbeatMessage)
_object_setattr = object.__setattr__
# The tzinfo of pydantic's UTC device times, which admission gives the receive time.
_DEVICE_UTC = as_device_utc(datetime(2000, 1, 1, tzinfo=UTC)).tzinfo
assert list(Telemetry.model_fields) == [
    "schema_",
    "patient_id",
    "device_id",
    "mqtt_topic",
    "ingest_time",
    "message",
    "temperature_c",
    "flags",
]
assert Telemetry.__pydantic_post_init__ is None and not Telemetry.__private_attributes__
assert Telemetry.model_config.get("extra") == "forbid"


def _telemetry(
    patient_id: str,
    device_id: str,
    mqtt_topic: str,
    ingest_time: datetime,
    message: AnyDeviceMessage,
    temperature_c: float | None,
    flags: tuple[str, ...],
) -> Telemetry:
    """``Telemetry(...)`` of these values: the instance pydantic's validation makes, built without
    validating again values pydantic keeps as they are. ``validate_message`` passes a device
    message pydantic built, its (string) device id, a float or None and a tuple of flag strings;
    the caller's values are checked: a string patient id and topic, a datetime in UTC. Anything
    else is validated by pydantic (which refuses a naive ingest time, as it always did)."""
    tz = ingest_time.tzinfo
    if (
        type(patient_id) is str
        and type(mqtt_topic) is str
        and type(ingest_time) is datetime
        and (tz is UTC or tz is _DEVICE_UTC)
        and type(message) in _DEVICE_MESSAGE_TYPES
    ):
        telemetry = Telemetry.__new__(Telemetry)
        _object_setattr(
            telemetry,
            "__dict__",
            {
                "schema_": _TELEMETRY_SCHEMA,
                "patient_id": patient_id,
                "device_id": device_id,
                "mqtt_topic": mqtt_topic,
                "ingest_time": ingest_time,
                "message": message,
                "temperature_c": temperature_c,
                "flags": flags,
            },
        )
        _object_setattr(telemetry, "__pydantic_fields_set__", set(_TELEMETRY_FIELDS_SET))
        _object_setattr(telemetry, "__pydantic_extra__", None)
        _object_setattr(telemetry, "__pydantic_private__", None)
        return telemetry
    return Telemetry(
        patient_id=patient_id,
        device_id=device_id,
        mqtt_topic=mqtt_topic,
        ingest_time=ingest_time,
        message=message,
        temperature_c=temperature_c,
        flags=flags,
    )


def validate_message(
    topic: str,
    payload: bytes,
    received_at: datetime,
    registry: BindingIndex,
    limits: ValidationLimits = ValidationLimits(),
) -> Accepted | Rejected:
    """Decide what one MQTT message is. Pure: the caller supplies the time and the registry."""
    device_topic = parse_device_topic(topic)
    topic_device = device_topic.device_id if device_topic else None

    def reject(reason: RejectReason, detail: str) -> Rejected:
        return Rejected(
            DeadLetter.for_payload(
                reason=reason.value,
                detail=detail,
                service=SERVICE,
                source_topic=topic,
                received_at=received_at,
                payload=payload,
                device_id=topic_device,
            )
        )

    if len(payload) > limits.max_payload_bytes:
        return reject(
            RejectReason.PAYLOAD_TOO_LARGE,
            f"payload is {len(payload)} bytes; the limit is {limits.max_payload_bytes}",
        )
    if device_topic is None:
        return reject(
            RejectReason.UNKNOWN_CHANNEL,
            f"topic is not {MQTT_PREFIX}/{{device_id}}/{{{'|'.join(CHANNEL_SCHEMAS)}}}",
        )
    try:
        # orjson refuses NaN and Infinity (they are not JSON), so they end here as invalid_json.
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        return reject(RejectReason.INVALID_JSON, f"payload is not JSON: {error.__class__.__name__}")
    if not isinstance(document, dict):
        return reject(RejectReason.INVALID_JSON, "payload is JSON but not an object")
    declared = document.get("schema")
    # The channel's own schema is the one case that passes both checks: tried first.
    if declared != CHANNEL_SCHEMAS[device_topic.channel]:
        if declared not in CHANNEL_SCHEMAS.values():
            return reject(
                RejectReason.UNKNOWN_SCHEMA,
                f"schema {str(declared)[:80]!r} is not one this service accepts: "
                f"{sorted(CHANNEL_SCHEMAS.values())}",
            )
        return reject(
            RejectReason.TOPIC_MISMATCH,
            f"schema {declared} does not belong on channel {device_topic.channel}",
        )
    try:
        # The document is already parsed; validating the dict saves a second JSON parse.
        message = _DEVICE_MESSAGE.validate_python(document)
    except ValidationError as error:
        return reject(RejectReason.SCHEMA_VALIDATION, _first_error(error))
    if message.device_id != device_topic.device_id:
        return reject(
            RejectReason.DEVICE_ID_MISMATCH,
            "payload device_id differs from the device in the topic",
        )
    if not registry.knows(message.device_id):
        return reject(RejectReason.UNKNOWN_DEVICE, "device is not registered")
    # The registry's times carry the standard library's UTC (see domain/times.py).
    patient_id = registry.patient_at(message.device_id, as_utc(message.device_time))
    if patient_id is None:
        return reject(
            RejectReason.NO_BINDING,
            f"device is bound to no patient at device time {message.device_time.isoformat()}",
        )

    flags: list[str] = []
    # One subtraction, negative when behind; cheap when both are in the device's UTC.
    ahead = message.device_time - as_device_utc(received_at)
    if ahead > limits.max_clock_ahead:
        flags.append(Flag.DEVICE_CLOCK_AHEAD.value)
    elif -ahead > limits.max_clock_behind:
        flags.append(Flag.DEVICE_CLOCK_BEHIND.value)

    temperature_c: float | None = None
    # The exact type (pydantic builds no subclass): a model's isinstance runs Python code.
    if type(message) is TemperatureReading:
        celsius = message.celsius()
        if limits.plausible_min_c <= celsius <= limits.plausible_max_c:
            temperature_c = celsius
        else:
            flags.append(Flag.IMPLAUSIBLE_TEMPERATURE.value)
    else:
        # A heartbeat is checked and bound like any device's message (its pseudo-patient is the
        # technical care team's), so it proves the same path a reading takes.
        assert type(message) in (PumpStatus, PumpEvent, HeartbeatMessage)

    return Accepted(
        _telemetry(
            patient_id,
            message.device_id,
            topic,
            received_at,
            message,
            temperature_c,
            tuple(flags),
        )
    )
