"""Ingest composition root: wires Mosquitto, the validator, Kafka and PostgreSQL together.

Order of work for each batch of MQTT messages: validate → produce accepted telemetry to Kafka
(keyed by patient, idempotent producer, acks=all) and rejects to the dead-letter topic → write
readings to PostgreSQL → only then acknowledge the messages to the broker (MQTT manual ack). A
crash anywhere before the acknowledgement makes the broker redeliver the message to the
persistent session, and the unique keys downstream make the redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import aiomqtt
import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.events import DeadLetter, Telemetry
from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC
from schemas.topics import MQTT_SUBSCRIPTION
from services.ingest.adapters.postgres import load_bindings, store_telemetry
from services.ingest.domain.registry import BindingIndex
from services.ingest.domain.validation import (
    Accepted,
    RejectReason,
    ValidationLimits,
    validate_message,
)
from services.ingest.settings import IngestSettings
from vigil.kafka import encode, make_producer
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow

log = logging.getLogger("vigil.ingest")


@dataclass
class IngestCounters:
    received: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    batches: int = 0


class IngestPipeline:
    """The part of ingest that handles a batch; the MQTT loop around it lives in ``run``."""

    def __init__(
        self,
        settings: IngestSettings,
        producer: AIOKafkaProducer,
        pool: asyncpg.Pool,
    ) -> None:
        self._settings = settings
        self._producer = producer
        self._pool = pool
        self._limits = ValidationLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_clock_ahead=timedelta(seconds=settings.max_clock_ahead_s),
            max_clock_behind=timedelta(seconds=settings.max_clock_behind_s),
        )
        self._registry = BindingIndex(())
        self._registry_loaded_at = 0.0
        self.counters = IngestCounters()

    async def refresh_registry(self, *, force: bool = False) -> None:
        loop = asyncio.get_running_loop()
        # A miss on a newly registered device reloads at most once a second.
        min_age = 1.0 if force else self._settings.registry_refresh_s
        if loop.time() - self._registry_loaded_at < min_age:
            return
        self._registry = await load_bindings(self._pool)
        self._registry_loaded_at = loop.time()

    async def handle(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Validate, publish and store one batch. Returns once all of it is durable."""
        received_at = utcnow()
        await self.refresh_registry()
        outcomes = [
            validate_message(t, p, received_at, self._registry, self._limits) for t, p in messages
        ]
        if any(
            not isinstance(o, Accepted) and o.reason == RejectReason.UNKNOWN_DEVICE
            for o in outcomes
        ):
            await self.refresh_registry(force=True)
            outcomes = [
                validate_message(t, p, received_at, self._registry, self._limits)
                for t, p in messages
            ]

        accepted: list[Telemetry] = []
        rejected: list[DeadLetter] = []
        for outcome in outcomes:
            if isinstance(outcome, Accepted):
                accepted.append(outcome.telemetry)
            else:
                rejected.append(outcome.dead_letter)

        sends = [
            await self._producer.send(TELEMETRY_TOPIC, encode(t), key=t.patient_id.encode())
            for t in accepted
        ] + [
            await self._producer.send(
                DEADLETTER_TOPIC, encode(d), key=(d.device_id or "").encode() or None
            )
            for d in rejected
        ]
        if sends:
            await asyncio.gather(*sends)
        if accepted:
            await store_telemetry(self._pool, accepted)

        self.counters.received += len(messages)
        self.counters.accepted += len(accepted)
        self.counters.batches += 1
        for dead in rejected:
            self.counters.rejected[dead.reason] += 1
            log.warning(
                "message_rejected",
                extra=log_fields(
                    reason=dead.reason,
                    detail=dead.detail,
                    device_id=dead.device_id,
                    topic=dead.source_topic,
                ),
            )


async def _next_batch(
    messages: aiomqtt.client.MessagesIterator, batch_max: int, linger_s: float
) -> list[aiomqtt.Message]:
    batch = [await anext(messages)]
    deadline = asyncio.get_running_loop().time() + linger_s
    while len(batch) < batch_max:
        if len(messages) == 0:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(anext(messages), remaining))
            except TimeoutError:
                break
        else:
            batch.append(await anext(messages))
    return batch


async def run(settings: IngestSettings, stop: asyncio.Event) -> None:
    producer = make_producer(settings.kafka, "ingest")
    pool = await asyncpg.create_pool(
        settings.pg.dsn, min_size=settings.pg.pool_min_size, max_size=settings.pg.pool_max_size
    )
    await producer.start()
    pipeline = IngestPipeline(settings, producer, pool)
    try:
        await pipeline.refresh_registry(force=True)
        backoff = 1.0
        while not stop.is_set():
            try:
                await _consume(settings, pipeline, stop)
                backoff = 1.0
            except aiomqtt.MqttError as error:
                log.warning(
                    "mqtt_disconnected", extra=log_fields(error=str(error), retry_s=backoff)
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 30.0)
    finally:
        log.info(
            "ingest_stopping",
            extra=log_fields(
                received=pipeline.counters.received,
                accepted=pipeline.counters.accepted,
                rejected=dict(pipeline.counters.rejected),
            ),
        )
        await producer.stop()
        await pool.close()


async def _consume(settings: IngestSettings, pipeline: IngestPipeline, stop: asyncio.Event) -> None:
    client = aiomqtt.Client(
        settings.mqtt.host,
        settings.mqtt.port,
        username=settings.mqtt_username,
        password=settings.mqtt_password,
        identifier=settings.mqtt_client_id,
        clean_session=False,
        keepalive=settings.mqtt.keepalive_s,
        max_inflight_messages=1000,
    )
    # Acknowledge a message to the broker only after it is in Kafka and PostgreSQL, so a crash
    # makes the broker redeliver it instead of losing it. aiomqtt exposes no switch for this;
    # paho's manual acknowledgement is set on the wrapped client before connecting.
    paho = client._client
    paho.manual_ack_set(True)
    async with client:
        topic = f"$share/{settings.mqtt_share_group}/{MQTT_SUBSCRIPTION}"
        await client.subscribe(topic, qos=1)
        log.info("ingest_subscribed", extra=log_fields(topic=topic))
        messages = client.messages
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                batch_task = asyncio.ensure_future(
                    _next_batch(messages, settings.batch_max, settings.batch_linger_ms / 1000)
                )
                done, _ = await asyncio.wait(
                    {batch_task, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                if batch_task not in done:
                    batch_task.cancel()
                    break
                batch = batch_task.result()
                await _handle_until_durable(
                    pipeline, [(m.topic.value, _payload(m)) for m in batch], stop
                )
                if stop.is_set():
                    break
                for m in batch:
                    if m.qos > 0:
                        paho.ack(m.mid, m.qos)
        finally:
            stop_wait.cancel()


async def _handle_until_durable(
    pipeline: IngestPipeline, batch: list[tuple[str, bytes]], stop: asyncio.Event
) -> None:
    """Retry a batch while Kafka or PostgreSQL is unavailable; never acknowledge it before."""
    backoff = 0.5
    while True:
        try:
            await pipeline.handle(batch)
            return
        except Exception as error:
            log.error(
                "batch_not_durable",
                extra=log_fields(error=repr(error), size=len(batch), retry_s=backoff),
            )
            try:
                await asyncio.wait_for(stop.wait(), backoff)
                return
            except TimeoutError:
                backoff = min(backoff * 2, 15.0)


def _payload(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()


def main(argv: list[str] | None = None) -> int:
    settings = IngestSettings()
    configure_logging(settings.log_level)
    return run_until_signalled(lambda stop: run(settings, stop))
