"""End-to-end acknowledgements, batched per device. Pure: no I/O, no clock.

Once a batch is durable (Kafka and PostgreSQL have it: the moment ingest PUBACKs it to the
broker), every message of it is answered to its device on ``vigil/v1/ack/{device_id}``
(``schemas.ack``): accepted messages and retransmissions of messages stored before as
``stored``, dead-lettered ones as ``rejected`` with their reason. ``PendingAcks`` gathers these
answers per device between two publications and renders them as ``vigil.ingest.ack.v1``
payloads, at most ``max_entries`` entries per payload, oldest first.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson

from schemas.ack import ACK_SCHEMA, ack_topic
from schemas.device import DEVICE_ID_PATTERN
from services.ingest.domain.admission import Admission

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
_MAX_SEQ = 2**63 - 1


@dataclass(slots=True)
class _DeviceAcks:
    stored: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.stored) + len(self.rejected)


@dataclass(frozen=True, slots=True)
class AckMessage:
    device_id: str
    topic: str
    payload: bytes
    stored: int
    rejected: int


def _identity(payload_b64: str, truncated: bool) -> tuple[str | None, int | None]:
    """The message_id and seq of a rejected payload, when it carries valid ones."""
    if truncated:
        return None, None
    try:
        document = orjson.loads(base64.b64decode(payload_b64))
    except (binascii.Error, orjson.JSONDecodeError, ValueError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    message_id: str | None = None
    raw_id = document.get("message_id")
    if isinstance(raw_id, str):
        try:
            message_id = str(UUID(raw_id))
        except ValueError:
            message_id = None
    raw_seq = document.get("seq")
    seq = raw_seq if type(raw_seq) is int and 0 <= raw_seq <= _MAX_SEQ else None
    return message_id, seq


class PendingAcks:
    """Answers not yet published, per device, in the order their batches became durable."""

    def __init__(self, max_entries: int = 500, capacity: int = 200_000) -> None:
        self._devices: dict[str, _DeviceAcks] = {}
        self._max_entries = max_entries
        self._capacity = capacity
        self._size = 0
        self.dropped = 0  # answers not kept because ``capacity`` was reached
        self.unaddressable = 0  # rejects whose topic named no valid device id

    def __len__(self) -> int:
        return self._size

    def _device(self, device_id: str) -> _DeviceAcks | None:
        if self._size >= self._capacity:
            self.dropped += 1
            return None
        self._size += 1
        acks = self._devices.get(device_id)
        if acks is None:
            acks = self._devices[device_id] = _DeviceAcks()
        return acks

    def add(self, admission: Admission) -> None:
        """Every message of a durable batch: accepted, stored before, or rejected."""
        accepted = admission.accepted
        if len(accepted) <= self._capacity - self._size:
            # Room for all of them (the usual case): ``_device``'s work once for the batch.
            devices = self._devices
            self._size += len(accepted)
            for telemetry in accepted:
                acks = devices.get(telemetry.device_id)
                if acks is None:
                    acks = devices[telemetry.device_id] = _DeviceAcks()
                message = telemetry.message
                # The UUID itself: orjson writes it as str() would, when the answer is drained.
                acks.stored.append({"message_id": message.message_id, "seq": message.seq})
        else:
            for telemetry in accepted:
                acks = self._device(telemetry.device_id)
                if acks is not None:
                    message = telemetry.message
                    acks.stored.append({"message_id": message.message_id, "seq": message.seq})
        for device_id, message_id, seq in admission.stored_before:
            acks = self._device(device_id)
            if acks is not None:
                acks.stored.append({"message_id": message_id, "seq": seq})
        for dead in admission.rejected:
            # The topic's device id is the authenticated sender (the ACL): it is the one asked.
            if dead.device_id is None or not _DEVICE_ID.match(dead.device_id):
                self.unaddressable += 1
                continue
            acks = self._device(dead.device_id)
            if acks is None:
                continue
            rejected_id, rejected_seq = _identity(dead.payload_b64, dead.payload_truncated)
            acks.rejected.append(
                {
                    "message_id": rejected_id,
                    "seq": rejected_seq,
                    "payload_sha256": dead.payload_sha256,
                    "reason": dead.reason,
                }
            )

    def drain(self, now: datetime) -> Iterator[AckMessage]:
        """Take every pending answer as ack payloads, ``max_entries`` at most in each."""
        devices, self._devices = self._devices, {}
        self._size = 0
        time = now.isoformat()
        limit = self._max_entries
        for device_id, acks in devices.items():
            stored, rejected = acks.stored, acks.rejected
            while stored or rejected:
                part_rejected, rejected = rejected[:limit], rejected[limit:]
                room = limit - len(part_rejected)
                part_stored, stored = stored[:room], stored[room:]
                payload = orjson.dumps(
                    {
                        "schema": ACK_SCHEMA,
                        "device_id": device_id,
                        "ingest_time": time,
                        "stored": part_stored,
                        "rejected": part_rejected,
                    }
                )
                yield AckMessage(
                    device_id, ack_topic(device_id), payload, len(part_stored), len(part_rejected)
                )

    def put_back(self, message: AckMessage) -> None:
        """An ack that could not be published: its answers wait for the next publication."""
        document = orjson.loads(message.payload)
        acks = self._devices.setdefault(message.device_id, _DeviceAcks())
        acks.stored[:0] = document["stored"]
        acks.rejected[:0] = document["rejected"]
        self._size += message.stored + message.rejected
