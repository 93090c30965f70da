"""Admission of one batch: validation outcomes plus the duplicate window give what goes where.

``admit`` is the pure heart of ingest: for each MQTT message of a batch it decides whether it is
new telemetry (to Kafka and PostgreSQL), a rejection (to the dead-letter topic, with a reason), or
a duplicate of an accepted message (dropped, counted). It also computes each device's last-seen
record for the liveness table. No I/O, no clock: the receive time is passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from schemas.device import HeartbeatMessage
from schemas.events import DeadLetter, Telemetry
from services.ingest.domain.dedup import Duplicate, RecentMessages
from services.ingest.domain.registry import BindingIndex
from services.ingest.domain.times import as_device_utc
from services.ingest.domain.validation import (
    SERVICE,
    Accepted,
    RejectReason,
    ValidationLimits,
    validate_message,
)


def is_reading(t: Telemetry) -> bool:
    """Whether ``t`` is a reading, stored in a table of its own; a pipeline heartbeat is not:
    it goes to Kafka only (to every partition), and moves its device's last-seen row.

    The exact type, not ``isinstance``: a device message is one of the union's classes, none
    subclassed, and a pydantic model's ``isinstance`` runs Python code (twice per reading)."""
    return type(t.message) is not HeartbeatMessage


@dataclass(frozen=True, slots=True)
class DeviceSeen:
    """The newest message of one device in a batch, by device time (arrival order may differ)."""

    device_id: str
    patient_id: str
    last_device_time: datetime
    last_ingest_time: datetime
    last_seq: int
    channel: str


def merge_seen(into: dict[str, DeviceSeen], seen: Iterable[DeviceSeen]) -> None:
    """Fold newer last-seen records into ``into`` (device -> record): the newest device time
    wins the reading fields, the latest arrival wins ``last_ingest_time``."""
    for new in seen:
        old = into.get(new.device_id)
        if old is None:
            into[new.device_id] = new
            continue
        newest = new if new.last_device_time >= old.last_device_time else old
        into[new.device_id] = DeviceSeen(
            device_id=newest.device_id,
            patient_id=newest.patient_id,
            last_device_time=newest.last_device_time,
            last_ingest_time=max(old.last_ingest_time, new.last_ingest_time),
            last_seq=newest.last_seq,
            channel=newest.channel,
        )


@dataclass(slots=True)
class Admission:
    accepted: list[Telemetry] = field(default_factory=list)
    rejected: list[DeadLetter] = field(default_factory=list)
    duplicates: Counter[str] = field(default_factory=Counter)
    seen: list[DeviceSeen] = field(default_factory=list)
    # Retransmissions of messages accepted before (device id, message id, seq): dropped here,
    # yet stored, so the device is told they are (the end-to-end acknowledgement).
    stored_before: list[tuple[str, UUID, int]] = field(default_factory=list)

    @property
    def rejected_by_reason(self) -> Counter[str]:
        return Counter(d.reason for d in self.rejected)


def admit(
    messages: Sequence[tuple[str, bytes]],
    received_at: datetime,
    registry: BindingIndex,
    window: RecentMessages,
    limits: ValidationLimits,
) -> Admission:
    """Decide every message of a batch, remembering the accepted ones in ``window``.

    A message is remembered as soon as it is admitted, before it is durable: the caller either
    makes the whole batch durable before acknowledging anything after it, or stops the process
    (which forgets the window), so a duplicate dropped here always has a durable original.
    """
    # Compared with each device time, and written with it: in the same tzinfo (domain/times.py).
    received_at = as_device_utc(received_at)
    result = Admission()
    newest: dict[str, DeviceSeen] = {}
    for topic, payload in messages:
        outcome = validate_message(topic, payload, received_at, registry, limits)
        if not isinstance(outcome, Accepted):
            result.rejected.append(outcome.dead_letter)
            continue
        telemetry = outcome.telemetry
        message = telemetry.message
        duplicate = window.check(telemetry.device_id, message.message_id, message.seq)
        if duplicate is Duplicate.MESSAGE_ID:
            result.duplicates[duplicate.value] += 1
            result.stored_before.append((telemetry.device_id, message.message_id, message.seq))
            continue
        if duplicate is Duplicate.SEQ:
            result.duplicates[duplicate.value] += 1
            result.rejected.append(
                DeadLetter.for_payload(
                    reason=RejectReason.DUPLICATE_SEQ.value,
                    detail="seq already used by another message id of this device",
                    service=SERVICE,
                    source_topic=topic,
                    received_at=received_at,
                    payload=payload,
                    device_id=telemetry.device_id,
                )
            )
            continue
        window.remember(telemetry.device_id, message.message_id, message.seq)
        result.accepted.append(telemetry)
        seen = newest.get(telemetry.device_id)
        if seen is None or message.device_time > seen.last_device_time:
            newest[telemetry.device_id] = DeviceSeen(
                device_id=telemetry.device_id,
                patient_id=telemetry.patient_id,
                last_device_time=message.device_time,
                last_ingest_time=received_at,
                last_seq=message.seq,
                channel=telemetry.mqtt_topic.rsplit("/", 1)[-1],
            )
    # Sorted so concurrent batches lock liveness rows in the same order (no deadlock).
    result.seen = [newest[d] for d in sorted(newest)]
    return result
