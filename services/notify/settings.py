"""Settings of the notify service: the SMTP relay, paging policy knobs and composed infrastructure.

Built once in ``app.main`` at start-up, never at import, so tests and tools can build their own.
The Kafka and PostgreSQL blocks read their own shared prefixes (``VIGIL_KAFKA_``, ``VIGIL_PG_``).
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vigil.settings import KafkaSettings, PostgresSettings


class NotifySettings(BaseSettings):
    """Everything the notify service needs, read from ``VIGIL_NOTIFY_*``."""

    model_config = SettingsConfigDict(env_prefix="VIGIL_NOTIFY_", extra="ignore")

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=10025, ge=1, le=65535)
    smtp_from: str = "vigil-pages@localhost"
    smtp_timeout_s: float = Field(default=10, gt=0)
    smtp_starttls: bool = False
    smtp_username: str | None = None
    # SecretStr keeps the password out of reprs and logs of the settings object.
    smtp_password: SecretStr | None = None

    fallback_email: str = Field(
        default="vigil-oncall-fallback@localhost",
        description="Paged when the patient is unknown or the care team has no on-call address.",
    )
    group_id: str = "vigil-notify"
    client_id: str = "notify"
    log_level: str = "INFO"

    max_send_attempts: int = Field(
        default=5, ge=1, description="Tries per page in one process run; a restart grants more."
    )
    retry_base_s: float = Field(default=2.0, gt=0, description="Delay after the first failed try.")
    retry_cap_s: float = Field(default=60.0, gt=0, description="Longest delay between two tries.")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pg: PostgresSettings = Field(default_factory=PostgresSettings)

    @model_validator(mode="after")
    def _login_needs_both_halves(self) -> Self:
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError("smtp_username and smtp_password are set together or not at all")
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError("retry_cap_s must be at least retry_base_s")
        return self
