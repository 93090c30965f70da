"""What home devices publish over MQTT (contract version 1).

Devices publish JSON to ``vigil/v1/dev/{device_id}/{channel}`` (see ``schemas.topics``). Every
message carries a message id (unique per message, reused on retransmission), a per-device
sequence number (monotonic, never reused while the device keeps its identity) and the device's own
timestamp with an explicit UTC offset. A naive timestamp is refused: a reading whose time cannot
be placed on the clock cannot be placed in a fever's duration either.
"""

from __future__ import annotations

import math
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

DeviceId = Annotated[
    str,
    Field(
        pattern=DEVICE_ID_PATTERN,
        description=(
            "The device's identity, equal to its MQTT username and the {device_id} topic level."
        ),
    ),
]


class _DeviceMessageBase(BaseModel):
    """Fields every device message has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    message_id: UUID = Field(description="Unique per message; a retransmission reuses it.")
    device_id: DeviceId
    seq: int = Field(
        ge=0,
        le=2**63 - 1,
        description=(
            "Per-device sequence number, shared by the device's channels: +1 with every new "
            "message, never reused. A gap still open 30 min after it is seen is raised as data "
            "lost (docs/mqtt.md, section 4)."
        ),
    )
    device_time: AwareDatetime = Field(
        description="When the device measured or observed this, RFC 3339 with an offset."
    )

    @field_validator("device_time")
    @classmethod
    def _device_time_in_range(cls, value: datetime) -> datetime:
        # Years outside this window are how a seconds/milliseconds/nanoseconds mix-up shows.
        if not 2000 <= value.year <= 2100:
            raise ValueError("device_time is outside years 2000-2100 (wrong epoch unit?)")
        return value


class TemperatureUnit(StrEnum):
    CELSIUS = "C"
    FAHRENHEIT = "F"


class TemperatureSite(StrEnum):
    """Where the temperature was taken; sites read differently, so rules may offset them."""

    AXILLARY = "axillary"
    ORAL = "oral"
    TYMPANIC = "tympanic"
    TEMPORAL = "temporal"
    SKIN_PATCH = "skin_patch"
    UNKNOWN = "unknown"


# The plausible range of a body temperature. Outside it a reading is a sensor fault (probe off
# the skin, a broken thermometer), not a fever or hypothermia: ingest keeps it, flagged
# ``implausible_temperature``, and the rules raise a technical sensor-fault alert for it and
# never read it as a temperature (docs/mqtt.md).
PLAUSIBLE_MIN_C = 30.0
PLAUSIBLE_MAX_C = 43.0


class TemperatureReading(_DeviceMessageBase):
    """One body-temperature measurement from a spot-check thermometer or a wearable patch."""

    schema_: Literal["vigil.device.temperature.v1"] = Field(
        alias="schema", description="Contract name and version."
    )
    value: float = Field(description="The measured temperature in `unit`.")
    unit: TemperatureUnit = TemperatureUnit.CELSIUS
    site: TemperatureSite = TemperatureSite.UNKNOWN

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("value must be a finite number")
        return value

    def celsius(self) -> float:
        """The value in degrees Celsius, rounded to what a thermometer resolves."""
        if self.unit is TemperatureUnit.FAHRENHEIT:
            return round((self.value - 32.0) * 5.0 / 9.0, 2)
        return self.value


class PumpState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ALARMING = "alarming"


class PumpStatus(_DeviceMessageBase):
    """The pump's periodic status: what it is doing and how much drug is left."""

    schema_: Literal["vigil.device.pump_status.v1"] = Field(alias="schema")
    state: PumpState
    rate_ml_h: float = Field(ge=0, le=1000, description="Programmed rate in mL/h.")
    volume_remaining_ml: float = Field(ge=0, le=5000, description="Reservoir volume left, mL.")
    bag_volume_ml: float | None = Field(
        default=None, ge=0, le=5000, description="Volume hung at the last bag change, mL."
    )
    battery_pct: float | None = Field(default=None, ge=0, le=100)

    @field_validator("rate_ml_h", "volume_remaining_ml", "bag_volume_ml", "battery_pct")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class PumpAlarmCode(StrEnum):
    """Technical alarms an ambulatory infusion pump raises."""

    OCCLUSION_UPSTREAM = "occlusion_upstream"
    OCCLUSION_DOWNSTREAM = "occlusion_downstream"
    AIR_IN_LINE = "air_in_line"
    RESERVOIR_LOW = "reservoir_low"
    RESERVOIR_EMPTY = "reservoir_empty"
    BATTERY_LOW = "battery_low"
    BATTERY_DEPLETED = "battery_depleted"
    PUMP_ERROR = "pump_error"
    DOOR_OPEN = "door_open"
    INFUSION_STOPPED = "infusion_stopped"


class PumpEventKind(StrEnum):
    ALARM_RAISED = "alarm_raised"
    ALARM_CLEARED = "alarm_cleared"
    INFUSION_STARTED = "infusion_started"
    INFUSION_PAUSED = "infusion_paused"
    INFUSION_STOPPED = "infusion_stopped"
    BAG_CHANGED = "bag_changed"


class PumpEvent(_DeviceMessageBase):
    """Something that happened on the pump: an alarm raised or cleared, or a state change."""

    schema_: Literal["vigil.device.pump_event.v1"] = Field(alias="schema")
    event: PumpEventKind
    alarm: PumpAlarmCode | None = Field(
        default=None, description="Required with alarm_raised and alarm_cleared."
    )
    detail: str | None = Field(default=None, max_length=500)

    @field_validator("alarm")
    @classmethod
    def _alarm_matches_event(cls, value: PumpAlarmCode | None, info: Any) -> PumpAlarmCode | None:
        event = info.data.get("event")
        is_alarm_event = event in (PumpEventKind.ALARM_RAISED, PumpEventKind.ALARM_CLEARED)
        if is_alarm_event and value is None:
            raise ValueError("alarm is required when event is alarm_raised or alarm_cleared")
        return value


class HeartbeatMessage(_DeviceMessageBase):
    """The pipeline's own pulse: a service device proving that MQTT, ingest and rules still carry
    messages to notify. It says nothing about a patient; only the common fields exist, so no
    clinical value can travel on it by mistake."""

    schema_: Literal["vigil.device.heartbeat.v1"] = Field(alias="schema")
    seq: int = Field(
        ge=0,
        le=2**63 - 1,
        description="The publisher's sequence number, +1 per heartbeat, never reused; no "
        "data-lost alert is decided from it (a missing heartbeat is the self-watch's page).",
    )


AnyDeviceMessage = TemperatureReading | PumpStatus | PumpEvent | HeartbeatMessage

DeviceMessage = Annotated[AnyDeviceMessage, Field(discriminator="schema_")]

_DEVICE_MESSAGE: TypeAdapter[AnyDeviceMessage] = TypeAdapter(DeviceMessage)


def parse_device_message(payload: bytes | str) -> AnyDeviceMessage:
    """Parse and validate a device payload; raises ``pydantic.ValidationError``."""
    return _DEVICE_MESSAGE.validate_json(payload)


def device_message_adapter() -> TypeAdapter[AnyDeviceMessage]:
    return _DEVICE_MESSAGE
