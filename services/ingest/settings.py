"""Ingest settings (env prefix ``VIGIL_INGEST_``), built at start-up.

Outside development (``VIGIL_ENVIRONMENT``, see vigil.environment) ingest refuses to start without
its broker password or a database password.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from vigil.environment import (
    ServiceSettings,
    dsn_password_problem,
    refuse_outside_development,
    secret_problem,
)
from vigil.settings import KafkaSettings, MqttSettings, PostgresSettings


class IngestSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_INGEST_", extra="ignore")

    mqtt_username: str = "vigil-ingest"
    mqtt_password: str = ""
    mqtt_client_id: str = "vigil-ingest-1"
    # Empty (the default): one ingest process subscribes to the device topics directly, a
    # subscription Mosquitto keeps across its own restarts, so messages published while ingest
    # reconnects are queued for it. A group name: several ingest processes with the same group
    # split the device topics through $share/<group>/...; Mosquitto 2.0 does not persist shared
    # subscriptions, so after a broker restart messages published before ingest has subscribed
    # again have no subscriber (docs/reliability.md). Never run two processes with it empty:
    # each would receive every message.
    mqtt_share_group: str = ""
    max_payload_bytes: int = Field(default=64 * 1024, ge=1024)
    max_clock_ahead_s: float = Field(default=300.0, ge=0)
    max_clock_behind_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    batch_max: int = Field(default=500, ge=1)
    # How long a batch gathers after its first message, only while earlier batches are still
    # being made durable; with none in flight a batch is what has arrived (consumer.py).
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
    # Reconnect to the broker after reconnect_min_s, doubling up to reconnect_max_s; back to the
    # minimum once a connection got subscribed. Short on purpose: until ingest has subscribed
    # again after a broker restart, a shared subscription does not exist on the broker.
    reconnect_min_s: float = Field(default=0.25, gt=0)
    reconnect_max_s: float = Field(default=2.0, gt=0)
    # Kafka is probed this often while ingest runs, so /readyz reports an outage even when no
    # message is being produced (vigil.ops.watch_dependency).
    kafka_probe_interval_s: float = Field(default=2.0, gt=0)
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
    # End-to-end acknowledgements (vigil/v1/ack/{device_id}, docs/mqtt.md 4.1): published every
    # ack_linger_ms, one message per device with at most ack_max_entries messages answered;
    # at most ack_pending_max answers wait (beyond that, answers are dropped and counted: the
    # devices resend and are answered then). False turns acknowledgements off.
    acks_enabled: bool = True
    ack_linger_ms: int = Field(default=100, ge=1)
    ack_max_entries: int = Field(default=500, ge=1)
    ack_pending_max: int = Field(default=200_000, ge=1)
    log_level: str = "INFO"

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pg: PostgresSettings = Field(default_factory=PostgresSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)

    @model_validator(mode="after")
    def _secrets_outside_development(self) -> Self:
        refuse_outside_development(
            self.environment,
            "ingest",
            [
                secret_problem("VIGIL_INGEST_MQTT_PASSWORD", self.mqtt_password),
                dsn_password_problem("VIGIL_PG_DSN", self.pg.dsn),
            ],
        )
        return self
