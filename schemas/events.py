"""Internal events that services exchange on Kafka (contract version 1).

``Telemetry`` is a device message that ingest validated and bound to a patient; ``Alert`` is what
rules decide; ``Page`` and ``DeliveryAttempt`` are what notify did about an alert; ``DeadLetter``
is an input that could not be accepted, with the reason. Field names follow the alert vocabulary
of IHE PCD ACM / IEC 60601-1-8 so that an auditor reads them without a glossary.
"""

from __future__ import annotations

import base64
import hashlib
from enum import StrEnum
from typing import Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.device import DeviceMessage


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Telemetry(_Event):
    """A validated device message, bound to the patient the device served at device time."""

    schema_: Literal["vigil.telemetry.v1"] = Field(default="vigil.telemetry.v1", alias="schema")
    patient_id: str
    device_id: str
    mqtt_topic: str
    ingest_time: AwareDatetime = Field(description="When ingest received the message.")
    message: DeviceMessage
    temperature_c: float | None = Field(
        default=None, description="Temperature normalised to °C (the original stays in message)."
    )
    flags: tuple[str, ...] = Field(
        default=(), description="Conditions noted but not fatal, e.g. 'device_clock_skew'."
    )

    @property
    def device_time(self) -> AwareDatetime:
        return self.message.device_time


class AlertPriority(StrEnum):
    """IEC 60601-1-8 priorities."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    INFO = "info"


class AlertKind(StrEnum):
    PHYSIOLOGICAL = "physiological"
    TECHNICAL = "technical"


class AlertPhase(StrEnum):
    START = "start"
    CONTINUE = "continue"
    ESCALATE = "escalate"
    DEESCALATE = "de-escalate"
    END = "end"


class AlertState(StrEnum):
    ACTIVE = "active"
    LATCHED = "latched"
    INACTIVE = "inactive"


class Evidence(_Event):
    """One observed value and the limit it was compared with."""

    name: str
    value: float
    unit: str
    limit: float
    comparator: Literal[">=", ">", "<=", "<", "=="]
    device_time: AwareDatetime
    message_id: UUID | None = None


class Alert(_Event):
    """A rule's decision about a patient, in one phase of the alert's life."""

    schema_: Literal["vigil.alert.v1"] = Field(default="vigil.alert.v1", alias="schema")
    alert_id: UUID = Field(
        description="Deterministic per (dedup_key, phase): a replay reproduces it."
    )
    dedup_key: str = Field(description="Same for every phase of one alert episode.")
    patient_id: str
    device_id: str
    kind: AlertKind
    code: str
    priority: AlertPriority
    phase: AlertPhase
    state: AlertState
    title: str
    device_time: AwareDatetime = Field(description="Device time of the event that decided it.")
    ingest_time: AwareDatetime = Field(description="Ingest time of the event that decided it.")
    evidence: tuple[Evidence, ...]
    rule_id: str
    rule_version: str = Field(
        description="Rule logic version and a digest of the exact thresholds it used."
    )
    config_version: str | None = Field(
        default=None,
        description="The pinned rules configuration (protocols, overrides, profiles) in force.",
    )


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"


class Page(_Event):
    """The decision to tell a person about an alert, over one channel."""

    schema_: Literal["vigil.page.v1"] = Field(default="vigil.page.v1", alias="schema")
    page_id: UUID
    alert_id: UUID
    dedup_key: str
    patient_id: str
    care_team_id: str
    channel: Literal["email", "sms", "webhook"]
    recipient: str
    idempotency_key: str = Field(description="One delivery per key, whatever the retries.")
    created_at: AwareDatetime


class DeliveryAttempt(_Event):
    """One try at delivering a page, with its outcome."""

    schema_: Literal["vigil.delivery.v1"] = Field(default="vigil.delivery.v1", alias="schema")
    page_id: UUID
    attempt: int = Field(ge=1)
    channel: str
    recipient: str
    status: DeliveryStatus
    at: AwareDatetime
    detail: str | None = None
    provider_message_id: str | None = None


DEAD_LETTER_PAYLOAD_LIMIT = 64 * 1024


class DeadLetter(_Event):
    """An input that could not be accepted, kept with its reason so nothing is dropped silently."""

    schema_: Literal["vigil.deadletter.v1"] = Field(default="vigil.deadletter.v1", alias="schema")
    reason: str = Field(description="Stable machine-readable reason code, e.g. 'invalid_json'.")
    detail: str = Field(description="Human-readable explanation; never carries payload values.")
    service: str
    source_topic: str
    received_at: AwareDatetime
    device_id: str | None = None
    payload_size: int
    payload_sha256: str
    payload_b64: str = Field(
        description=f"The raw payload, cut to {DEAD_LETTER_PAYLOAD_LIMIT} bytes."
    )
    payload_truncated: bool

    @classmethod
    def for_payload(
        cls,
        *,
        reason: str,
        detail: str,
        service: str,
        source_topic: str,
        received_at: AwareDatetime,
        payload: bytes,
        device_id: str | None = None,
    ) -> DeadLetter:
        kept = payload[:DEAD_LETTER_PAYLOAD_LIMIT]
        return cls(
            reason=reason,
            detail=detail,
            service=service,
            source_topic=source_topic,
            received_at=received_at,
            device_id=device_id,
            payload_size=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_b64=base64.b64encode(kept).decode("ascii"),
            payload_truncated=len(kept) < len(payload),
        )
