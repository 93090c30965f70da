"""The one place replay meets the rules engine: a pinned rules config in, a fresh engine out.

Replay depends on the engine only through ``EnginePort``: ``on_observation(event) -> list[Alert]``
(``on_telemetry`` is the same after the edge conversion) and ``on_time(watermark) -> list[Alert]``
(timers on event time, for the end of a stream). Events travel through replay in the engine's own
input form (``ReplayEvent``, the rules' ``Observation``), built from Kafka record bytes by the
very decoder the live service uses, from archive rows (``sources.event_from_row``, field for
field, since ingest stored the normalised values), or from ``Telemetry``: no per-event
pydantic validation on the hot path, and no second decoder that could disagree with the live one.
The config is the rules service's own ``RulesConfig`` (JSON: defaults, care-team protocols, patient
profiles and overrides, allowed lateness); its content hash (the sha256 of its label and of
the canonical JSON of each of its pieces, ``services/rules/domain/config_pieces.py``, so two
spellings of one config hash alike) is the very name under which the rules service records each
config it loads; this module pins a config by it and builds the engine from it.
When the engine's construction changes, only this file changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import msgspec
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from schemas.events import Alert, Telemetry
from services.rules.adapters.codec import decode_observation
from services.rules.adapters.config_store import canonical_json
from services.rules.adapters.config_store import content_hash as config_content_hash
from services.rules.domain.config import RULES_LOGIC_VERSION, RulesConfig
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import (
    PUMP_EVENT,
    PUMP_STATUS,
    TEMPERATURE,
    ArchivedObservation,
    ObservationLike,
    observe,
)

#: One event as replay carries it: the engine's own input form (a live ``Observation``, or an
#: ``ArchivedObservation`` read from the archive). Attributes replay reads: ``patient_id``,
#: ``device_id``, ``device_time``, ``t``, ``channel``, ``message_id``, ``clock_skew``, and by
#: kind ``temperature_c``, ``pump_state``, ``event``, ``alarm``.
ReplayEvent = ObservationLike
CHANNEL_TEMPERATURE = TEMPERATURE
CHANNEL_PUMP_STATUS = PUMP_STATUS
CHANNEL_PUMP_EVENT = PUMP_EVENT


#: A telemetry record's bytes, decoded exactly as the live rules service decodes them; raises
#: ``pydantic.ValidationError`` for a record that breaks the contract. The live decoder itself,
#: not a wrapper: it runs once per record.
decode_record: Callable[[bytes], ReplayEvent] = decode_observation


#: The positional builder of an archived event (the rules' own, see ``observation.py``): what
#: the archive reader calls once per row, with the row's columns in order
#: (``sources.archive_query``). The record's class itself: built in C.
build_archived = ArchivedObservation

#: A sealed archive day (``seal``) to and from its stored form: a MessagePack array of two
#: arrays, the rows' order keys (``sources.order_key``) and the rows as ``ArchivedObservation``
#: arrays, decoded into the records in one C call.
SealedDay = tuple[list[bytes], list[ArchivedObservation]]
encode_sealed_day: Callable[[SealedDay], bytes] = msgspec.msgpack.Encoder().encode
decode_sealed_day: Callable[[bytes], SealedDay] = msgspec.msgpack.Decoder(SealedDay).decode


def from_telemetry(event: Telemetry) -> ReplayEvent:
    return observe(event)


# The fever levels a report draws on a patient's timeline, by the names the report uses.
_FEVER_LIMITS = {
    "single_c": "fever_single_c",
    "sustained_c": "fever_sustained_c",
    "critical_c": "fever_critical_c",
    "clear_c": "fever_clear_c",
}


# Position sources whose ``where`` is a telemetry partition (see ``sources.Position``).
_PARTITIONED = frozenset({"kafka", "context", "warmup", "warmup-context"})


class ConfigError(ValueError):
    """A rules config that cannot be pinned: not JSON, unknown keys, incoherent thresholds."""


class EnginePort(Protocol):
    """What replay needs from the rules engine, and nothing more."""

    def on_observation(self, obs: ObservationLike) -> list[Alert]: ...

    def on_time(self, watermark: datetime) -> list[Alert]: ...

    def on_context(self, obs: ObservationLike) -> list[Alert]: ...


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

    @staticmethod
    def lane_of(position: tuple[str, Any, int]) -> Any:
        """Which engine an event goes to. The rules service runs one engine per telemetry
        partition (services/rules/service_layer/partitions.py, ``PartitionEngines``), each with
        its own watermark; a replay from Kafka does the same. Other sources have one lane."""
        source, where, _ = position
        return where if source in _PARTITIONED else None

    @staticmethod
    def partitioner(partitions: int) -> Callable[[str], int]:
        """The telemetry partition of a patient: ingest keys records by patient id and uses
        Kafka's default partitioner (murmur2 of the key, as the Java client does)."""

        def lane(patient_id: str) -> int:
            return int(murmur2(patient_id.encode()) & 0x7FFFFFFF) % partitions

        return lane

    def new_engine(self) -> ReplayEngine:
        """A fresh engine with empty state, as the live service has after a cold start."""
        return ReplayEngine(RulesEngine(self.config))


class ReplayEngine:
    """The engine as a replay drives it: the events it replays, plus the stream's clocks.

    The live engine sees every patient's events of its partition, and its timers fire on
    clocks that any of them moves (the event-time watermark and the arrival clock, see
    ``services.rules.domain.engine``). A replay of one patient still has to move those clocks
    when the other patients' events (and the pipeline heartbeats) would have, or a silence
    timer fires later than it did live (or never). ``advance_from`` moves them for an event
    that is *not* replayed, exactly as the engine's own arrival of it would have, and returns
    the alerts of the timers that fall due.
    """

    __slots__ = ("_engine", "on_event")

    def __init__(self, engine: EnginePort) -> None:
        self._engine = engine
        # The engine's own method, bound once: one call per replayed event, not two.
        self.on_event: Callable[[ReplayEvent], list[Alert]] = engine.on_observation

    def on_time(self, watermark: datetime) -> list[Alert]:
        return self._engine.on_time(watermark)

    def advance_from(self, event: ReplayEvent) -> list[Alert]:
        return self._engine.on_context(event)


def pin(config: Mapping[str, Any] | RulesConfig) -> PinnedRules:
    """Validate a config and pin it; the hash is over its label and its pieces (canonical JSON)."""
    try:
        validated = (
            config if isinstance(config, RulesConfig) else RulesConfig.model_validate(config)
        )
    except ValidationError as error:
        raise ConfigError(str(error)) from error
    content = validated.model_dump(mode="json")
    return PinnedRules(
        config=validated, content=content, content_hash=config_content_hash(validated)
    )


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
