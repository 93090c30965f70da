"""Kafka adapter pieces every service uses the same way.

Producers are idempotent with ``acks=all`` so that a retried send neither loses nor duplicates a
record; consumers commit offsets by hand, after the work for a record is done, so a crash
re-delivers rather than drops. Topic names live in ``schemas.kafka_topics``.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel

from vigil.settings import KafkaSettings


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json(by_alias=True).encode()


def make_producer(
    settings: KafkaSettings,
    client_id: str,
    *,
    linger_ms: int = 5,
    max_batch_bytes: int | None = None,
    transactional_id: str | None = None,
) -> AIOKafkaProducer:
    extra: dict[str, Any] = {}
    if max_batch_bytes is not None:
        extra["max_batch_size"] = max_batch_bytes
        extra["max_request_size"] = max(1048576, max_batch_bytes)
    if transactional_id is not None:
        extra["transactional_id"] = transactional_id
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id_prefix}-{client_id}",
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        compression_type=None,
        **extra,
    )


def make_consumer(
    settings: KafkaSettings,
    *topics: str,
    group_id: str | None,
    client_id: str,
    auto_offset_reset: str = "earliest",
    max_poll_records: int = 500,
    retry_backoff_ms: int | None = None,
    max_partition_fetch_bytes: int | None = None,
) -> AIOKafkaConsumer:
    extra: dict[str, Any] = {}
    if retry_backoff_ms is not None:
        extra["retry_backoff_ms"] = retry_backoff_ms
    if max_partition_fetch_bytes is not None:
        extra["max_partition_fetch_bytes"] = max_partition_fetch_bytes
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id_prefix}-{client_id}",
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        isolation_level="read_committed",
        max_poll_records=max_poll_records,
        **extra,
    )
