"""Operations surface of the rules service: its Prometheus metrics and its readiness.

``RulesMetrics`` owns every metric object, in a registry of its own (several services, or
several test runs, in one process must not collide). ``RulesReadiness`` holds the facts
``/readyz`` is decided from. The service layer and the consumer loop feed both; the HTTP side
is ``vigil.ops.OpsServer``.

No label ever carries a patient id, device id or reading: label values are alert priorities,
rule ids (names of rules, the same for every patient), dead-letter reason codes and telemetry
partition numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000)
_RESTORE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class RulesMetrics:
    """Every metric the rules service exports, all prefixed ``vigil_rules_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "vigil_rules_events_consumed",
            "Telemetry records consumed and committed in a transaction.",
            registry=r,
        )
        self.alerts = Counter(
            "vigil_rules_alerts_emitted",
            "Alerts committed to the alerts topic, by priority and rule id.",
            ["priority", "rule_id"],
            registry=r,
        )
        self.outages = Counter(
            "vigil_rules_pipeline_outages",
            "Pipeline outages seen on a partition's arrival clock (nothing delivered, heartbeats "
            "included, for longer than outage_gap_s), per partition.",
            ["partition"],
            registry=r,
        )
        self.seq_gaps = Counter(
            "vigil_rules_seq_gaps",
            "Gaps seen in a device's seq (messages skipped: lost, or still in a hub's buffer).",
            registry=r,
        )
        self.seq_missing = Counter(
            "vigil_rules_seq_missing_messages",
            "Messages skipped in those gaps when they were seen (a gap filled later counts too; "
            "what stays missing is raised as a data_lost alert).",
            registry=r,
        )
        self.not_paged = Counter(
            "vigil_rules_not_paged",
            "Readings not evaluated (what: reading) and timers that paged nothing (what: the "
            "timer's kind: silent, lost, unobserved, bag, interruption) because the patient "
            "was discharged (why: discharged) or, for a pump, their infusion had ended (why: "
            "infusion_ended) by the reading's device time or the timer's deadline.",
            ["what", "why"],
            registry=r,
        )
        self.dead_letters = Counter(
            "vigil_rules_dead_letters",
            "Telemetry records dead-lettered, by reason code.",
            ["reason"],
            registry=r,
        )
        self.commit_seconds = Histogram(
            "vigil_rules_commit_seconds",
            "Time from flushing a transaction's records until Kafka committed it (records, "
            "state, offsets).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "vigil_rules_batch_seconds",
            "Time to process one batch end to end: decide, write, commit.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vigil_rules_batch_size",
            "Telemetry records per transaction.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "vigil_rules_consumer_lag",
            "Records on the broker not yet consumed, per assigned telemetry partition (last "
            "stable offset minus the consumer's position).",
            ["partition"],
            registry=r,
        )
        self.watermark_lag = Gauge(
            "vigil_rules_watermark_lag_seconds",
            "Wall clock minus the event-time watermark, per assigned telemetry partition: how "
            "late timer rules (silent device, interruption clock) fire.",
            ["partition"],
            registry=r,
        )
        self.arrival_lag = Gauge(
            "vigil_rules_arrival_clock_lag_seconds",
            "Wall clock minus the arrival clock, per assigned telemetry partition: how late "
            "absence rules (device silent, fever unobserved) fire. The pipeline heartbeat moves "
            "it on every partition, so it stays within a heartbeat interval plus the arrival "
            "lateness while the pipeline runs.",
            ["partition"],
            registry=r,
        )
        self.config = Info("vigil_rules_config", "The rules configuration in force.", registry=r)
        self.config_reload_failures = Counter(
            "vigil_rules_config_reload_failures",
            "Configuration reloads that failed to load or compile (the old one kept running).",
            registry=r,
        )
        self.config_swaps = Counter(
            "vigil_rules_config_swaps",
            "New configurations put in force while running.",
            registry=r,
        )
        self.restore_seconds = Histogram(
            "vigil_rules_state_restore_seconds",
            "Time to restore one partition's engine from the state topic.",
            buckets=_RESTORE_BUCKETS,
            registry=r,
        )
        self.transaction_aborts = Counter(
            "vigil_rules_transaction_aborts",
            "Transactions aborted (the service stops after one and restarts from the last "
            "committed state).",
            registry=r,
        )

    def set_config(self, config_version: str) -> None:
        self.config.info({"config_version": config_version})

    def track_watermark(
        self,
        partition: int,
        watermark: Callable[[], datetime | None],
        now: Callable[[], datetime],
        arrival: Callable[[], datetime | None] | None = None,
    ) -> None:
        """Report ``now() - watermark()`` (and ``now() - arrival()``) for ``partition`` at every
        scrape (NaN before the partition's first event), so an idle partition's lag keeps
        growing between batches."""

        def lag_of(clock: Callable[[], datetime | None]) -> Callable[[], float]:
            def lag() -> float:
                mark = clock()
                return float("nan") if mark is None else (now() - mark).total_seconds()

            return lag

        self.watermark_lag.labels(str(partition)).set_function(lag_of(watermark))
        if arrival is not None:
            self.arrival_lag.labels(str(partition)).set_function(lag_of(arrival))

    def forget_partition(self, partition: int) -> None:
        """Drop the per-partition series of a partition this instance no longer owns."""
        for gauge in (self.consumer_lag, self.watermark_lag, self.arrival_lag):
            with contextlib.suppress(KeyError):
                gauge.remove(str(partition))


@dataclass
class RulesReadiness:
    """What ``/readyz`` needs to know; the processing loop keeps it current."""

    producer_started: bool = False
    # The last transaction (start-up config record, batch or config swap) committed.
    last_transaction_committed: bool = False
    assigned: frozenset[int] = frozenset()
    restored: set[int] = field(default_factory=set)

    def check(self) -> tuple[bool, str]:
        if not self.producer_started:
            return False, "producer not started"
        if not self.last_transaction_committed:
            return False, "last transaction not committed"
        if not self.assigned:
            return False, "no telemetry partition assigned"
        missing = sorted(self.assigned - self.restored)
        if missing:
            return False, f"state of partitions {missing} not restored"
        return True, f"ready: {len(self.assigned)} partitions"
