"""The rules service's consumer loop: between two batches, swap in a changed configuration,
restore the engines of newly assigned partitions and refresh the lag; then fetch, grow the
batch while behind, and process it in one transaction (``service_layer``).

Every assigned partition's engine is restored as soon as it is assigned (in this loop, before
the next fetch), so ``/readyz`` means "every owned patient's state is in memory", not "the
first record will wait for it".
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.service_layer.batch import fill_batch, process_batch
from services.rules.service_layer.config_swap import ConfigWatch, pin_config, swap_config
from services.rules.service_layer.partitions import PartitionEngines
from services.rules.service_layer.ports import (
    ConfigStore,
    TelemetryConsumer,
    Topics,
    TransactionalOutbox,
)
from vigil.runtime import log_fields

log = logging.getLogger("vigil.rules")


@dataclass
class RulesRuntime:
    """Everything the loop runs on, wired (``bootstrap.wire``) or faked (unit tests). The
    outbox's producer is started; the consumer is subscribed, not yet started."""

    topics: Topics
    consumer: TelemetryConsumer
    outbox: TransactionalOutbox
    partitions: PartitionEngines
    watch: ConfigWatch
    config_store: ConfigStore
    metrics: RulesMetrics
    readiness: RulesReadiness
    max_batch: int
    config_reload_s: float
    transactional_id: str


async def serve(runtime: RulesRuntime, stop: asyncio.Event) -> None:
    """Pin the configuration in force, then consume until ``stop``. A failed transaction
    stops the loop with its error; the consumer and the producer are stopped either way."""
    consumer, outbox, partitions, watch = (
        runtime.consumer,
        runtime.outbox,
        runtime.partitions,
        runtime.watch,
    )
    readiness, topics = runtime.readiness, runtime.topics
    config = partitions.config
    watching: asyncio.Future[None] | None = None
    try:
        await pin_config(outbox, topics.state, config, runtime.config_store.digest(config))
        readiness.last_transaction_committed = True
        await consumer.start()
        log.info(
            "rules_started",
            extra=log_fields(
                config_version=config.config_version,
                transactional_id=runtime.transactional_id,
            ),
        )
        stop_wait = asyncio.ensure_future(stop.wait())
        if runtime.config_reload_s > 0:
            watching = asyncio.ensure_future(watch.watch(stop))
        lag_updated = 0.0
        while not stop.is_set():
            changed = watch.take()
            if changed is not None:
                await swap_config(
                    topics.state,
                    outbox,
                    partitions,
                    changed,
                    watch.compiled,
                    watch.taken_patients,
                    runtime.config_store.digest(changed),
                )
            owned = consumer.assignment()
            readiness.assigned = frozenset(tp.partition for tp in owned)
            await partitions.prepare(sorted(readiness.assigned))
            if time.monotonic() - lag_updated >= 1.0:
                # At most once a second: a position query per partition is not free.
                lag_updated = time.monotonic()
                await update_lag(consumer, owned, runtime.metrics)
            fetch = asyncio.ensure_future(
                consumer.getmany(timeout_ms=500, max_records=runtime.max_batch)
            )
            done, _ = await asyncio.wait({fetch, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if fetch not in done:
                fetch.cancel()
                break
            batch = fetch.result()
            if batch:
                batch = await fill_batch(consumer, batch, runtime.max_batch)
                await hand_over()
                await process_batch(topics, outbox, partitions, batch, consumer.assignment)
        stop_wait.cancel()
    finally:
        if watching is not None:
            watching.cancel()
        readiness.producer_started = False
        await consumer.stop()
        await outbox.stop()


async def hand_over() -> None:
    """Let the event loop run the consumer's background fetcher before a batch is decided.

    The fetch that follows a batch is requested only once its records are taken, by a task of
    the consumer; deciding the batch holds the loop, so without this the request waited for
    the batch's first ``await`` (its flush) and the broker answered only then. Three turns: the
    fetcher wakes, starts its request task, and the task writes the request."""
    for _ in range(3):
        await asyncio.sleep(0)


async def update_lag(consumer: TelemetryConsumer, owned: set[Any], metrics: RulesMetrics) -> None:
    """Consumer lag per owned partition: the last stable offset minus our position."""
    for tp in owned:
        end = consumer.last_stable_offset(tp)
        if end is None:
            continue  # nothing fetched from it yet: the broker's end is not known here
        try:
            position = await asyncio.wait_for(consumer.position(tp), 1.0)
        except Exception:  # revoked meanwhile, or its position is being reset: skip this round
            continue
        metrics.consumer_lag.labels(str(tp.partition)).set(max(0, end - position))
