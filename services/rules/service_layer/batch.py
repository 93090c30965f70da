"""The batch use case: telemetry records in, one transaction out.

Consume-transform-produce: each transaction holds the alerts that a run of telemetry records
decided, the new state of every patient those records touched (keyed by patient, on the same
partition number as the patient's telemetry), each partition's watermark, and the consumer
offsets. Either all of it is committed or none is: after a crash the service restores the
state committed with the offsets and re-reads from those offsets, so no alert is lost and none
is published twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from schemas.events import DeadLetter
from services.rules.adapters.codec import decode_observation
from services.rules.domain.heartbeat import HEARTBEAT_CODE
from services.rules.service_layer.partitions import PartitionEngines
from services.rules.service_layer.ports import TelemetryConsumer, Topics, TransactionalOutbox
from vigil.kafka import encode
from vigil.runtime import log_fields, utcnow

log = logging.getLogger("vigil.rules")


async def fill_batch(
    consumer: TelemetryConsumer,
    batch: dict[Any, list[Any]],
    max_records: int,
) -> dict[Any, list[Any]]:
    """Grow a fetched batch while the consumer is behind (records already on the broker past
    its position), up to ``max_records``: one transaction then writes each touched patient's
    state once for many more events. A consumer that has caught up returns at once, so a live
    stream's alerts are never held back to fill a batch."""
    total = sum(len(records) for records in batch.values())
    while total < max_records and _behind(consumer, batch):
        more = await consumer.getmany(timeout_ms=100, max_records=max_records - total)
        if not more:
            break
        for tp, records in more.items():
            held = batch.get(tp)
            if held and records and records[0].offset <= held[-1].offset:
                # The partition was re-positioned (revoked and assigned again): what we held of
                # it comes again, so only the re-read records stand.
                total -= len(held)
                held = None
            batch[tp] = records if not held else held + records
            total += len(records)
    return batch


def _behind(consumer: TelemetryConsumer, batch: dict[Any, list[Any]]) -> bool:
    for tp, records in batch.items():
        if not records:
            continue
        end = consumer.last_stable_offset(tp)
        if end is not None and records[-1].offset + 1 < end:
            return True
    return False


async def abort(outbox: TransactionalOutbox, partitions: PartitionEngines) -> None:
    """Abort the open transaction after a failure (the caller re-raises it)."""
    partitions.aborting()
    try:
        await outbox.abort()
    except Exception:  # a fenced or broken producer cannot abort; Kafka aborts on timeout
        log.exception("rules_abort_failed")


async def process_batch(
    topics: Topics,
    outbox: TransactionalOutbox,
    partitions: PartitionEngines,
    batch: dict[Any, list[Any]],
    assignment: Callable[[], set[Any]],
) -> int:
    """One transaction: alerts, state of the touched patients, watermarks, offsets. Any
    failure aborts it and is raised: the engines are then ahead of what Kafka holds, and only
    a restart (state restored from the last committed transaction) makes them agree again.
    Returns the number of alerts committed."""
    started = time.perf_counter()
    sends: list[Awaitable[Any]] = []
    offsets: dict[Any, int] = {}
    alerts_sent = 0
    emitted: Counter[tuple[str, str]] = Counter()
    gaps: list[tuple[str, str, int]] = []
    stopped: list[tuple[str, str]] = []
    outages: list[tuple[int, datetime, datetime]] = []
    dead = 0
    owned = assignment()
    await partitions.prepare(
        [tp.partition for tp, records in batch.items() if records and tp in owned]
    )
    await outbox.begin()
    try:
        for tp, records in batch.items():
            if not records:
                continue
            if tp not in assignment():
                continue  # revoked meanwhile: its new owner reads these records again
            engine = await partitions.engine_for(tp.partition)
            for record in records:
                payload = record.value or b""
                try:
                    obs = decode_observation(payload)
                except ValidationError as error:
                    # Ingest validated it, so this is a contract break between services: keep
                    # it with its reason rather than skip it.
                    letter = DeadLetter.for_payload(
                        reason="telemetry_contract",
                        detail=str(error.errors()[:1]),
                        service="rules",
                        source_topic=topics.telemetry,
                        received_at=utcnow(),
                        payload=payload,
                    )
                    sends.append(await outbox.send(topics.deadletter, encode(letter)))
                    dead += 1
                    continue
                for alert in engine.on_observation(obs):
                    alerts_sent += 1
                    emitted[(alert.priority.value, alert.rule_id)] += 1
                    # A heartbeat reaches every partition: logged at debug, not once per
                    # partition at info.
                    log.log(
                        logging.DEBUG if alert.code == HEARTBEAT_CODE else logging.INFO,
                        "alert_decided",
                        extra=log_fields(
                            alert_id=str(alert.alert_id),
                            code=alert.code,
                            phase=alert.phase.value,
                            patient_id=alert.patient_id,
                        ),
                    )
                    sends.append(
                        await outbox.send(
                            topics.alerts, encode(alert), key=alert.patient_id.encode()
                        )
                    )
            gaps += engine.take_seq_gaps()
            stopped += engine.take_stopped()
            for began, ended in engine.take_outages():
                outages.append((tp.partition, began, ended))
            sends += await outbox.send_state(
                topics.state, tp.partition, partitions.state_records(tp.partition)
            )
            offsets[tp] = records[-1].offset + 1
        decided = time.perf_counter()
        await asyncio.gather(*sends)
        if offsets:
            await outbox.send_offsets(offsets, topics.group_id)
        await outbox.commit()
    except BaseException:
        await abort(outbox, partitions)
        raise
    committed = time.perf_counter()
    m = partitions.metrics
    partitions.committed()
    consumed = sum(len(batch[tp]) for tp in offsets)
    m.events.inc(consumed)
    m.batch_size.observe(consumed)
    m.commit_seconds.observe(committed - decided)
    m.batch_seconds.observe(committed - started)
    for (priority, rule_id), count in emitted.items():
        m.alerts.labels(priority, rule_id).inc(count)
    if dead:
        m.dead_letters.labels("telemetry_contract").inc(dead)
    for partition, began, ended in outages:
        m.outages.labels(str(partition)).inc()
        # Recorded once per partition: the timers that fell due inside it waited for the
        # data queued meanwhile (docs/rules.md, "After an outage").
        log.warning(
            "rules_pipeline_outage",
            extra=log_fields(
                partition=partition,
                last_arrival_before=began.isoformat(),
                first_arrival_after=ended.isoformat(),
                seconds=round((ended - began).total_seconds(), 1),
            ),
        )
    for (what, why), count in Counter(stopped).items():
        m.not_paged.labels(what, why).inc(count)
    if gaps:
        m.seq_gaps.inc(len(gaps))
        m.seq_missing.inc(sum(missing for _, _, missing in gaps))
    log.debug(
        "rules_batch_committed",
        extra=log_fields(
            records=sum(len(r) for r in batch.values()),
            alerts=alerts_sent,
            ms=round((time.perf_counter() - started) * 1000, 1),
            # The part spent deciding (decode, rules, state encoding); the rest is Kafka's.
            decide_ms=round((decided - started) * 1000, 1),
        ),
    )
    return alerts_sent
