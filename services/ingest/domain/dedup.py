"""RecentMessages: the window of recently accepted messages that catches duplicates before Kafka.

A device retransmits a message it has no PUBACK for, a hub may forward its buffer twice, and the
broker redelivers whatever ingest had not acknowledged when it lost its connection. All of these
arrive with the same ``message_id``; a device that wrongly gives a retransmission a new id still
reuses its ``seq``. This window remembers both keys of the last ``capacity`` accepted messages
so that a duplicate is dropped (and counted) instead of reaching Kafka a second time.

It is a bounded memory, not a guarantee: a duplicate older than the window, or one arriving after
a restart, passes here and is stopped by the database's unique key instead (Kafka may then carry
it twice, with the same ``message_id``, which consumers already treat as one message). Pure: no
I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import StrEnum
from uuid import UUID


class Duplicate(StrEnum):
    """How a message was recognised as one already accepted."""

    MESSAGE_ID = "message_id"
    SEQ = "seq"


class RecentMessages:
    """The last ``capacity`` accepted messages, by message id and by (device, seq)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        # (device, message id) -> seq; insertion order is age, oldest first. Message ids are kept
        # as their 128-bit integers, not UUID objects: tuples of str and int drop out of the
        # garbage collector's tracking, so a full window (200,000 messages) no longer puts
        # hundreds of thousands of tracked tuples and UUIDs in front of every full collection.
        self._by_id: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._by_seq: dict[tuple[str, int], int] = {}

    def check(self, device_id: str, message_id: UUID, seq: int) -> Duplicate | None:
        """Whether this message repeats one in the window; does not remember it."""
        if (device_id, message_id.int) in self._by_id:
            return Duplicate.MESSAGE_ID
        if (device_id, seq) in self._by_seq:
            return Duplicate.SEQ
        return None

    def remember(self, device_id: str, message_id: UUID, seq: int) -> None:
        """Record an accepted message, forgetting the oldest one when the window is full."""
        key = (device_id, message_id.int)
        if key in self._by_id:
            return
        self._by_id[key] = seq
        self._by_seq[(device_id, seq)] = key[1]
        while len(self._by_id) > self._capacity:
            (old_device, old_id), old_seq = self._by_id.popitem(last=False)
            if self._by_seq.get((old_device, old_seq)) == old_id:
                del self._by_seq[(old_device, old_seq)]

    def __len__(self) -> int:
        return len(self._by_id)
