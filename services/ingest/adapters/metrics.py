"""Operations surface of ingest: Prometheus metrics and the health and readiness endpoints.

``IngestMetrics`` owns the metric objects (in its own registry, so tests and several pipelines in
one process do not collide); ``vigil.ops.OpsServer`` serves them with ``/healthz`` and ``/readyz``
(connected to the broker and subscribed, Kafka producer started, last batch durable). No label
ever carries a device id, patient id or payload value: label values are reason codes and stages.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

log = logging.getLogger("vigil.ingest.ops")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)


def observe_each(histogram: Histogram, amounts: Sequence[float]) -> None:
    """What ``histogram.observe(amount)`` for each of ``amounts`` (finite numbers) leaves: each
    amount counted in the first bucket whose bound is at least the amount, and added to the sum;
    with one increment per bucket touched and one of the sum instead of one observation each
    (ingest observes every reading of a batch at once). The sum is added as one total, so its
    last bits may differ from adding the amounts one by one."""
    if not amounts:
        return
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    bounds = histogram._upper_bounds  # ascending, +Inf last
    buckets = histogram._buckets
    histogram._sum.inc(sum(amounts))
    for index, count in Tally(bisect_left(bounds, amount) for amount in amounts).items():
        buckets[index].inc(count)


class IngestMetrics:
    """Every metric ingest exports, all prefixed ``vigil_ingest_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "vigil_ingest_received", "MQTT messages received from the broker.", registry=r
        )
        self.accepted = Counter(
            "vigil_ingest_accepted", "Messages accepted and made durable.", registry=r
        )
        self.rejected = Counter(
            "vigil_ingest_rejected",
            "Messages dead-lettered, by reason code.",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "vigil_ingest_duplicates",
            "Duplicates dropped: by message id or seq in the recent window, or by the database "
            "unique key (a redelivery after a restart).",
            ["kind"],
            registry=r,
        )
        self.flagged = Counter(
            "vigil_ingest_flagged",
            "Accepted messages carrying a flag (sensor fault, clock skew), by flag.",
            ["flag"],
            registry=r,
        )
        self.batch_failures = Counter(
            "vigil_ingest_batch_failures",
            "Attempts to make a batch durable that failed and will be retried, by stage.",
            ["stage"],
            registry=r,
        )
        self.kafka_seconds = Histogram(
            "vigil_ingest_kafka_seconds",
            "Time from handing a batch to the Kafka producer until every record is acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_seconds = Histogram(
            "vigil_ingest_db_seconds",
            "Time to write a batch to PostgreSQL (one transaction).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "vigil_ingest_batch_seconds",
            "Time from receiving a batch until it is durable (before the MQTT acknowledgement).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vigil_ingest_batch_size", "Messages per batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.device_lag = Histogram(
            "vigil_ingest_device_lag_seconds",
            "Receive time minus device time of accepted messages (buffered or late readings).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.batches_in_flight = Gauge(
            "vigil_ingest_batches_in_flight",
            "Batches received but not yet acknowledged to the broker.",
            registry=r,
        )
        self.acks_published = Counter(
            "vigil_ingest_acks_published",
            "End-to-end acknowledgement messages published to devices (vigil/v1/ack/...).",
            registry=r,
        )
        self.acks_answered = Counter(
            "vigil_ingest_acks_answered",
            "Device messages answered in a published acknowledgement, by outcome "
            "(stored, rejected).",
            ["outcome"],
            registry=r,
        )
        self.acks_not_sent = Counter(
            "vigil_ingest_acks_not_sent",
            "Answers never published: dropped because too many were pending, or a reject whose "
            "topic names no device; the device resends and is answered then.",
            ["reason"],
            registry=r,
        )
        self.acks_pending = Gauge(
            "vigil_ingest_acks_pending", "Answers waiting to be published.", registry=r
        )
        self.mqtt_connected = Gauge(
            "vigil_ingest_mqtt_connected", "1 while subscribed to the broker.", registry=r
        )
