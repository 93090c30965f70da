"""Rules composition root: Kafka telemetry in, the pure engine in the middle, alerts out.

Offsets are committed only after the alerts a batch decided are acknowledged by Kafka, so a crash
re-evaluates rather than loses; alert ids are deterministic, so notify collapses the duplicate.
Rule state is in memory in this version: a restart rebuilds it from the events consumed after the
restart only (persisted snapshots are a separate piece of work).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from schemas.events import DeadLetter, Telemetry
from schemas.kafka_topics import ALERTS_TOPIC, DEADLETTER_TOPIC, TELEMETRY_TOPIC
from services.rules.domain.engine import RulesEngine
from services.rules.settings import RulesSettings
from vigil.kafka import encode, make_consumer, make_producer
from vigil.runtime import configure_logging, log_fields, run_until_signalled, utcnow

log = logging.getLogger("vigil.rules")


async def run(settings: RulesSettings, stop: asyncio.Event) -> None:
    thresholds = settings.fever_thresholds()
    engine = RulesEngine(lambda _patient: thresholds)
    consumer: AIOKafkaConsumer = make_consumer(
        settings.kafka, TELEMETRY_TOPIC, group_id=settings.group_id, client_id="rules"
    )
    producer = make_producer(settings.kafka, "rules")
    await producer.start()
    await consumer.start()
    log.info("rules_started", extra=log_fields(rule_version=thresholds.rule_version()))
    try:
        stop_wait = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            fetch = asyncio.ensure_future(consumer.getmany(timeout_ms=500, max_records=1000))
            done, _ = await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if fetch not in done:
                fetch.cancel()
                break
            sends = []
            for partition_records in fetch.result().values():
                for record in partition_records:
                    try:
                        event = Telemetry.model_validate_json(record.value or b"")
                    except ValidationError as error:
                        # Ingest validated it, so this is a contract break between services:
                        # keep it with its reason rather than skip it.
                        dead = DeadLetter.for_payload(
                            reason="telemetry_contract",
                            detail=str(error.errors()[:1]),
                            service="rules",
                            source_topic=TELEMETRY_TOPIC,
                            received_at=utcnow(),
                            payload=record.value or b"",
                        )
                        sends.append(await producer.send(DEADLETTER_TOPIC, encode(dead)))
                        continue
                    for alert in engine.on_telemetry(event):
                        log.info(
                            "alert_decided",
                            extra=log_fields(
                                alert_id=str(alert.alert_id),
                                code=alert.code,
                                phase=alert.phase.value,
                                patient_id=alert.patient_id,
                            ),
                        )
                        sends.append(
                            await producer.send(
                                ALERTS_TOPIC, encode(alert), key=alert.patient_id.encode()
                            )
                        )
            if sends:
                await asyncio.gather(*sends)
            await consumer.commit()
        stop_wait.cancel()
    finally:
        await consumer.stop()
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    settings = RulesSettings()
    configure_logging(settings.log_level)
    return run_until_signalled(lambda stop: run(settings, stop))
