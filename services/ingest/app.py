"""Ingest composition root: wires the broker connection, the pipeline, Kafka and PostgreSQL.

No logic of its own: what is decided lives in ``domain``, the use cases (admit, make durable,
acknowledge in order, answer devices) in ``service_layer``, the consumer loop in
``entrypoints.consumer``, and the I/O in ``adapters``. ``vigil ingest`` runs ``main``.

Delivery contract (docs/ingest.md): every message the broker accepted is stored in PostgreSQL
exactly once (unique key) and is in Kafka at least once; it is acknowledged to the broker only
after both have it, so a crash makes the broker redeliver it to the persistent session.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC
from services.ingest.adapters.kafka_batches import KafkaTelemetry
from services.ingest.adapters.metrics import IngestMetrics
from services.ingest.adapters.postgres import PostgresTelemetryStore
from services.ingest.domain.validation import ValidationLimits
from services.ingest.entrypoints.consumer import consume_until_stopped, subscription
from services.ingest.service_layer.answers import AckPublisher
from services.ingest.service_layer.pipeline import IngestPipeline, PipelineConfig
from services.ingest.settings import IngestSettings
from vigil.kafka import make_producer
from vigil.ops import OpsServer, kafka_probe, start_ops_server, watch_dependency
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow

__all__ = ["IngestPipeline", "build_pipeline", "main", "run", "subscription"]

log = logging.getLogger("vigil.ingest")


def pipeline_config(settings: IngestSettings) -> PipelineConfig:
    return PipelineConfig(
        limits=ValidationLimits(
            max_payload_bytes=settings.max_payload_bytes,
            max_clock_ahead=timedelta(seconds=settings.max_clock_ahead_s),
            max_clock_behind=timedelta(seconds=settings.max_clock_behind_s),
        ),
        dedup_window=settings.dedup_window,
        registry_refresh_s=settings.registry_refresh_s,
        liveness_flush_s=settings.liveness_flush_s,
    )


def build_pipeline(
    settings: IngestSettings,
    producer: AIOKafkaProducer,
    pool: asyncpg.Pool,
    clock: Callable[[], datetime] = utcnow,
) -> IngestPipeline:
    """The pipeline over Kafka and PostgreSQL. The topics and the pipeline class are this
    module's names, read at call time: a benchmark on its own topics or clock replaces them."""
    metrics = IngestMetrics()
    answers = None
    if settings.acks_enabled:
        answers = AckPublisher(
            metrics,
            linger_s=settings.ack_linger_ms / 1000,
            max_entries=settings.ack_max_entries,
            capacity=settings.ack_pending_max,
            clock=clock,
        )
    return IngestPipeline(
        pipeline_config(settings),
        KafkaTelemetry(producer, TELEMETRY_TOPIC, DEADLETTER_TOPIC),
        PostgresTelemetryStore(pool),
        metrics=metrics,
        answers=answers,
        clock=clock,
    )


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
    pipeline = build_pipeline(settings, producer, pool)
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
        await consume_until_stopped(settings, pipeline, stop)
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
