"""Connection settings shared by every service.

Each block reads its own environment prefix when it is built, which happens at start-up in a
service's composition root, never at import. Service settings compose these blocks, so one
variable (for example ``VIGIL_KAFKA_BOOTSTRAP_SERVERS``) configures every service alike.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    """Where the Kafka cluster is."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_KAFKA_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:19092"
    client_id_prefix: str = "vigil"


class PostgresSettings(BaseSettings):
    """Where the PostgreSQL (TimescaleDB when available) database is."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_PG_", extra="ignore")

    dsn: str = "postgresql://vigil@127.0.0.1:15432/vigil"
    pool_min_size: int = Field(default=1, ge=1)
    pool_max_size: int = Field(default=4, ge=1)


class MqttSettings(BaseSettings):
    """Where the MQTT broker is."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_MQTT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 11883
    keepalive_s: int = Field(default=30, ge=5)
