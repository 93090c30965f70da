"""Composition root of the notify service: wires PostgreSQL, SMTP, Twilio, PagerDuty and Kafka
to the escalation service.

Owns start-up order (database, producer, heartbeat watches, consumer), the alert consumer loop
and its offset commits, and shutdown. Every alert goes to the escalation service; an offset is
committed only after each alert of the batch has its escalation (or held bundle) stored and its
first pages claimed and tried; an unreadable record is published to the dead-letter topic before
its offset moves. Pages a crash left undelivered are in the database: the escalation service's
delivery loop picks them up when their lease runs out. Paging decisions live in ``domain``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Protocol

import uvicorn
from pydantic import ValidationError

from schemas.events import Alert, DeadLetter
from schemas.kafka_topics import ALERTS_TOPIC
from services.notify.adapters.kafka import KafkaDeadLetterPublisher
from services.notify.adapters.metrics import (
    NotifyMetrics,
    NotifyReadiness,
    ObservedAlertHandler,
    ObservedDeadLetters,
    poll_database,
)
from services.notify.adapters.postgres.heartbeats import PostgresHeartbeats
from services.notify.api import create_app
from services.notify.bootstrap import build_escalation, open_pool
from services.notify.settings import NotifySettings
from vigil.kafka import make_consumer, make_producer
from vigil.ops import kafka_outage, serving_ops
from vigil.runtime import (
    configure_logging,
    freeze_start_up_heap,
    log_fields,
    run_until_signalled,
    utcnow,
)

log = logging.getLogger("vigil.notify")

SERVICE_NAME = "notify"
_POLL_TIMEOUT_MS = 500


class AlertConsumer(Protocol):
    """The part of ``AIOKafkaConsumer`` the loop uses (fakes implement it in unit tests)."""

    async def getmany(self, *, timeout_ms: int) -> dict[Any, list[Any]]: ...

    async def commit(self, offsets: dict[Any, int]) -> None: ...


class AlertHandler(Protocol):
    async def handle_alert(self, alert: Alert) -> object: ...


class DeadLetterSink(Protocol):
    async def publish_dead_letter(self, letter: DeadLetter) -> None: ...


async def consume_alerts(
    consumer: AlertConsumer,
    handler: AlertHandler,
    dead_letters: DeadLetterSink,
    stop: asyncio.Event,
    *,
    clock: Any = utcnow,
) -> None:
    """Handle alert records until ``stop``; commit each partition's offset after its records."""
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=_POLL_TIMEOUT_MS)
        for partition, records in batches.items():
            done: int | None = None
            for record in records:
                await _handle_record(record, handler, dead_letters, clock())
                done = record.offset
                if stop.is_set():
                    break
            if done is not None:
                await consumer.commit({partition: done + 1})
            if stop.is_set():
                return


async def _handle_record(
    record: Any, handler: AlertHandler, dead_letters: DeadLetterSink, received_at: datetime
) -> None:
    payload: bytes = record.value or b""
    try:
        alert = Alert.model_validate_json(payload)
    except ValidationError as exc:
        # Only locations and error types: the messages quote input values, which may be PHI.
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['type']}"
            for err in exc.errors()[:10]
        )
        log.error(
            "alert_rejected",
            extra=log_fields(
                topic=record.topic, partition=record.partition, offset=record.offset, errors=where
            ),
        )
        await dead_letters.publish_dead_letter(
            DeadLetter.for_payload(
                reason="invalid_alert",
                detail=f"not a vigil.alert.v1 record ({where})",
                service=SERVICE_NAME,
                source_topic=record.topic,
                received_at=received_at,
                payload=payload,
            )
        )
        return
    await handler.handle_alert(alert)


class _EmbeddedServer(uvicorn.Server):
    """Serves the API inside notify, which owns SIGINT/SIGTERM: uvicorn must not take them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_api(settings: NotifySettings, app: Any, stop: asyncio.Event) -> None:
    server = _EmbeddedServer(
        uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    await stop.wait()
    server.should_exit = True
    await task


async def run(
    settings: NotifySettings,
    stop: asyncio.Event,
    *,
    listening: Callable[[int], None] | None = None,
) -> None:
    """Run the notify service until ``stop`` is set; ``listening`` is told the ops server's
    port (tests that ask for an ephemeral one with ``ops_port=0`` learn it this way)."""
    metrics = NotifyMetrics()
    readiness = NotifyReadiness()
    async with serving_ops(
        metrics.registry,
        readiness.check,
        host=settings.ops_host,
        port=settings.ops_port,
        listening=listening,
        # An idle consumer does not notice Kafka going away: probe it (docs/reliability.md).
        watches=[kafka_outage(settings.kafka.bootstrap_servers)],
    ):
        await _serve(settings, stop, metrics, readiness)


async def _serve(
    settings: NotifySettings,
    stop: asyncio.Event,
    metrics: NotifyMetrics,
    readiness: NotifyReadiness,
) -> None:
    pool = await open_pool(settings)
    closers: list[Any] = []
    producer = make_producer(settings.kafka, SERVICE_NAME)
    consumer = make_consumer(
        settings.kafka, ALERTS_TOPIC, group_id=settings.group_id, client_id=settings.client_id
    )
    try:
        await producer.start()
        publisher = KafkaDeadLetterPublisher(producer)
        escalation, closers = build_escalation(settings, pool, metrics=metrics)
        for source in settings.heartbeat_sources:
            await PostgresHeartbeats(pool).watch_source(source, utcnow())
        # Before the first alert is consumed: a heartbeat silence this notify was down through
        # is an outage, and a current heartbeat handled first would hide it.
        await escalation.resume_watch()
        await consumer.start()
        readiness.consumer_assigned = lambda: bool(consumer.assignment())
        log.info(
            "notify_started",
            extra=log_fields(topic=ALERTS_TOPIC, group_id=settings.group_id),
        )
        async with asyncio.TaskGroup() as tasks:
            handler = ObservedAlertHandler(escalation, metrics)
            dead_letters = ObservedDeadLetters(publisher, metrics)
            tasks.create_task(consume_alerts(consumer, handler, dead_letters, stop))
            tasks.create_task(poll_database(pool, metrics, readiness, stop))
            tasks.create_task(escalation.run(stop, interval_s=settings.escalation_tick_s))
            if settings.api_enabled:
                api = create_app(settings, service=escalation, pool=pool)
                tasks.create_task(_serve_api(settings, api, stop))
    finally:
        # Pages still waiting for a retry stay in the database with their next attempt time;
        # the next start's delivery loop sends them.
        await consumer.stop()
        await producer.stop()
        for closer in closers:
            await closer.aclose()
        await pool.close()
        log.info("notify_stopped")


def main(argv: list[str] | None = None) -> int:
    """Process entry point: ``python -m services.notify``."""
    parser = argparse.ArgumentParser(
        prog="vigil-notify",
        description="Page care teams about alerts (settings come from VIGIL_NOTIFY_*, "
        "VIGIL_KAFKA_* and VIGIL_PG_* environment variables).",
    )
    parser.add_argument("--log-level", help="overrides VIGIL_NOTIFY_LOG_LEVEL")
    args = parser.parse_args(argv)
    settings = NotifySettings()
    configure_logging(args.log_level or settings.log_level)
    freeze_start_up_heap()
    return run_until_signalled(lambda stop: run(settings, stop))
