"""Settings of the notify service: the SMTP relay, paging policy knobs and composed infrastructure.

Built once in ``app.main`` at start-up, never at import, so tests and tools can build their own.
The Kafka and PostgreSQL blocks read their own shared prefixes (``VIGIL_KAFKA_``, ``VIGIL_PG_``).
Outside development (``VIGIL_ENVIRONMENT``, see vigil.environment) notify refuses to start without
its acknowledgement-link secret, its API token and a database password.
"""

from __future__ import annotations

from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.notify.domain.bundling import DEFAULT_GROUP_WAIT_S
from services.notify.domain.escalation import DEFAULT_FALLBACK_EMAIL
from services.notify.domain.technical_hold import DEFAULT_SILENCE_HOLD_S, DEFAULT_TECHNICAL_HOLD_S
from vigil.environment import (
    MIN_SECRET_LENGTH,
    ServiceSettings,
    dsn_password_problem,
    refuse_outside_development,
    secret_problem,
)
from vigil.settings import KafkaSettings, PostgresSettings

# Published in the source, so it is refused anywhere but a developer's machine.
DEVELOPMENT_ACK_SECRET = "vigil-development-ack-secret-not-for-real-use"


class NotifySettings(ServiceSettings):
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
        default=DEFAULT_FALLBACK_EMAIL,
        description="Paged (until acknowledged, like a default policy) when no escalation policy "
        "covers an alert: the patient is unknown, or the care team has neither a policy nor an "
        "on-call address.",
    )
    group_id: str = "vigil-notify"
    client_id: str = "notify"
    log_level: str = "INFO"

    retry_base_s: float = Field(default=2.0, gt=0, description="Delay after the first failed try.")
    retry_cap_s: float = Field(default=60.0, gt=0, description="Longest delay between two tries.")

    public_base_url: str = Field(
        default="http://127.0.0.1:8085",
        description="Where the notify API is reached from a phone; acknowledgement links use it.",
    )
    ack_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_ACK_SECRET),
        description="HMAC key of acknowledgement links (at least 32 characters).",
    )
    ack_link_ttl_s: float = Field(default=24 * 3600, gt=0)
    api_enabled: bool = Field(default=False, description="Serve the API inside notify.")
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8085, ge=1, le=65535)
    ops_port: int = Field(
        default=9103,
        ge=0,
        le=65535,
        description="Prometheus /metrics, /healthz and /readyz on ops_host (0: a free port).",
    )
    ops_host: str = Field(
        default="127.0.0.1",
        description="Interface of the ops server; 0.0.0.0 lets Prometheus and a kubelet reach it.",
    )

    twilio_base_url: str = "https://api.twilio.com"
    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_from: str | None = None
    pagerduty_events_url: str | None = Field(
        default=None, description="PagerDuty Events v2 base URL; webhook contacts need it."
    )

    max_tries_per_channel: int = Field(
        default=3, ge=1, description="Tries on one contact method before the next is used."
    )
    escalation_tick_s: float = Field(default=1.0, gt=0)
    group_wait_s: float = Field(
        default=DEFAULT_GROUP_WAIT_S,
        ge=0,
        le=60,
        description=(
            "A patient's first alert is paged at once and opens a window this long; alerts in "
            "it share one follow-up page at its end (0: off)."
        ),
    )
    technical_hold_s: float = Field(
        default=DEFAULT_TECHNICAL_HOLD_S,
        ge=0,
        le=3600,
        description=(
            "A technical alert of medium, low or info priority is paged only if still open this "
            "long after it arrived; one that ends sooner is recorded, not paged (0: off)."
        ),
    )
    silence_hold_s: float = Field(
        default=DEFAULT_SILENCE_HOLD_S,
        ge=0,
        le=3600,
        description=(
            "The technical hold of a device silence (rule device_silent): a hub dropout shorter "
            "than the rules' silence limit plus this is recorded, not paged. Never shorter than "
            "technical_hold_s; a technical_hold_s of 0 turns it off too."
        ),
    )
    heartbeat_sources: list[str] = Field(
        default_factory=list,
        description="Heartbeat sources watched from start-up even if never seen.",
    )
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    heartbeat_start_grace_s: float | None = Field(
        default=None,
        gt=0,
        description=(
            "At start-up, a heartbeat source found silent (notify was down through the silence) "
            "is paged only if still silent this long after the start; unset: the heartbeat "
            "timeout."
        ),
    )
    outage_settle_s: float = Field(
        default=150.0,
        ge=0,
        description=(
            "After the heartbeat returns from an outage, wait this long (the rules' 120 s resume "
            "grace and a heartbeat interval) before each care team's summary is composed."
        ),
    )
    technical_care_team_id: str | None = Field(
        default=None, description="Care team paged when the pipeline heartbeat stops."
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pg: PostgresSettings = Field(default_factory=PostgresSettings)

    @model_validator(mode="after")
    def _login_needs_both_halves(self) -> Self:
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError("smtp_username and smtp_password are set together or not at all")
        if self.retry_cap_s < self.retry_base_s:
            raise ValueError("retry_cap_s must be at least retry_base_s")
        # Anyone who knows the built-in acknowledgement secret can acknowledge any page.
        refuse_outside_development(
            self.environment,
            "notify",
            [
                secret_problem(
                    "VIGIL_NOTIFY_ACK_SECRET",
                    self.ack_secret,
                    published={DEVELOPMENT_ACK_SECRET},
                    min_length=MIN_SECRET_LENGTH,
                ),
                dsn_password_problem("VIGIL_PG_DSN", self.pg.dsn),
            ],
        )
        return self

    @property
    def sms_enabled(self) -> bool:
        return (
            self.twilio_account_sid is not None
            and self.twilio_auth_token is not None
            and self.twilio_from is not None
        )
