"""A device's outbox: every message kept until ingest answers it end to end. Pure.

The reference behaviour of docs/mqtt.md section 4.1, for a device and for a hub publishing on
behalf of several devices: a message enters the outbox when it is first published and leaves it
only when a ``vigil.ingest.ack.v1`` on ``vigil/v1/ack/{device_id}`` names it, as stored or as
rejected. A message not answered ``resend_after_s`` after it was last sent is due again and is
sent unchanged (same payload bytes: same ``message_id``, ``seq`` and ``device_time``), oldest
first. A PUBACK does not take a message out: a broker can lose what it acknowledged.
Time is passed in (monotonic seconds); the caller owns the connection and the clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

#: How long a device waits for an answer before sending a message again (docs/mqtt.md 4.1).
RESEND_AFTER_S = 60.0


@dataclass(slots=True)
class Entry:
    device_id: str
    message_id: str
    seq: int
    topic: str
    payload: bytes
    sent_at: float
    sends: int = 1


@dataclass(frozen=True, slots=True)
class Rejection:
    device_id: str
    message_id: str | None
    seq: int | None
    reason: str


@dataclass(slots=True)
class Settled:
    stored: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    unknown: int = 0  # answers naming no message in the outbox (answered twice, or not ours)


class Outbox:
    def __init__(self, resend_after_s: float = RESEND_AFTER_S) -> None:
        self.resend_after_s = resend_after_s
        # message id -> entry, in first-publication order (seq order for each device).
        self._entries: dict[str, Entry] = {}
        self.resent = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._entries

    def add(
        self, device_id: str, message_id: str, seq: int, topic: str, payload: bytes, now: float
    ) -> None:
        """A message just published for the first time."""
        if message_id not in self._entries:
            self._entries[message_id] = Entry(device_id, message_id, seq, topic, payload, now)

    def due(self, now: float, limit: int | None = None) -> list[Entry]:
        """Messages to send again now, oldest first; each counts as sent at ``now``."""
        out: list[Entry] = []
        for entry in self._entries.values():
            if limit is not None and len(out) >= limit:
                break
            if now - entry.sent_at >= self.resend_after_s:
                entry.sent_at = now
                entry.sends += 1
                out.append(entry)
        self.resent += len(out)
        return out

    def next_due(self) -> float | None:
        """When the oldest unanswered message falls due, or None when the outbox is empty."""
        if not self._entries:
            return None
        return min(e.sent_at for e in self._entries.values()) + self.resend_after_s

    def settle(self, ack: bytes | dict[str, Any]) -> Settled:
        """Take out every message an acknowledgement names; returns what it said."""
        document = orjson.loads(ack) if isinstance(ack, bytes | bytearray) else ack
        result = Settled()
        if document.get("schema") != "vigil.ingest.ack.v1":
            return result
        device_id = document.get("device_id")
        for stored in document.get("stored", ()):
            entry = self._entries.get(str(stored.get("message_id")))
            if entry is None or entry.device_id != device_id:
                result.unknown += 1
                continue
            del self._entries[entry.message_id]
            result.stored += 1
        for rejected in document.get("rejected", ()):
            entry = self._find_rejected(device_id, rejected)
            if entry is None:
                result.unknown += 1
                continue
            del self._entries[entry.message_id]
            result.rejected.append(
                Rejection(entry.device_id, entry.message_id, entry.seq, str(rejected["reason"]))
            )
        return result

    def _find_rejected(self, device_id: object, rejected: dict[str, Any]) -> Entry | None:
        message_id = rejected.get("message_id")
        if message_id is not None:
            entry = self._entries.get(str(message_id))
            if entry is not None and entry.device_id == device_id:
                return entry
        # No readable message_id: the payload's hash says which message it was.
        digest = rejected.get("payload_sha256")
        for entry in self._device_entries(device_id):
            if hashlib.sha256(entry.payload).hexdigest() == digest:
                return entry
        return None

    def _device_entries(self, device_id: object) -> Iterable[Entry]:
        return [e for e in self._entries.values() if e.device_id == device_id]
