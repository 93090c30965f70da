"""Message contracts of Vigil: what devices send over MQTT and what services exchange on Kafka.

Versioned pydantic v2 models. Every contract carries a ``schema`` literal naming its version, so
a consumer can reject what it does not understand with a reason instead of guessing. The JSON
Schema files under ``schemas/json`` are generated from these models (``make schemas``) for
device makers; a unit test fails when they are stale.
"""

from schemas.device import (
    DeviceMessage,
    HeartbeatMessage,
    PumpAlarmCode,
    PumpEvent,
    PumpEventKind,
    PumpState,
    PumpStatus,
    TemperatureReading,
    TemperatureSite,
    TemperatureUnit,
    parse_device_message,
)
from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    DeadLetter,
    DeliveryAttempt,
    DeliveryStatus,
    Evidence,
    Page,
    Telemetry,
)

__all__ = [
    "Alert",
    "AlertKind",
    "AlertPhase",
    "AlertPriority",
    "AlertState",
    "DeadLetter",
    "DeliveryAttempt",
    "DeliveryStatus",
    "DeviceMessage",
    "Evidence",
    "HeartbeatMessage",
    "Page",
    "PumpAlarmCode",
    "PumpEvent",
    "PumpEventKind",
    "PumpState",
    "PumpStatus",
    "Telemetry",
    "TemperatureReading",
    "TemperatureSite",
    "TemperatureUnit",
    "parse_device_message",
]
