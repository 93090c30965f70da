"""Ingest's consumer loop: connect to the broker, subscribe, read batches, hand them on.

One connection at a time (``adapters.mqtt_session``): up to ``batch_max`` messages become one
batch, read for at most ``batch_linger_ms`` after the first while earlier batches are still being
made durable and for no longer than what has arrived while none is (``batch_linger_s``); up to
``batches_in_flight`` batches are made durable at once while the next is read, and each is
acknowledged to the broker in arrival order once durable
(``service_layer.pipeline.acknowledge_in_order``). When the connection is lost, every batch
already read is finished first, then ingest reconnects with backoff; the broker's persistent
session keeps what was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from operator import itemgetter

import asyncpg

from schemas.topics import MQTT_SUBSCRIPTION
from services.ingest.adapters.mqtt_session import MqttError, MqttSession, SessionOptions
from services.ingest.service_layer.pipeline import InFlight, IngestPipeline, acknowledge_in_order
from services.ingest.service_layer.ports import InboundMessage
from services.ingest.settings import IngestSettings
from vigil.runtime import log_fields

log = logging.getLogger("vigil.ingest")

_TOPIC_AND_PAYLOAD = itemgetter(0, 1)  # of an InboundMessage


def subscription(settings: IngestSettings) -> str:
    """The device topics directly, or through the share group when one is set."""
    if not settings.mqtt_share_group:
        return MQTT_SUBSCRIPTION
    return f"$share/{settings.mqtt_share_group}/{MQTT_SUBSCRIPTION}"


def session_options(settings: IngestSettings) -> SessionOptions:
    return SessionOptions(
        host=settings.mqtt.host,
        port=settings.mqtt.port,
        client_id=settings.mqtt_client_id,
        username=settings.mqtt_username,
        password=settings.mqtt_password,
        keepalive_s=settings.mqtt.keepalive_s,
        # MQTT 5 persistent session: clean start off plus an expiry, so messages published while
        # ingest is down (or restarting after a crash) wait for it in the broker.
        session_expiry_s=settings.session_expiry_s,
        # How many unacknowledged messages the broker may have in flight to us: enough to keep
        # every batch slot full, bounded so a slow batch cannot make the broker push unlimited
        # messages.
        receive_maximum=min(65535, settings.batch_max * (settings.batches_in_flight + 1)),
        tls_ca_file=settings.mqtt_tls_ca_file,
    )


def batch_linger_s(settings: IngestSettings, batches_working: int) -> float:
    """How long a batch waits for more messages after its first. While earlier batches are
    still being made durable, the configured linger: the stream is heavy, and a larger batch
    shares Kafka's and PostgreSQL's round trips among more messages. While none is, no wait:
    a lone fever on a quiet stream is handed on at once."""
    return settings.batch_linger_ms / 1000 if batches_working else 0.0


async def next_batch(
    session: MqttSession, batch_max: int, linger_s: float, stop: asyncio.Event
) -> list[InboundMessage]:
    """Up to ``batch_max`` messages: waits for the first (returning [] once ``stop`` is set),
    then at most ``linger_s`` for more. Raises MqttError when disconnected with nothing read."""
    loop = asyncio.get_running_loop()
    batch = session.take(batch_max)
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
        if session.disconnected.done():
            if batch:
                break  # make what was read durable first; acks are dropped with the link
            raise MqttError(session.lost_reason or "disconnected from the broker")
        await session.wait(wait_s)
        batch.extend(session.take(batch_max - len(batch)))
    return batch


async def consume(settings: IngestSettings, pipeline: IngestPipeline, stop: asyncio.Event) -> None:
    """One connection: subscribe, then batches until ``stop`` or the connection is lost."""
    session = await MqttSession.open(session_options(settings))
    try:
        await _consume(session, settings, pipeline, stop)
    finally:
        await session.close()


async def _consume(
    session: MqttSession, settings: IngestSettings, pipeline: IngestPipeline, stop: asyncio.Event
) -> None:
    metrics = pipeline.metrics
    topic = subscription(settings)
    await session.subscribe(topic, qos=1)
    pipeline.subscribed = True
    pipeline.subscriptions += 1
    pipeline.broker.observe(True, time.monotonic())
    metrics.mqtt_connected.set(1)
    log.info("ingest_subscribed", extra=log_fields(topic=topic))
    in_flight: InFlight = asyncio.Queue(maxsize=settings.batches_in_flight)
    acker = asyncio.create_task(acknowledge_in_order(in_flight, session, metrics, pipeline.acks))
    answers_stop = asyncio.Event()
    answers = None
    if pipeline.acks is not None:
        answers = asyncio.create_task(pipeline.acks.run(session, answers_stop))
    # Batches handed on and not yet durable (or given up): what the linger adapts to.
    working: set[asyncio.Task[object]] = set()
    try:
        while not stop.is_set() and not acker.done():
            batch = await next_batch(
                session, settings.batch_max, batch_linger_s(settings, len(working)), stop
            )
            if not batch:
                continue
            messages: list[tuple[str, bytes]] = list(map(_TOPIC_AND_PAYLOAD, batch))
            work = asyncio.create_task(pipeline.process(messages, stop))
            working.add(work)
            work.add_done_callback(working.discard)
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
        if answers is not None:
            # Answer what the last batches made durable, while the connection may still be
            # up; what cannot be published waits for the next connection.
            answers_stop.set()
            await answers


async def consume_until_stopped(
    settings: IngestSettings, pipeline: IngestPipeline, stop: asyncio.Event
) -> None:
    """``consume`` again after every lost or refused connection, with exponential backoff (back
    to the minimum after a connection that got subscribed), until ``stop``."""
    backoff = settings.reconnect_min_s
    while not stop.is_set():
        subscribed_before = pipeline.subscriptions
        try:
            await pipeline.refresh_registry(loaded_before=asyncio.get_running_loop().time())
            await consume(settings, pipeline, stop)
            backoff = settings.reconnect_min_s
        except (MqttError, OSError, asyncpg.PostgresError) as error:
            if isinstance(error, MqttError | OSError):
                pipeline.broker.observe(False, time.monotonic(), str(error))
            if pipeline.subscriptions != subscribed_before:
                backoff = settings.reconnect_min_s  # that connection had subscribed
            log.info("ingest_reconnecting", extra=log_fields(error=str(error), retry_s=backoff))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, settings.reconnect_max_s)
