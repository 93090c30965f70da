"""Wiring of the ingest service: the pipeline over Kafka and PostgreSQL, and its producer. No
logic: what is decided lives in ``domain``, the use cases in ``service_layer``; ``app`` (the
``vigil ingest`` process) starts from here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaProducer

from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC
from services.ingest.adapters.kafka_batches import KafkaTelemetry
from services.ingest.adapters.metrics import IngestMetrics
from services.ingest.adapters.postgres import PostgresTelemetryStore
from services.ingest.domain.validation import ValidationLimits
from services.ingest.service_layer.answers import AckPublisher
from services.ingest.service_layer.pipeline import IngestPipeline, PipelineConfig
from services.ingest.settings import IngestSettings
from vigil.kafka import make_producer
from vigil.runtime import utcnow

# The topics and the pipeline class are read from this module when ``build_pipeline`` runs: a
# benchmark on its own topics or clock sets them here.
__all__ = [
    "DEADLETTER_TOPIC",
    "TELEMETRY_TOPIC",
    "IngestPipeline",
    "build_pipeline",
    "make_ingest_producer",
    "pipeline_config",
]


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
    """The pipeline over Kafka and PostgreSQL."""
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


def make_ingest_producer(settings: IngestSettings) -> AIOKafkaProducer:
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
