"""``ConfigStore`` for the service: the rules configuration the settings name.

A pinned ``RulesConfig`` JSON file (``CONFIG_FILE``) when set; else the built-in defaults from
settings, with care-team protocols, patient overrides and the profiles of monitored patients
from PostgreSQL laid on top (``RulesConfigSource``) when ``CONFIG_FROM_POSTGRES`` is on. A
reload from PostgreSQL builds nothing while the rows are unchanged.
"""

from __future__ import annotations

import asyncpg

from services.rules.adapters.config_store import RulesConfigSource
from services.rules.domain.config import RulesConfig
from services.rules.domain.config_pieces import ConfigDelta
from services.rules.settings import RulesSettings


def config_source(settings: RulesSettings) -> RulesConfigSource:
    return RulesConfigSource(
        settings.thresholds(),
        allowed_lateness_s=settings.allowed_lateness_s,
        arrival_lateness_s=settings.arrival_lateness_s,
        outage_gap_s=settings.outage_gap_s,
        resume_grace_s=settings.resume_grace_s,
        unbound_days=settings.monitor_unbound_days,
        cycle_days=settings.monitor_cycle_days,
    )


async def build_config(
    settings: RulesSettings, source: RulesConfigSource | None = None
) -> RulesConfig:
    """The rules config the settings name; from PostgreSQL through ``source`` when given (a
    reload then builds nothing while the rows are unchanged)."""
    if settings.config_file is not None:
        return RulesConfig.model_validate_json(settings.config_file.read_text())
    defaults = settings.thresholds()
    if not settings.config_from_postgres:
        return RulesConfig(
            config_version="settings",
            defaults=defaults,
            allowed_lateness_s=settings.allowed_lateness_s,
            arrival_lateness_s=settings.arrival_lateness_s,
            outage_gap_s=settings.outage_gap_s,
            resume_grace_s=settings.resume_grace_s,
        )
    if source is None:
        source = config_source(settings)
    conn = await asyncpg.connect(settings.postgres.dsn)
    try:
        return await source.load(conn)
    finally:
        await conn.close()


class RulesConfigStore:
    """The configuration store of a running service: every load goes through one
    ``RulesConfigSource``, so a reload reads only what changed since the last."""

    def __init__(self, settings: RulesSettings) -> None:
        self.settings = settings
        self.source = config_source(settings)

    async def load(self) -> RulesConfig:
        return await build_config(self.settings, self.source)

    def delta(self) -> tuple[str | None, ConfigDelta]:
        return self.source.delta_from, self.source.delta

    def digest(self, config: RulesConfig) -> str | None:
        manifest = self.source.manifest
        if manifest is not None and manifest.label == config.config_version:
            return manifest.content_hash
        return None
