"""Ingest settings (env prefix ``VIGIL_INGEST_``), built at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vigil.settings import KafkaSettings, MqttSettings, PostgresSettings


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_INGEST_", extra="ignore")

    mqtt_username: str = "vigil-ingest"
    mqtt_password: str = ""
    mqtt_client_id: str = "vigil-ingest-1"
    # Several ingest processes with the same group split the device topics between them.
    mqtt_share_group: str = "vigil-ingest"
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024)
    max_clock_ahead_s: float = Field(default=300.0, ge=0)
    max_clock_behind_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    batch_max: int = Field(default=500, ge=1)
    batch_linger_ms: int = Field(default=10, ge=0)
    # Batches being made durable while the next one is read. The broker sends at most its
    # max_inflight_messages (1000 on the local stack) unacknowledged messages, so batches in
    # flight times batch_max should stay near that.
    batches_in_flight: int = Field(default=3, ge=1)
    # Accepted messages remembered to drop duplicates before Kafka (about 200 bytes each).
    dedup_window: int = Field(default=200_000, ge=1)
    # MQTT 5 session expiry: how long the broker keeps this consumer's session (and queues its
    # messages) while it is away. A week, like the broker's persistent_client_expiration.
    session_expiry_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Device liveness (device_last_seen) is written at most this often, off the batch path.
    liveness_flush_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # Prometheus /metrics, /healthz and /readyz; 0 disables the server.
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    kafka_linger_ms: int = Field(default=5, ge=0)
    # Per-partition producer batch; a whole ingest batch (500 x ~450 B) fits in one request.
    kafka_max_batch_bytes: int = Field(default=512 * 1024, ge=16 * 1024)
    # CA certificate of the broker's TLS listener; set it to connect over TLS (the port is
    # VIGIL_MQTT_PORT, pointed at the TLS listener).
    mqtt_tls_ca_file: Path | None = None
    registry_refresh_s: float = Field(default=30.0, gt=0)
    log_level: str = "INFO"

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pg: PostgresSettings = Field(default_factory=PostgresSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
