"""Ingest's use cases: admit a batch of MQTT messages, make it durable, acknowledge it in order.

Order of work for each batch: admit (validate, bind to a patient, drop duplicates) → produce the
accepted telemetry to Kafka and the rejects to the dead-letter topic, and store the readings in
PostgreSQL, concurrently → only then acknowledge the messages to the broker, batches in the order
they arrived (``acknowledge_in_order``). A crash anywhere before the acknowledgement makes the
broker redeliver the message to the persistent session, and the unique keys downstream make the
redelivery harmless. While Kafka or PostgreSQL fails, the batch is retried with backoff and
nothing after it is acknowledged: the broker's session is the durable buffer.

Everything outside is a port (``ports``): the Kafka producer, the store, the broker's
acknowledgement, the answers to devices. Metrics are ``IngestMetrics`` (its own registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter

from schemas.events import Telemetry
from services.ingest.adapters.metrics import IngestMetrics
from services.ingest.domain.admission import Admission, DeviceSeen, admit, is_reading, merge_seen
from services.ingest.domain.dedup import RecentMessages
from services.ingest.domain.registry import BindingIndex
from services.ingest.domain.validation import ValidationLimits, parse_device_topic
from services.ingest.service_layer.answers import AckPublisher
from services.ingest.service_layer.ports import (
    Acknowledger,
    InboundMessage,
    TelemetryProducer,
    TelemetryStore,
)
from vigil.ops import Outage
from vigil.runtime import log_fields, utcnow

log = logging.getLogger("vigil.ingest")


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    limits: ValidationLimits
    # Accepted messages remembered to drop duplicates before Kafka.
    dedup_window: int = 200_000
    registry_refresh_s: float = 30.0
    liveness_flush_s: float = 1.0
    # First retry of a batch that could not be made durable, doubling up to the maximum.
    retry_min_s: float = 0.5
    retry_max_s: float = 15.0


class Progress:
    """Which parts of a batch are already durable, kept across retries of that batch."""

    def __init__(self, admission: Admission) -> None:
        self.telemetry_sent = [False] * len(admission.accepted)
        self.dead_sent = [False] * len(admission.rejected)
        self.kafka_done = False
        self.db_done = False


class IngestPipeline:
    """Admits a batch and makes it durable; the MQTT loop around it is ``entrypoints.consumer``."""

    def __init__(
        self,
        config: PipelineConfig,
        producer: TelemetryProducer,
        store: TelemetryStore,
        metrics: IngestMetrics | None = None,
        answers: AckPublisher | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._config = config
        self._producer = producer
        self._store = store
        self._clock = clock
        self.metrics = metrics or IngestMetrics()
        self._registry = BindingIndex(())
        self._registry_loaded_at = -1e9
        self._window = RecentMessages(config.dedup_window)
        # Records are appended to the producer in batch order, so a patient's events keep their
        # arrival order on its partition even while several batches are in flight.
        self._produce_lock = asyncio.Lock()
        self.subscribed = False
        self.subscriptions = 0  # connections that got as far as subscribing
        self.durable_ok = True
        # Outages of the broker (seen by the consume loop) and of Kafka (probed, so an idle
        # ingest notices too): each logged once when it starts and once when it ends.
        self.broker = Outage("mqtt broker", log)
        self.kafka = Outage("kafka", log)
        # Newest last-seen record per device since the last flush (see keep_liveness).
        self._liveness: dict[str, DeviceSeen] = {}
        # End-to-end acknowledgements to the devices, published off the batch path.
        self.acks = answers

    def ready(self) -> tuple[bool, str]:
        if not self.broker.up:
            return self.broker.readiness()
        if not self.subscribed:
            return False, "not subscribed to the broker"
        if not self.kafka.up:
            return self.kafka.readiness()
        if not self.durable_ok:
            return False, "last batch could not be made durable; retrying"
        return True, "ready"

    async def refresh_registry(self, *, loaded_before: float | None = None) -> None:
        """Reload the registry when it is older than ``registry_refresh_s``, or older than
        ``loaded_before`` (a loop time): a device registered before its message arrived must
        be known when that message is decided, however recently the registry was loaded."""
        loop = asyncio.get_running_loop()
        stale = loop.time() - self._registry_loaded_at >= self._config.registry_refresh_s
        if not stale and (loaded_before is None or self._registry_loaded_at >= loaded_before):
            return
        started = loop.time()
        self._registry = await self._store.load_bindings()
        self._registry_loaded_at = started

    async def admit(self, messages: Sequence[tuple[str, bytes]]) -> Admission:
        """Decide a batch; remembers its accepted messages in the duplicate window."""
        received_at = self._clock()
        arrived = asyncio.get_running_loop().time()
        await self.refresh_registry()
        topics = {topic for topic, _ in messages}
        devices = {t.device_id for t in map(parse_device_topic, topics) if t}
        if any(not self._registry.knows(d) for d in devices):
            # Maybe registered since the last load: reload once per such batch (not per
            # message) before dead-lettering its messages as unknown_device.
            await self.refresh_registry(loaded_before=arrived)
        return admit(messages, received_at, self._registry, self._window, self._config.limits)

    async def handle(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Admit and persist one batch once; raises when it could not be made durable."""
        admission = await self.admit(messages)
        await self.persist(admission, Progress(admission))
        self.record(len(messages), admission)

    async def process(
        self, messages: Sequence[tuple[str, bytes]], stop: asyncio.Event
    ) -> Admission | None:
        """Admit a batch and retry until it is durable; None only when stopped before that."""
        started = time.perf_counter()
        config = self._config
        backoff = config.retry_min_s
        while True:
            try:
                admission = await self.admit(messages)
                break
            except Exception as error:
                if not await self._failed("registry", error, len(messages), backoff, stop):
                    return None
                backoff = min(backoff * 2, config.retry_max_s)
        progress = Progress(admission)
        backoff = config.retry_min_s
        while True:
            try:
                await self.persist(admission, progress)
                self.durable_ok = True
                break
            except Exception as error:
                stage = "kafka" if not progress.kafka_done else "db"
                if not await self._failed(stage, error, len(messages), backoff, stop):
                    return None
                backoff = min(backoff * 2, config.retry_max_s)
        self.record(len(messages), admission)
        merge_seen(self._liveness, admission.seen)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return admission

    async def flush_liveness(self) -> None:
        """Write the last-seen records gathered since the previous flush; on failure keep them
        for the next one (a newer record for the same device supersedes them anyway)."""
        pending, self._liveness = self._liveness, {}
        try:
            await self._store.store_last_seen(list(pending.values()))
        except Exception as error:
            merge_seen(pending, self._liveness.values())
            self._liveness = pending
            self.metrics.batch_failures.labels("liveness").inc()
            log.error("liveness_not_stored", extra=log_fields(error=repr(error)))

    async def keep_liveness(self, stop: asyncio.Event) -> None:
        """Flush liveness every ``liveness_flush_s`` until stopped, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.liveness_flush_s)
            await self.flush_liveness()

    async def _failed(
        self, stage: str, error: Exception, size: int, backoff: float, stop: asyncio.Event
    ) -> bool:
        """Count and log a failed attempt, then wait; False when asked to stop meanwhile."""
        self.durable_ok = False
        self.metrics.batch_failures.labels(stage).inc()
        log.error(
            "batch_not_durable",
            extra=log_fields(stage=stage, error=repr(error), size=size, retry_s=backoff),
        )
        try:
            await asyncio.wait_for(stop.wait(), backoff)
            return False
        except TimeoutError:
            return True

    async def persist(self, admission: Admission, progress: Progress) -> None:
        """Kafka and PostgreSQL, concurrently; returns once both have the batch.

        ``progress`` survives a failed attempt, so a retry re-sends only the records Kafka did
        not acknowledge and skips the database when its transaction already committed.
        """
        steps = []
        if not progress.kafka_done:
            steps.append(self._produce(admission, progress))
        if not progress.db_done:
            steps.append(self._store_batch(admission, progress))
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _produce(self, admission: Admission, progress: Progress) -> None:
        started = time.perf_counter()
        # Telemetry goes one batch per partition; dead letters are rare and go one record at a
        # time. A pipeline heartbeat goes to every partition: it is each partition's arrival
        # clock, so the rules notice a silent home where nothing else arrives (docs/rules.md,
        # "Time").
        records: list[tuple[int, Telemetry]] = []
        everywhere: set[int] = set()
        for i, t in enumerate(admission.accepted):
            if not progress.telemetry_sent[i]:
                records.append((i, t))
                if not is_reading(t):
                    everywhere.add(i)
        pending: list[tuple[list[int], Awaitable[object]]] = []
        async with self._produce_lock:
            if records:
                pending = list(await self._producer.send_telemetry(records, everywhere))
            for j, dead in enumerate(admission.rejected):
                if not progress.dead_sent[j]:
                    pending.append(([-1 - j], await self._producer.send_dead_letter(dead)))
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        failure: BaseException | None = None
        # A heartbeat is in one batch per partition: it is sent only when every one is.
        failed: set[int] = set()
        for (indices, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                failure = failure or result
                failed.update(indices)
        for (indices, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                continue
            for index in indices:
                if index in failed:
                    continue
                if index >= 0:
                    progress.telemetry_sent[index] = True
                else:
                    progress.dead_sent[-1 - index] = True
        if failure is not None:
            raise failure
        progress.kafka_done = True
        self.metrics.kafka_seconds.observe(time.perf_counter() - started)

    async def _store_batch(self, admission: Admission, progress: Progress) -> None:
        if not admission.accepted:
            progress.db_done = True
            return
        started = time.perf_counter()
        inserted = await self._store.store_telemetry(admission.accepted)
        progress.db_done = True
        self.metrics.db_seconds.observe(time.perf_counter() - started)
        # Heartbeats are never stored, so they must not count as readings already stored.
        already = sum(map(is_reading, admission.accepted)) - inserted
        if already:
            # A redelivery after a restart: the window was empty, the unique key caught it.
            self.metrics.duplicates.labels("db").inc(already)

    def record(self, received: int, admission: Admission) -> None:
        m = self.metrics
        accepted = admission.accepted
        m.received.inc(received)
        m.accepted.inc(len(accepted))
        m.batch_size.observe(received)
        for kind, count in admission.duplicates.items():
            m.duplicates.labels(kind).inc(count)
        # Per batch: one increment per flag for all its readings, and every reading's lag
        # observed at once (the counts, buckets and sum one increment and one observation per
        # reading give).
        flagged = Counter(
            flag for telemetry in accepted if telemetry.flags for flag in telemetry.flags
        )
        for flag, count in flagged.items():
            m.flagged.labels(flag).inc(count)
        m.device_lag.observe_each(
            [
                lag
                if (lag := (t.ingest_time - t.message.device_time).total_seconds()) > 0.0
                else 0.0
                for t in accepted
            ],
        )
        for dead in admission.rejected:
            m.rejected.labels(dead.reason).inc()
            log.warning(
                "message_rejected",
                extra=log_fields(
                    reason=dead.reason,
                    detail=dead.detail,
                    device_id=dead.device_id,
                    topic=dead.source_topic,
                    size=dead.payload_size,
                ),
            )


_PACKET_ID = itemgetter(2)  # of an InboundMessage

InFlight = asyncio.Queue[tuple[asyncio.Task[Admission | None], list[InboundMessage]] | None]


async def acknowledge_in_order(
    in_flight: InFlight,
    acker: Acknowledger,
    metrics: IngestMetrics,
    answers: AckPublisher | None = None,
) -> None:
    """PUBACK each batch once it is durable, in the order the batches arrived (MQTT requires
    acknowledgements in arrival order), and hand it to the end-to-end acknowledgements. A batch
    that is not durable ends acknowledging: the broker redelivers it and everything after it, and
    no device is told about any of them (a retransmission answered as stored must never point at
    an original in a batch that was not made durable). Returns at the ``None`` that ends the
    queue."""
    acknowledging = True
    while (item := await in_flight.get()) is not None:
        work, batch = item
        admission = await work
        metrics.batches_in_flight.dec()
        acknowledging = acknowledging and admission is not None
        if acknowledging:
            acker.ack(list(map(_PACKET_ID, batch)))
            if answers is not None and admission is not None:
                answers.add(admission)
