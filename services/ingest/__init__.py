"""Ingest service: MQTT in, validated telemetry to Kafka and PostgreSQL, rejects to dead letter."""
