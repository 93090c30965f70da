"""Operations surface of ingest: Prometheus metrics and the health and readiness endpoints.

``IngestMetrics`` owns the metric objects (in its own registry, so tests and several pipelines in
one process do not collide); ``vigil.ops.OpsServer`` serves them with ``/healthz`` and ``/readyz``
(connected to the broker and subscribed, Kafka producer started, last batch durable). No label
ever carries a device id, patient id or payload value: label values are reason codes and stages.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

log = logging.getLogger("vigil.ingest.ops")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)


class BatchHistogram:
    """A histogram observed a batch of amounts at a time, for a metric taken once per reading.

    prometheus_client's ``Histogram`` takes one amount per call (about 0.7 µs each, a lock and a
    walk over the bounds); this one takes a batch's amounts in one call and is exported through
    prometheus_client's public collector interface (``HistogramMetricFamily``): the same
    ``_bucket`` (cumulative, ``le`` as prometheus_client writes it), ``_count`` and ``_sum``
    samples that ``Histogram`` gives, without its ``_created``. Each amount is counted in the
    first bucket whose bound is at least the amount, as ``Histogram.observe`` counts it; the sum
    is added a batch at a time, so its last bits may differ from adding amounts one by one."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = (*sorted(float(b) for b in buckets), math.inf)
        # ``le`` as prometheus_client writes it (its helper has no type annotations).
        self._labels = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        # The scrape may run on another thread than the observations.
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, amount: float) -> None:
        self.observe_each((amount,))

    def observe_each(self, amounts: Sequence[float]) -> None:
        """One observation of each of ``amounts`` (finite numbers)."""
        if not amounts:
            return
        tally = Tally(bisect_left(self._bounds, amount) for amount in amounts)
        total = math.fsum(amounts)
        with self._lock:
            self._sum += total
            for index, count in tally.items():
                self._counts[index] += count

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> list[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = list(itertools.accumulate(counts))
        family = HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=total,
        )
        return [family]


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
        # Observed a batch at a time (every accepted reading's lag).
        self.device_lag = BatchHistogram(
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
