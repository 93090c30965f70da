"""Ingest composition root: wires Mosquitto, the validator, Kafka and PostgreSQL together.

Order of work for each batch of MQTT messages: admit (validate, bind to a patient, drop
duplicates) → produce accepted telemetry to Kafka (keyed by patient, idempotent producer,
acks=all) and rejects to the dead-letter topic, and write readings and device liveness to
PostgreSQL → only then acknowledge the messages to the broker (MQTT manual ack, in the order they
arrived). A crash anywhere before the acknowledgement makes the broker redeliver the message to
the persistent session, and the unique keys downstream make the redelivery harmless.

Delivery contract this gives: every message the broker accepted is stored in PostgreSQL exactly
once (unique key), and is in Kafka at least once. A second Kafka copy only happens when ingest dies
(or Kafka fails part of a batch) between producing and acknowledging; it carries the same
``message_id``, which consumers already treat as one message. While Kafka or PostgreSQL is down,
the batch is retried with backoff, nothing more is read beyond the batches in flight, and nothing
is acknowledged: the broker's persistent session is the durable buffer (no local spool).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import struct
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import aiomqtt
import asyncpg
import paho.mqtt.client as paho_mqtt
from aiokafka import AIOKafkaProducer
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas.events import DeadLetter, Telemetry
from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC
from schemas.topics import MQTT_SUBSCRIPTION, parse_topic
from services.ingest.adapters.ack_publisher import AckPublisher
from services.ingest.adapters.kafka_batches import PartitionBatches
from services.ingest.adapters.metrics import IngestMetrics
from services.ingest.adapters.mqtt_inbound import InboundMessage, Inbox
from services.ingest.adapters.postgres import (
    is_reading,
    load_bindings,
    store_last_seen,
    store_telemetry,
)
from services.ingest.domain.admission import Admission, DeviceSeen, admit, merge_seen
from services.ingest.domain.dedup import RecentMessages
from services.ingest.domain.registry import BindingIndex
from services.ingest.domain.validation import ValidationLimits
from services.ingest.settings import IngestSettings
from vigil.kafka import make_producer
from vigil.ops import OpsServer, Outage, kafka_probe, start_ops_server, watch_dependency
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow

log = logging.getLogger("vigil.ingest")
_PUBACK = struct.Struct("!BBH")


class IngestPipeline:
    """Admits a batch and makes it durable; the MQTT loop around it lives in ``_consume``."""

    def __init__(
        self,
        settings: IngestSettings,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool,
        metrics: IngestMetrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._producer = producer
        self._pool = pool
        self._clock = clock
        self.metrics = metrics or IngestMetrics()
        self._limits = ValidationLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_clock_ahead=timedelta(seconds=settings.max_clock_ahead_s),
            max_clock_behind=timedelta(seconds=settings.max_clock_behind_s),
        )
        self._registry = BindingIndex(())
        self._registry_loaded_at = -1e9
        self._window = RecentMessages(settings.dedup_window)
        # Records are appended to the producer in batch order, so a patient's events keep their
        # arrival order on its partition even while several batches are in flight.
        self._produce_lock = asyncio.Lock()
        self._telemetry_batches = PartitionBatches(producer)
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
        self.acks: AckPublisher | None = None
        if settings.acks_enabled:
            self.acks = AckPublisher(
                self.metrics,
                linger_s=settings.ack_linger_ms / 1000,
                max_entries=settings.ack_max_entries,
                capacity=settings.ack_pending_max,
                clock=clock,
            )

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
        stale = loop.time() - self._registry_loaded_at >= self._settings.registry_refresh_s
        if not stale and (loaded_before is None or self._registry_loaded_at >= loaded_before):
            return
        started = loop.time()
        self._registry = await load_bindings(self._pool)
        self._registry_loaded_at = started

    async def admit(self, messages: Sequence[tuple[str, bytes]]) -> Admission:
        """Decide a batch; remembers its accepted messages in the duplicate window."""
        received_at = self._clock()
        arrived = asyncio.get_running_loop().time()
        await self.refresh_registry()
        devices = {t.device_id for t in map(parse_topic, {topic for topic, _ in messages}) if t}
        if any(not self._registry.knows(d) for d in devices):
            # Maybe registered since the last load: reload once per such batch (not per
            # message) before dead-lettering its messages as unknown_device.
            await self.refresh_registry(loaded_before=arrived)
        return admit(messages, received_at, self._registry, self._window, self._limits)

    async def handle(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Admit and persist one batch once; raises when it could not be made durable."""
        admission = await self.admit(messages)
        await self.persist(admission, _Progress(admission))
        self.record(len(messages), admission)

    async def process(
        self, messages: Sequence[tuple[str, bytes]], stop: asyncio.Event
    ) -> Admission | None:
        """Admit a batch and retry until it is durable; None only when stopped before that."""
        started = time.perf_counter()
        backoff = 0.5
        while True:
            try:
                admission = await self.admit(messages)
                break
            except Exception as error:
                if not await self._failed("registry", error, len(messages), backoff, stop):
                    return None
                backoff = min(backoff * 2, 15.0)
        progress = _Progress(admission)
        backoff = 0.5
        while True:
            try:
                await self.persist(admission, progress)
                self.durable_ok = True
                break
            except Exception as error:
                stage = "kafka" if not progress.kafka_done else "db"
                if not await self._failed(stage, error, len(messages), backoff, stop):
                    return None
                backoff = min(backoff * 2, 15.0)
        self.record(len(messages), admission)
        merge_seen(self._liveness, admission.seen)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return admission

    async def flush_liveness(self) -> None:
        """Write the last-seen records gathered since the previous flush; on failure keep them
        for the next one (a newer record for the same device supersedes them anyway)."""
        pending, self._liveness = self._liveness, {}
        try:
            await store_last_seen(self._pool, list(pending.values()))
        except Exception as error:
            merge_seen(pending, self._liveness.values())
            self._liveness = pending
            self.metrics.batch_failures.labels("liveness").inc()
            log.error("liveness_not_stored", extra=log_fields(error=repr(error)))

    async def keep_liveness(self, stop: asyncio.Event) -> None:
        """Flush liveness every ``liveness_flush_s`` until stopped, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._settings.liveness_flush_s)
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

    async def persist(self, admission: Admission, progress: _Progress) -> None:
        """Kafka and PostgreSQL, concurrently; returns once both have the batch.

        ``progress`` survives a failed attempt, so a retry re-sends only the records Kafka did
        not acknowledge and skips the database when its transaction already committed.
        """
        steps = []
        if not progress.kafka_done:
            steps.append(self._produce(admission, progress))
        if not progress.db_done:
            steps.append(self._store(admission, progress))
        results = await asyncio.gather(*steps, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _produce(self, admission: Admission, progress: _Progress) -> None:
        started = time.perf_counter()
        # Telemetry goes one batch per partition (see PartitionBatches); dead letters are rare
        # and go one record at a time. A pipeline heartbeat goes to every partition: it is each
        # partition's arrival clock, so the rules notice a silent home where nothing else
        # arrives (docs/rules.md, "Time").
        telemetry: list[tuple[int, bytes, bytes]] = []
        everywhere: set[int] = set()
        for i, t in enumerate(admission.accepted):
            if not progress.telemetry_sent[i]:
                telemetry.append((i, t.patient_id.encode(), _encode(t)))
                if not is_reading(t):
                    everywhere.add(i)
        pending: list[tuple[list[int], asyncio.Future[object]]] = []
        async with self._produce_lock:
            if telemetry:
                pending = await self._telemetry_batches.send(TELEMETRY_TOPIC, telemetry, everywhere)
            for j, dead in enumerate(admission.rejected):
                if not progress.dead_sent[j]:
                    future = await self._producer.send(
                        DEADLETTER_TOPIC,
                        _encode(dead),
                        key=(dead.device_id or "").encode() or None,
                    )
                    pending.append(([-1 - j], future))
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

    async def _store(self, admission: Admission, progress: _Progress) -> None:
        if not admission.accepted:
            progress.db_done = True
            return
        started = time.perf_counter()
        inserted = await store_telemetry(self._pool, admission.accepted)
        progress.db_done = True
        self.metrics.db_seconds.observe(time.perf_counter() - started)
        # Heartbeats are never stored, so they must not count as readings already stored.
        already = sum(map(is_reading, admission.accepted)) - inserted
        if already:
            # A redelivery after a restart: the window was empty, the unique key caught it.
            self.metrics.duplicates.labels("db").inc(already)

    def record(self, received: int, admission: Admission) -> None:
        m = self.metrics
        m.received.inc(received)
        m.accepted.inc(len(admission.accepted))
        m.batch_size.observe(received)
        for kind, count in admission.duplicates.items():
            m.duplicates.labels(kind).inc(count)
        for telemetry in admission.accepted:
            for flag in telemetry.flags:
                m.flagged.labels(flag).inc()
            lag = (telemetry.ingest_time - telemetry.message.device_time).total_seconds()
            m.device_lag.observe(max(lag, 0.0))
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


class _Progress:
    """Which parts of a batch are already durable, kept across retries of that batch."""

    def __init__(self, admission: Admission) -> None:
        self.telemetry_sent = [False] * len(admission.accepted)
        self.dead_sent = [False] * len(admission.rejected)
        self.kafka_done = False
        self.db_done = False


async def _next_batch(
    inbox: Inbox,
    disconnected: asyncio.Future[None],
    batch_max: int,
    linger_s: float,
    stop: asyncio.Event,
) -> list[InboundMessage]:
    """Up to ``batch_max`` messages: waits for the first (returning [] once ``stop`` is set),
    then at most ``linger_s`` for more. Raises MqttError when disconnected with nothing read."""
    loop = asyncio.get_running_loop()
    batch = inbox.take(batch_max)
    deadline = 0.0
    while len(batch) < batch_max:
        if batch:
            deadline = deadline or loop.time() + linger_s
            wait_s = deadline - loop.time()
            if wait_s <= 0:
                break
        elif stop.is_set():
            break
        else:
            wait_s = 0.25  # look at ``stop`` again; never cancelled from outside
        if disconnected.done():
            if batch:
                break  # make what was read durable first; acks are dropped with the link
            raise aiomqtt.MqttError("disconnected from the broker")
        await inbox.wait({disconnected}, wait_s)
        batch.extend(inbox.take(batch_max - len(batch)))
    return batch


def subscription(settings: IngestSettings) -> str:
    """The device topics directly, or through the share group when one is set."""
    if not settings.mqtt_share_group:
        return MQTT_SUBSCRIPTION
    return f"$share/{settings.mqtt_share_group}/{MQTT_SUBSCRIPTION}"


def _mqtt_client(settings: IngestSettings) -> aiomqtt.Client:
    connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    # MQTT 5 persistent session: clean start off plus an expiry, so messages published while
    # ingest is down (or restarting after a crash) wait for it in the broker.
    connect.SessionExpiryInterval = settings.session_expiry_s
    # How many unacknowledged messages the broker may have in flight to us: enough to keep every
    # batch slot full, bounded so a slow batch cannot make the broker push unlimited messages.
    connect.ReceiveMaximum = min(65535, settings.batch_max * (settings.batches_in_flight + 1))
    tls = None
    if settings.mqtt_tls_ca_file is not None:
        tls = aiomqtt.TLSParameters(ca_certs=str(settings.mqtt_tls_ca_file))
    return aiomqtt.Client(
        settings.mqtt.host,
        settings.mqtt.port,
        username=settings.mqtt_username,
        password=settings.mqtt_password,
        identifier=settings.mqtt_client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=connect,
        keepalive=settings.mqtt.keepalive_s,
        tls_params=tls,
    )


async def _consume(settings: IngestSettings, pipeline: IngestPipeline, stop: asyncio.Event) -> None:
    client = _mqtt_client(settings)
    # Acknowledge a message to the broker only after it is in Kafka and PostgreSQL, so a crash
    # makes the broker redeliver it instead of losing it. aiomqtt exposes no switch for this;
    # paho's manual acknowledgement is set on the wrapped client before connecting.
    paho: paho_mqtt.Client = client._client
    paho.manual_ack_set(True)
    # PUBLISH packets are decoded by ingest itself, not by paho and aiomqtt (see mqtt_inbound).
    inbox = Inbox()
    inbox.install(paho)
    metrics = pipeline.metrics
    async with client:
        topic = subscription(settings)
        await client.subscribe(topic, qos=1)
        pipeline.subscribed = True
        pipeline.subscriptions += 1
        pipeline.broker.observe(True, time.monotonic())
        metrics.mqtt_connected.set(1)
        log.info("ingest_subscribed", extra=log_fields(topic=topic))
        in_flight: asyncio.Queue[tuple[asyncio.Task[Admission | None], list[InboundMessage]] | None]
        in_flight = asyncio.Queue(maxsize=settings.batches_in_flight)
        acker = asyncio.create_task(_acknowledge_in_order(in_flight, paho, metrics, pipeline.acks))
        acks_stop = asyncio.Event()
        acks = None
        if pipeline.acks is not None:
            acks = asyncio.create_task(pipeline.acks.run(paho, acks_stop))
        try:
            while not stop.is_set() and not acker.done():
                batch = await _next_batch(
                    inbox,
                    client._disconnected,
                    settings.batch_max,
                    settings.batch_linger_ms / 1000,
                    stop,
                )
                if not batch:
                    continue
                messages = [(t, payload) for t, payload, _ in batch]
                work = asyncio.create_task(pipeline.process(messages, stop))
                metrics.batches_in_flight.inc()
                await in_flight.put((work, batch))
        finally:
            pipeline.subscribed = False
            metrics.mqtt_connected.set(0)
            if not stop.is_set():
                # Seen now, not after the batches in flight are done (they may wait on Kafka).
                pipeline.broker.observe(False, time.monotonic(), "disconnected from the broker")
            # Let every batch already read finish (durable, then acknowledged) before the
            # connection goes: a redelivery of a message still in flight here would otherwise
            # race its original into Kafka.
            if not acker.done():
                await in_flight.put(None)
            try:
                await acker
            except Exception as error:
                # Unacknowledged messages are redelivered on the next connection.
                log.error("ack_failed", extra=log_fields(error=repr(error)))
            if acks is not None:
                # Answer what the last batches made durable, while the connection may still be
                # up; what cannot be published waits for the next connection.
                acks_stop.set()
                await acks


async def _acknowledge_in_order(
    in_flight: asyncio.Queue[tuple[asyncio.Task[Admission | None], list[InboundMessage]] | None],
    paho: paho_mqtt.Client,
    metrics: IngestMetrics,
    acks: AckPublisher | None = None,
) -> None:
    """PUBACK each batch once it is durable, in the order the batches arrived (MQTT requires
    acknowledgements in arrival order), and hand it to the end-to-end acknowledgements. A batch
    that is not durable ends acknowledging: the broker redelivers it and everything after it, and
    no device is told about any of them (a retransmission answered as stored must never point at
    an original in a batch that was not made durable)."""
    acknowledging = True
    while (item := await in_flight.get()) is not None:
        work, batch = item
        admission = await work
        metrics.batches_in_flight.dec()
        acknowledging = acknowledging and admission is not None
        if acknowledging:
            _acknowledge(paho, batch)
            if acks is not None and admission is not None:
                acks.add(admission)


def _acknowledge(paho: paho_mqtt.Client, batch: Sequence[InboundMessage]) -> None:
    """PUBACK every QoS 1 message of a batch with one socket write.

    The bytes are exactly those ``paho.ack(mid, 1)`` queues (a 2-byte-long PUBACK, which in MQTT
    5 means reason "success"), but paho writes each queued packet with its own send() call: at
    thousands of messages a second that was the largest single cost of ingest. The subscription
    is QoS 1, so no message arrives with QoS 2; a QoS 0 message (packet id 0) needs no PUBACK.
    """
    mids = [mid for _, _, mid in batch if mid]
    if not mids:
        return
    packet = b"".join(_PUBACK.pack(paho_mqtt.PUBACK, 2, mid) for mid in mids)
    paho._packet_queue(paho_mqtt.PUBACK, packet, 0, 1)


def _producer(settings: IngestSettings) -> AIOKafkaProducer:
    """The shared producer settings (idempotent, acks=all) with batches big enough for a whole
    ingest batch: aiokafka's default 16 KiB per partition split one 500-message batch into
    several produce requests sent one after another (one in flight with idempotence), which
    made Kafka the slowest step at a few thousand messages a second."""
    return make_producer(
        settings.kafka,
        "ingest",
        linger_ms=settings.kafka_linger_ms,
        max_batch_bytes=settings.kafka_max_batch_bytes,
    )


async def run(settings: IngestSettings, stop: asyncio.Event) -> None:
    producer = _producer(settings)
    pool = await asyncpg.create_pool(
        settings.pg.dsn, min_size=settings.pg.pool_min_size, max_size=settings.pg.pool_max_size
    )
    await producer.start()
    pipeline = IngestPipeline(settings, producer, pool)
    ops: OpsServer | None = None
    if settings.metrics_port:
        ops = await start_ops_server(
            pipeline.metrics.registry,
            pipeline.ready,
            host=settings.metrics_host,
            port=settings.metrics_port,
        )
    liveness_stop = asyncio.Event()
    liveness = asyncio.create_task(pipeline.keep_liveness(liveness_stop))
    kafka_watch = asyncio.create_task(
        watch_dependency(
            pipeline.kafka,
            lambda: kafka_probe(settings.kafka.bootstrap_servers),
            liveness_stop,
            interval_s=settings.kafka_probe_interval_s,
        )
    )
    try:
        backoff = settings.reconnect_min_s
        while not stop.is_set():
            subscribed_before = pipeline.subscriptions
            try:
                await pipeline.refresh_registry(loaded_before=asyncio.get_running_loop().time())
                await _consume(settings, pipeline, stop)
                backoff = settings.reconnect_min_s
            except (aiomqtt.MqttError, OSError, asyncpg.PostgresError) as error:
                if isinstance(error, aiomqtt.MqttError | OSError):
                    pipeline.broker.observe(False, time.monotonic(), str(error))
                if pipeline.subscriptions != subscribed_before:
                    backoff = settings.reconnect_min_s  # that connection had subscribed
                log.info("ingest_reconnecting", extra=log_fields(error=str(error), retry_s=backoff))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, settings.reconnect_max_s)
    finally:
        m = pipeline.metrics
        log.info(
            "ingest_stopping",
            extra=log_fields(
                received=m.registry.get_sample_value("vigil_ingest_received_total"),
                accepted=m.registry.get_sample_value("vigil_ingest_accepted_total"),
            ),
        )
        liveness_stop.set()
        await liveness
        await kafka_watch
        if ops is not None:
            await ops.stop()
        await producer.stop()
        await pool.close()


def _encode(event: Telemetry | DeadLetter) -> bytes:
    """The event's JSON, as ``vigil.kafka.encode`` writes it, through the model's serializer
    directly (the ``model_dump_json`` wrapper and the ``str`` round trip cost a third more)."""
    return event.__pydantic_serializer__.to_json(event, by_alias=True)


def _tune_garbage_collector() -> None:
    """Fewer, cheaper garbage collections in the ingest process (not in tests that call ``run``).

    Nearly everything ingest allocates per message is acyclic and freed by reference counting,
    but a batch lives for hundreds of milliseconds while it is made durable, so with Python's
    default thresholds (a young collection every 700 allocations) its objects survived into the
    old generation and triggered a full collection every few thousand messages: about 13 µs of
    CPU per reading, 15 % of ingest's CPU under load. A young collection every 50,000
    allocations lets most of a batch die young, and freezing what start-up allocated (modules,
    schemas, settings) keeps it out of every collection; cyclic garbage is still collected.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def main(argv: list[str] | None = None) -> int:
    settings = IngestSettings()
    configure_logging(settings.log_level)
    _tune_garbage_collector()
    return run_until_signalled(lambda stop: run(settings, stop))
