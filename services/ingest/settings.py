"""Ingest settings (env prefix ``VIGIL_INGEST_``), built at start-up."""

from __future__ import annotations

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
    registry_refresh_s: float = Field(default=30.0, gt=0)
    log_level: str = "INFO"

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pg: PostgresSettings = Field(default_factory=PostgresSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
