"""Composition root of the notify service: wires PostgreSQL, SMTP and Kafka to the dispatcher.

Owns start-up order (database, producer, resume of undelivered pages, consumer), the alert
consumer loop and its offset commits, and shutdown. An offset is committed only after each
alert of the batch has its page row and first attempt stored; an unreadable record is published
to the dead-letter topic before its offset moves. Paging decisions live in ``domain``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from datetime import datetime
from typing import Any, Protocol

import asyncpg
from pydantic import ValidationError

from schemas.events import Alert, DeadLetter
from schemas.kafka_topics import ALERTS_TOPIC
from services.notify.adapters.kafka import KafkaDeliveryPublisher
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.adapters.smtp import SmtpSender
from services.notify.service_layer.dispatcher import PageDispatcher, PagingPolicy
from services.notify.settings import NotifySettings
from vigil.kafka import make_consumer, make_producer
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow

log = logging.getLogger("vigil.notify")

SERVICE_NAME = "notify"
_POLL_TIMEOUT_MS = 500


class AlertConsumer(Protocol):
    """The part of ``AIOKafkaConsumer`` the loop uses (fakes implement it in unit tests)."""

    async def getmany(self, *, timeout_ms: int) -> dict[Any, list[Any]]: ...

    async def commit(self, offsets: dict[Any, int]) -> None: ...


class DeadLetterSink(Protocol):
    async def publish_dead_letter(self, letter: DeadLetter) -> None: ...


async def consume_alerts(
    consumer: AlertConsumer,
    dispatcher: PageDispatcher,
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
                await _handle_record(record, dispatcher, dead_letters, clock())
                done = record.offset
                if stop.is_set():
                    break
            if done is not None:
                await consumer.commit({partition: done + 1})
            if stop.is_set():
                return


async def _handle_record(
    record: Any, dispatcher: PageDispatcher, dead_letters: DeadLetterSink, received_at: datetime
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
    await dispatcher.handle_alert(alert)


async def run(settings: NotifySettings, stop: asyncio.Event) -> None:
    """Run the notify service until ``stop`` is set."""
    pool = await asyncpg.create_pool(
        settings.pg.dsn, min_size=settings.pg.pool_min_size, max_size=settings.pg.pool_max_size
    )
    producer = make_producer(settings.kafka, SERVICE_NAME)
    consumer = make_consumer(
        settings.kafka, ALERTS_TOPIC, group_id=settings.group_id, client_id=settings.client_id
    )
    try:
        await producer.start()
        publisher = KafkaDeliveryPublisher(producer)
        password = settings.smtp_password
        dispatcher = PageDispatcher(
            repository=PostgresNotifyRepository(pool),
            sender=SmtpSender(
                host=settings.smtp_host,
                port=settings.smtp_port,
                envelope_from=settings.smtp_from,
                timeout_s=settings.smtp_timeout_s,
                starttls=settings.smtp_starttls,
                username=settings.smtp_username,
                password=None if password is None else password.get_secret_value(),
            ),
            publisher=publisher,
            policy=PagingPolicy(
                sender_address=settings.smtp_from,
                fallback_email=settings.fallback_email,
                max_send_attempts=settings.max_send_attempts,
                retry_base_s=settings.retry_base_s,
                retry_cap_s=settings.retry_cap_s,
            ),
            clock=utcnow,
        )
        # Resumed pages are sent by the retry loop, so new alerts are not held up behind them.
        await dispatcher.resume()
        await consumer.start()
        log.info(
            "notify_started",
            extra=log_fields(topic=ALERTS_TOPIC, group_id=settings.group_id),
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consume_alerts(consumer, dispatcher, publisher, stop))
            tasks.create_task(dispatcher.run_retries(stop))
    finally:
        # Pages still waiting for a retry stay 'failed' in the database; the next start
        # resumes them.
        await consumer.stop()
        await producer.stop()
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
    return run_until_signalled(lambda stop: run(settings, stop))
