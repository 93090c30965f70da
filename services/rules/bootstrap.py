"""Wiring of the rules service: the configuration store, the transactional producer, the
engines over the state topic, the telemetry consumer and the configuration watch. No logic:
the use cases live in ``service_layer``, the loop in ``entrypoints/consumer.py``.
"""

from __future__ import annotations

from services.rules.adapters.config_loader import RulesConfigStore
from services.rules.adapters.kafka import (
    TELEMETRY_FETCH_BYTES,
    KafkaOutbox,
    KafkaStateStore,
    RebalanceListener,
)
from services.rules.adapters.metrics import RulesMetrics, RulesReadiness
from services.rules.entrypoints.consumer import RulesRuntime
from services.rules.service_layer.config_swap import ConfigWatch
from services.rules.service_layer.partitions import PartitionEngines
from services.rules.service_layer.ports import Topics
from services.rules.settings import RulesSettings
from vigil.kafka import make_consumer, make_producer


def topics(settings: RulesSettings) -> Topics:
    return Topics(
        telemetry=settings.telemetry_topic,
        alerts=settings.alerts_topic,
        state=settings.state_topic,
        deadletter=settings.deadletter_topic,
        group_id=settings.group_id,
    )


async def wire(
    settings: RulesSettings, metrics: RulesMetrics, readiness: RulesReadiness
) -> RulesRuntime:
    """Load the configuration, start the transactional producer and subscribe the consumer.

    The producer starts first: initialising the transactional id fences a crashed predecessor
    and aborts its open transaction, so the state topic's committed end moves on before any
    partition is restored."""
    store = RulesConfigStore(settings)
    config = await store.load()
    metrics.set_config(config.config_version)
    transactional_id = settings.transactional_id or f"{settings.group_id}-0"
    # A transaction carries many small state records: fewer, larger produce requests.
    producer = make_producer(
        settings.kafka, "rules", max_batch_bytes=512 * 1024, transactional_id=transactional_id
    )
    await producer.start()
    readiness.producer_started = True
    partitions = PartitionEngines(
        KafkaStateStore(settings.kafka, settings.state_topic), config, metrics, readiness
    )
    consumer = make_consumer(
        settings.kafka,
        group_id=settings.group_id,
        client_id="rules",
        max_poll_records=settings.max_batch,
        max_partition_fetch_bytes=TELEMETRY_FETCH_BYTES,
    )
    consumer.subscribe([settings.telemetry_topic], listener=RebalanceListener(partitions))
    watch = ConfigWatch(
        store.load,
        config,
        settings.config_reload_s,
        metrics=metrics,
        delta=store.delta,
        compiler=partitions.compiler,
    )
    return RulesRuntime(
        topics=topics(settings),
        consumer=consumer,
        outbox=KafkaOutbox(producer),
        partitions=partitions,
        watch=watch,
        config_store=store,
        metrics=metrics,
        readiness=readiness,
        max_batch=settings.max_batch,
        config_reload_s=settings.config_reload_s,
        transactional_id=transactional_id,
    )
