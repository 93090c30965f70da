"""Kafka topic names: the one place services and the local stack take them from."""

TELEMETRY_TOPIC = "vigil.telemetry.v1"
ALERTS_TOPIC = "vigil.alerts.v1"
DEADLETTER_TOPIC = "vigil.deadletter.v1"
DELIVERIES_TOPIC = "vigil.deliveries.v1"
HEARTBEAT_TOPIC = "vigil.heartbeat.v1"
