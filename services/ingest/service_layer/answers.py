"""Publishes the end-to-end acknowledgements (``services.ingest.domain.acks``) off the batch path.

The batch path only hands each durable admission to ``AckPublisher.add`` (appending to per-device
lists); a task of its own publishes what gathered every ``ack_linger_ms``, with QoS 1, through an
``AnswerSink`` port: the ingest connection (the ACL lets only ingest write ``vigil/v1/ack/#``).
An acknowledgement is a courtesy that saves the device a resend, not a guarantee: one lost with
the connection, or never published, makes the device send its message again after its timeout,
and the duplicate is answered as stored. So nothing here waits on the broker, and nothing here
can hold ingest back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime

from services.ingest.adapters.metrics import IngestMetrics
from services.ingest.domain.acks import PendingAcks
from services.ingest.domain.admission import Admission
from services.ingest.service_layer.ports import AnswerSink
from vigil.runtime import log_fields, utcnow

log = logging.getLogger("vigil.ingest.acks")

# The connection keeps QoS 1 messages beyond the broker's receive maximum in a queue of its own;
# past this many unacknowledged or queued, the publisher holds its answers back instead.
_BACKLOG_LIMIT = 10_000


class AckPublisher:
    def __init__(
        self,
        metrics: IngestMetrics,
        *,
        linger_s: float = 0.1,
        max_entries: int = 500,
        capacity: int = 200_000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.pending = PendingAcks(max_entries=max_entries, capacity=capacity)
        self._metrics = metrics
        self._linger_s = linger_s
        self._clock = clock
        self._dropped_seen = 0
        self._unaddressable_seen = 0

    def add(self, admission: Admission) -> None:
        """Answer every message of a batch that is now durable (hot path: appends only)."""
        self.pending.add(admission)

    def publish_pending(self, sink: AnswerSink) -> int:
        """Publish every pending answer now; returns the messages published."""
        self._count_not_sent()
        if len(self.pending) == 0 or sink.backlog() > _BACKLOG_LIMIT:
            self._metrics.acks_pending.set(len(self.pending))
            return 0
        published = 0
        failed = False
        for message in self.pending.drain(self._clock()):
            if failed:
                self.pending.put_back(message)
                continue
            if not sink.publish(message.topic, message.payload):
                # Not connected: keep the answers for the next connection.
                failed = True
                self.pending.put_back(message)
                continue
            published += 1
            self._metrics.acks_answered.labels("stored").inc(message.stored)
            self._metrics.acks_answered.labels("rejected").inc(message.rejected)
        self._metrics.acks_published.inc(published)
        self._metrics.acks_pending.set(len(self.pending))
        return published

    def _count_not_sent(self) -> None:
        pending = self.pending
        if pending.dropped != self._dropped_seen:
            self._metrics.acks_not_sent.labels("capacity").inc(pending.dropped - self._dropped_seen)
            if self._dropped_seen == 0:
                log.warning("acks_dropped", extra=log_fields(capacity=len(pending)))
            self._dropped_seen = pending.dropped
        if pending.unaddressable != self._unaddressable_seen:
            self._metrics.acks_not_sent.labels("no_device").inc(
                pending.unaddressable - self._unaddressable_seen
            )
            self._unaddressable_seen = pending.unaddressable

    async def run(self, sink: AnswerSink, stop: asyncio.Event) -> None:
        """Publish what gathered every ``linger_s`` until ``stop``, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._linger_s)
            try:
                self.publish_pending(sink)
            except Exception as error:  # never let acknowledgements take ingest down
                log.error("acks_not_published", extra=log_fields(error=repr(error)))
