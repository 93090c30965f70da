"""API settings (env prefix ``VIGIL_API_``), built at start-up.

Outside development the token secret must be set: a default secret would let anyone who read
this file mint tokens for any care team.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vigil.settings import PostgresSettings

DEVELOPMENT_SECRET = "development-only-not-a-secret-0000000000"


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_API_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token_secret: SecretStr = SecretStr(DEVELOPMENT_SECRET)
    token_ttl_minutes: int = Field(default=12 * 60, ge=5)
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=60.0, gt=0)
    stream_poll_s: float = Field(default=1.0, gt=0)
    # The dashboard's cookie is Secure in production; plain HTTP on loopback in development.
    cookie_secure: bool = False
    log_level: str = "INFO"

    pg: PostgresSettings = Field(default_factory=PostgresSettings)

    @model_validator(mode="after")
    def _no_default_secret_in_production(self) -> Self:
        secret = self.token_secret.get_secret_value()
        if self.environment != "development" and (secret == DEVELOPMENT_SECRET or len(secret) < 32):
            raise ValueError("VIGIL_API_TOKEN_SECRET must be set (32+ chars) outside development")
        return self
