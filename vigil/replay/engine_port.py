"""The one place replay meets the rules engine: a pinned rules config in, a fresh engine out.

Replay depends on the engine only through ``EnginePort``: ``on_telemetry(event) -> list[Alert]``
and ``on_time(watermark) -> list[Alert]`` (timers on event time, for the end of a stream). The
config is the rules service's own ``RulesConfig`` (JSON: defaults, care-team protocols, patient
profiles and overrides, allowed lateness); this module owns its content hash (sha256 of the
canonical JSON of the validated config, so two spellings of one config hash alike) and building
the engine from it. When the engine's construction changes, only this file changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from schemas.events import Alert, Telemetry
from services.rules.domain.alerting import at
from services.rules.domain.config import RULES_LOGIC_VERSION, RulesConfig
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import observe

# The fever levels a report draws on a patient's timeline, by the names the report uses.
_FEVER_LIMITS = {
    "single_c": "fever_single_c",
    "sustained_c": "fever_sustained_c",
    "critical_c": "fever_critical_c",
    "clear_c": "fever_clear_c",
}


class ConfigError(ValueError):
    """A rules config that cannot be pinned: not JSON, unknown keys, incoherent thresholds."""


class EnginePort(Protocol):
    """What replay needs from the rules engine, and nothing more."""

    def on_telemetry(self, event: Telemetry) -> list[Alert]: ...

    def on_time(self, watermark: datetime) -> list[Alert]: ...


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, so equal configs hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class PinnedRules:
    """A rules config fixed for one replay, with the hash that names it."""

    config: RulesConfig
    content: Mapping[str, Any]
    content_hash: str

    @property
    def label(self) -> str:
        """The config's own version label (what alerts carry as ``config_version``)."""
        return self.config.config_version

    @property
    def logic_version(self) -> str:
        return RULES_LOGIC_VERSION

    def canonical(self) -> str:
        return canonical_json(self.content)

    def fever_limits_for(self, patient_id: str) -> dict[str, float]:
        """The fever levels in force for a patient, for drawing on the timeline."""
        thresholds = self.config.thresholds_for(patient_id)
        return {name: float(getattr(thresholds, field)) for name, field in _FEVER_LIMITS.items()}

    def rule_version_for(self, patient_id: str) -> str:
        return self.config.compile_for(patient_id).rules_version

    def new_engine(self) -> ReplayEngine:
        """A fresh engine with empty state, as the live service has after a cold start."""
        return ReplayEngine(RulesEngine(self.config), self.config.allowed_lateness_s)


class ReplayEngine:
    """The engine as a replay drives it: the events it replays, plus the stream's clock.

    The live engine sees every patient's events, and its timers fire on one watermark that any
    event moves. A replay of one patient still has to move that watermark when the other
    patients' events would have, or a silence timer fires later than it did live (or never).
    ``advance_from`` moves event time for an event that is *not* replayed, exactly as the
    engine's own arrival of it would have, and returns the alerts of the timers that fall due.
    """

    __slots__ = ("_engine", "_lateness", "_mark")

    def __init__(self, engine: EnginePort, lateness_s: float) -> None:
        self._engine = engine
        self._lateness = lateness_s
        self._mark = float("-inf")

    def on_telemetry(self, event: Telemetry) -> list[Alert]:
        return self._engine.on_telemetry(event)

    def on_time(self, watermark: datetime) -> list[Alert]:
        return self._engine.on_time(watermark)

    def advance_from(self, event: Telemetry) -> list[Alert]:
        observed = observe(event)
        if observed.clock_skew:
            return []  # a skewed device clock does not move the live watermark either
        mark = observed.t - self._lateness
        if mark <= self._mark:
            return []
        self._mark = mark
        return self._engine.on_time(at(mark))


def pin(config: Mapping[str, Any] | RulesConfig) -> PinnedRules:
    """Validate a config and pin it; the hash is over its validated, canonical JSON."""
    try:
        validated = (
            config if isinstance(config, RulesConfig) else RulesConfig.model_validate(config)
        )
    except ValidationError as error:
        raise ConfigError(str(error)) from error
    content = validated.model_dump(mode="json")
    digest = hashlib.sha256(canonical_json(content).encode()).hexdigest()
    return PinnedRules(config=validated, content=content, content_hash=digest)


def default_rules() -> PinnedRules:
    """The engine's built-in protocol, pinned."""
    return pin(RulesConfig())


def load_rules_text(text: str, *, where: str = "config") -> PinnedRules:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not JSON ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a rules config is a JSON object")
    return pin(raw)


def load_rules_file(path: str | Path) -> PinnedRules:
    return load_rules_text(Path(path).read_text(encoding="utf-8"), where=str(path))


def with_overrides(base: PinnedRules, defaults: Mapping[str, Any]) -> PinnedRules:
    """``base`` with some default thresholds replaced (``{"fever_single_c": 38.0}``): the
    candidate of a what-if comparison."""
    content = json.loads(base.canonical())
    content["defaults"] = {**content.get("defaults", {}), **defaults}
    return pin(content)
