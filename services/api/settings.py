"""API settings (env prefix ``VIGIL_API_``), built at start-up.

Outside development (``VIGIL_ENVIRONMENT``, see vigil.environment) the token secret and a
database password must be set: a default secret would let anyone who read this file mint tokens
for any care team.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from vigil.environment import (
    MIN_SECRET_LENGTH,
    ServiceSettings,
    dsn_password_problem,
    refuse_outside_development,
    secret_problem,
)
from vigil.settings import PostgresSettings

DEVELOPMENT_SECRET = "development-only-not-a-secret-0000000000"


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    token_ttl_minutes: int = Field(default=12 * 60, ge=5)
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=60.0, gt=0)
    stream_poll_s: float = Field(default=1.0, gt=0)
    # Addresses of the reverse proxies in front of the API (comma-separated; "*" for any), whose
    # X-Forwarded-For and X-Forwarded-Proto are believed. Empty (the default): no forwarded
    # header is believed, and a login's address (throttling, audit) is the connection's own.
    trusted_proxies: str = ""
    # The dashboard's cookie is Secure in production; plain HTTP on loopback in development.
    cookie_secure: bool = False
    log_level: str = "INFO"
    # Device accounts on the broker (docs/care-team-api.md, "Broker accounts"): Mosquitto's
    # dynamic security plugin, reached at broker_host:broker_port (TLS when broker_tls_ca_file
    # names the CA of its certificate) as broker_admin_username, with the password in
    # broker_admin_password_file. Empty username: this process cannot change device accounts.
    broker_admin_username: str = ""
    broker_admin_password_file: Path | None = None
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=8883, ge=1, le=65535)
    broker_tls_ca_file: Path | None = None
    # Where devices connect, told with their credentials (empty / unset: the broker above).
    device_broker_host: str = ""
    device_broker_port: int | None = Field(default=None, ge=1, le=65535)

    pg: PostgresSettings = Field(default_factory=PostgresSettings)

    @model_validator(mode="after")
    def _secrets_outside_development(self) -> Self:
        refuse_outside_development(
            self.environment,
            "the care-team API",
            [
                secret_problem(
                    "VIGIL_API_TOKEN_SECRET",
                    self.token_secret,
                    published={DEVELOPMENT_SECRET},
                    min_length=MIN_SECRET_LENGTH,
                ),
                dsn_password_problem("VIGIL_PG_DSN", self.pg.dsn),
                self._broker_problem(),
            ],
        )
        if self.broker_admin_username and self.broker_admin_password_file is None:
            raise ValueError(
                "VIGIL_API_BROKER_ADMIN_USERNAME is set without "
                "VIGIL_API_BROKER_ADMIN_PASSWORD_FILE"
            )
        return self

    def _broker_problem(self) -> str | None:
        # The administration password must not cross the network in clear text.
        if self.broker_admin_username and self.broker_tls_ca_file is None:
            return "VIGIL_API_BROKER_ADMIN_USERNAME is set without VIGIL_API_BROKER_TLS_CA_FILE"
        return None
