"""Rules settings (env prefix ``VIGIL_RULES_``), built at start-up.

The thresholds here are the built-in default protocol; sites differ (some page on any 38.0 °C
reading), so every value is configurable, and care-team protocols and patient overrides from
PostgreSQL (migration 0004) are laid on top when ``config_from_postgres`` is on. Outside
development (``VIGIL_ENVIRONMENT``, see vigil.environment) rules refuses to start when it reads
PostgreSQL without a password.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Any, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.kafka_topics import (
    ALERTS_TOPIC,
    DEADLETTER_TOPIC,
    RULES_STATE_TOPIC,
    TELEMETRY_TOPIC,
)
from services.rules.domain.config import Thresholds
from vigil.environment import (
    ServiceSettings,
    dsn_password_problem,
    refuse_outside_development,
)
from vigil.settings import KafkaSettings, PostgresSettings


def _as_in_thresholds(name: str) -> Any:
    """The field ``name`` of ``Thresholds`` (default and limits), for a setting of the same
    name: the default protocol's values are declared once, in ``Thresholds``."""
    return copy(Thresholds.model_fields[name])


class RulesSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_RULES_", extra="ignore")

    # The default protocol's thresholds the environment may set (the rest are built in).
    fever_single_c: float = _as_in_thresholds("fever_single_c")
    fever_sustained_c: float = _as_in_thresholds("fever_sustained_c")
    fever_sustained_minutes: float = _as_in_thresholds("fever_sustained_minutes")
    fever_critical_c: float = _as_in_thresholds("fever_critical_c")
    fever_clear_c: float = _as_in_thresholds("fever_clear_c")
    fever_max_gap_minutes: float = _as_in_thresholds("fever_max_gap_minutes")
    interruption_page_minutes: float = _as_in_thresholds("interruption_page_minutes")
    interruption_escalate_minutes: float = _as_in_thresholds("interruption_escalate_minutes")
    bag_change_lead_minutes: float = _as_in_thresholds("bag_change_lead_minutes")
    pump_silent_minutes: float = _as_in_thresholds("pump_silent_minutes")
    thermometer_silent_minutes: float = _as_in_thresholds("thermometer_silent_minutes")
    allowed_lateness_s: float = Field(default=60.0, ge=0)
    # The arrival clock's lateness (absence timers): see RulesConfig.arrival_lateness_s.
    arrival_lateness_s: float = Field(default=5.0, ge=0)
    # After a pipeline outage (docs/rules.md, "After an outage"): see RulesConfig.
    outage_gap_s: float = Field(default=60.0, gt=0)
    resume_grace_s: float = Field(default=120.0, ge=0)

    group_id: str = "vigil-rules"
    # One per running instance (default: the group id + "-0"): Kafka fences a restarted
    # instance's predecessor by this id, so two live instances must never share one.
    transactional_id: str | None = None
    telemetry_topic: str = TELEMETRY_TOPIC
    alerts_topic: str = ALERTS_TOPIC
    deadletter_topic: str = DEADLETTER_TOPIC
    state_topic: str = RULES_STATE_TOPIC
    # Records per transaction: larger batches write each touched patient's state once for
    # more events (the state write, not the rules, dominates a transaction's cost).
    # A batch grows this far only while the service is behind (catching up after a restart or
    # a burst); a caught-up service commits what each fetch returns.
    max_batch: int = Field(default=50_000, ge=1)
    config_from_postgres: bool = True
    # How often the running service re-reads its configuration (a threshold a charge nurse
    # signed off, a new patient's profile); 0 turns hot reload off.
    config_reload_s: float = Field(default=5.0, ge=0)
    # Which patients are in the configuration (the monitored ones, adapters/config_store.py):
    # those with a device binding open or closed less than this many days ago (ingest accepts
    # readings up to its clock-behind limit late, a week by default) ...
    monitor_unbound_days: float = Field(default=7.0, ge=0)
    # ... or whose newest cycle started less than this many days ago (a 28-day infusion and
    # up to 7 days of interruption within the same cycle).
    monitor_cycle_days: float = Field(default=35.0, ge=0)
    # A pinned RulesConfig JSON file (e.g. the one an alert's config_version names): when set,
    # it is the whole configuration, and neither the thresholds above nor PostgreSQL apply.
    config_file: Path | None = None
    log_level: str = "INFO"
    # Prometheus /metrics, /healthz and /readyz (ingest has 9101, notify 9103); 0 picks a free
    # port (tests). A port already taken is logged and the service runs on without it.
    ops_port: int = Field(default=9102, ge=0, le=65535)
    ops_host: str = "127.0.0.1"

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)

    @model_validator(mode="after")
    def _secrets_outside_development(self) -> Self:
        reads_postgres = self.config_file is None and self.config_from_postgres
        refuse_outside_development(
            self.environment,
            "rules",
            [dsn_password_problem("VIGIL_PG_DSN", self.postgres.dsn) if reads_postgres else None],
        )
        return self

    def thresholds(self) -> Thresholds:
        """The default protocol: every threshold this class declares, the rest built in."""
        own = type(self).model_fields
        return Thresholds(
            **{name: getattr(self, name) for name in Thresholds.model_fields if name in own}
        )
