"""Rules settings (env prefix ``VIGIL_RULES_``), built at start-up.

The fever thresholds here are the care team's default protocol; sites differ (some page on any
38.0 °C reading), so every value is configurable rather than fixed in code.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.rules.domain.fever import FeverThresholds
from vigil.settings import KafkaSettings


class RulesSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VIGIL_RULES_", extra="ignore")

    fever_single_c: float = 38.3
    fever_sustained_c: float = 38.0
    fever_sustained_minutes: float = Field(default=60.0, gt=0)
    fever_critical_c: float = 39.5
    fever_clear_c: float = 37.8
    fever_max_gap_minutes: float = Field(default=90.0, gt=0)
    group_id: str = "vigil-rules"
    log_level: str = "INFO"

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    def fever_thresholds(self) -> FeverThresholds:
        return FeverThresholds(
            single_c=self.fever_single_c,
            sustained_c=self.fever_sustained_c,
            sustained_for=timedelta(minutes=self.fever_sustained_minutes),
            critical_c=self.fever_critical_c,
            clear_c=self.fever_clear_c,
            max_gap=timedelta(minutes=self.fever_max_gap_minutes),
        )
