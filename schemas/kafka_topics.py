"""Kafka topic names: the one place services and the local stack take them from."""

TELEMETRY_TOPIC = "vigil.telemetry.v1"
ALERTS_TOPIC = "vigil.alerts.v1"
DEADLETTER_TOPIC = "vigil.deadletter.v1"
# The rules service's own state (compacted, keyed by patient); a replay reads configs from it.
RULES_STATE_TOPIC = "vigil.rules.state.v1"
