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

    def configs(self) -> dict[str, str]:
        """The topic-level configs Kafka is given for this topic."""
        return {"retention.ms": str(self.retention_ms), "cleanup.policy": self.cleanup_policy}


def topic_specs(partitions: int = DEFAULT_PARTITIONS) -> tuple[TopicSpec, ...]:
    """Every topic of the stack; ``partitions`` applies to the keyed high-volume topics."""
    return (
        # 30 days covers the longest blinatumomab cycle (28 days) plus a margin for replay.
        TopicSpec(TELEMETRY_TOPIC, partitions, 30 * DAY_MS),
        # Alerts are the clinical record of what paged whom; keep a year for review.
        TopicSpec(ALERTS_TOPIC, partitions, 365 * DAY_MS),
        # Three partitions so a flood of bad messages from one device does not serialise all.
        TopicSpec(DEADLETTER_TOPIC, 3, 30 * DAY_MS),
        # The rules' state, one record per patient (and per partition's watermark), written in
        # the same transaction as the alerts it led to; compacted, so the newest record per key
        # is kept forever. Partitioned like telemetry: partition p holds the state of the
        # patients whose telemetry is on partition p.
        TopicSpec(RULES_STATE_TOPIC, partitions, -1, "compact"),
    )


TOPICS: Final = topic_specs()
