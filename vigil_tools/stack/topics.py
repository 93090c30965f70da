"""The Kafka topics the stack creates: partitions, retention and cleanup policy of each.

Topic *names* are part of the message contract and are owned by ``schemas.kafka_topics``; they are
re-exported here so stack code and tests have one import. The *shape* of each topic (how many
partitions, how long it is kept) is a deployment decision and lives only in this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from schemas.kafka_topics import (
    ALERTS_TOPIC,
    DEADLETTER_TOPIC,
    RULES_STATE_TOPIC,
    TELEMETRY_TOPIC,
)

__all__ = [
    "ALERTS_TOPIC",
    "DEADLETTER_TOPIC",
    "DEFAULT_PARTITIONS",
    "RULES_STATE_TOPIC",
    "TELEMETRY_TOPIC",
    "TOPICS",
    "TopicSpec",
    "topic_specs",
]

DAY_MS: Final = 24 * 60 * 60 * 1000

# Telemetry and alerts are keyed by patient; this bounds how many consumers of one group can share
# the load. Raising it later re-hashes keys to partitions, so pick it before real data exists.
DEFAULT_PARTITIONS: Final = 6


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How one topic is created."""

    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: Literal["delete", "compact"] = "delete"
    replication_factor: int = 1
    # None: the broker's default (1 on a single broker).
    min_insync_replicas: int | None = None

    def configs(self) -> dict[str, str]:
        """The topic-level configs Kafka is given for this topic."""
        configs = {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}
        if self.min_insync_replicas is not None:
            configs["min.insync.replicas"] = str(self.min_insync_replicas)
        return configs


def topic_specs(
    partitions: int = DEFAULT_PARTITIONS, replication_factor: int = 1
) -> tuple[TopicSpec, ...]:
    """Every topic of the stack; ``partitions`` applies to the keyed high-volume topics.

    With ``replication_factor`` 3 (a three-broker cluster) every topic also gets
    ``min.insync.replicas`` 2: a write acknowledged to an ``acks=all`` producer (every Vigil
    producer, ``vigil.kafka``) is on at least two brokers, and the topic keeps taking writes
    with one broker down.
    """
    isr = 2 if replication_factor >= 3 else None

    def spec(
        name: str, count: int, retention_ms: int, cleanup: Literal["delete", "compact"] = "delete"
    ) -> TopicSpec:
        return TopicSpec(name, count, retention_ms, cleanup, replication_factor, isr)

    return (
        # 30 days covers the longest blinatumomab cycle (28 days) plus a margin for replay.
        spec(TELEMETRY_TOPIC, partitions, 30 * DAY_MS),
        # Alerts are the clinical record of what paged whom; keep a year for review.
        spec(ALERTS_TOPIC, partitions, 365 * DAY_MS),
        # Three partitions so a flood of bad messages from one device does not serialise all.
        spec(DEADLETTER_TOPIC, 3, 30 * DAY_MS),
        # The rules' state, one record per patient (and per partition's watermark), written in
        # the same transaction as the alerts it led to; compacted, so the newest record per key
        # is kept forever. Partitioned like telemetry: partition p holds the state of the
        # patients whose telemetry is on partition p.
        spec(RULES_STATE_TOPIC, partitions, -1, "compact"),
    )


TOPICS: Final = topic_specs()
