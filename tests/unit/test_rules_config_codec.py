"""RulesConfig resolution and serialisation, the edge codec (Kafka bytes -> Observation), and
the engine snapshot contract."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.events import Telemetry
from services.rules.adapters.codec import decode_observation
from services.rules.domain.config import (
    PatientOverride,
    PatientProfile,
    Protocol,
    RulesConfig,
    Thresholds,
)
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import Observation, observe
from services.rules.settings import RULES_STATE_TOPIC
from tests.support.rules import Home
from vigil_tools.stack.topics import RULES_STATE_TOPIC as STACK_STATE_TOPIC
from vigil_tools.stack.topics import TOPICS

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "home_week.telemetry.jsonl"


def test_patient_override_wins_over_protocol_over_defaults() -> None:
    """Defaults < care-team protocol < patient override, field by field."""
    config = RulesConfig(
        protocols={
            "T1": Protocol(
                care_team_id="T1",
                version=3,
                overrides={
                    "fever_single_c": 38.0,
                    "fever_sustained_c": 38.0,
                    "fever_clear_c": 37.5,
                },
            )
        },
        profiles={
            "A": PatientProfile(
                patient_id="A",
                care_team_id="T1",
                override=PatientOverride(version=1, overrides={"fever_single_c": 38.5}),
            ),
            "B": PatientProfile(patient_id="B", care_team_id="T1"),
        },
    )
    assert config.thresholds_for("A").fever_single_c == 38.5
    assert config.thresholds_for("A").fever_clear_c == 37.5
    assert config.thresholds_for("B").fever_single_c == 38.0
    assert config.thresholds_for("C").fever_single_c == 38.3
    assert config.compile_for("A").rules_version != config.compile_for("C").rules_version


def test_config_round_trips_through_json() -> None:
    """A replay loads exactly the configuration that was pinned."""
    config = RulesConfig(
        config_version="v7",
        defaults=Thresholds(fever_site_offsets_c={"axillary": 0.5}),
        profiles={
            "A": PatientProfile(
                patient_id="A", weight_kg=20.0, cycle_start=datetime(2026, 1, 1, tzinfo=UTC)
            )
        },
    )
    assert RulesConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    "overrides",
    [{"interruption_page_minutes": 130}, {"fever_clear_c": 38.5}, {"no_such_threshold": 1}],
)
def test_incoherent_or_unknown_thresholds_are_refused(overrides: dict) -> None:
    """Page after escalation, clear above fever, a misspelt name: all refused."""
    with pytest.raises(ValidationError):
        Thresholds.model_validate({**Thresholds().model_dump(), **overrides})


def fields(obs: Observation) -> dict:
    return {name: getattr(obs, name) for name in Observation.__slots__}


def test_fast_codec_gives_the_same_observation_as_the_validated_model() -> None:
    """For every record of the golden stream, orjson decoding equals pydantic decoding."""
    lines = GOLDEN.read_bytes().splitlines()
    assert lines
    for line in lines:
        assert fields(decode_observation(line)) == fields(
            observe(Telemetry.model_validate_json(line))
        )


def test_codec_falls_back_to_the_model_for_fahrenheit_and_rejects_broken_records() -> None:
    """A reading without a normalised value goes through the model; a broken record raises."""
    event = Home("P-codec", datetime(2026, 1, 1, tzinfo=UTC)).temp(0, 38.4)
    data = json.loads(event.model_dump_json(by_alias=True))
    data["temperature_c"] = None
    data["message"]["unit"] = "F"
    data["message"]["value"] = 101.3
    obs = decode_observation(json.dumps(data).encode())
    assert obs.temperature_c == pytest.approx(38.5, abs=0.01)
    with pytest.raises(ValidationError):
        decode_observation(b'{"schema": "vigil.telemetry.v1", "patient_id": 1}')


def test_snapshot_is_json_and_restores_to_the_same_snapshot() -> None:
    """snapshot() is plain JSON data; restore(snapshot) reproduces it exactly."""
    engine = RulesEngine()
    for line in GOLDEN.read_bytes().splitlines()[:120]:
        engine.on_observation(decode_observation(line))
    data = json.loads(json.dumps(engine.snapshot()))
    twin = RulesEngine()
    twin.restore(data)
    assert twin.snapshot() == data


def test_snapshot_of_another_format_is_refused() -> None:
    """A snapshot written by an incompatible engine is not silently misread."""
    with pytest.raises(ValueError):
        RulesEngine().restore({"format": 99, "max_t": None, "watermark": None, "patients": {}})


def test_state_topic_name_matches_the_stack_and_is_compacted() -> None:
    """The service's default state topic is the one the stack creates, compacted."""
    assert RULES_STATE_TOPIC == STACK_STATE_TOPIC
    spec = next(t for t in TOPICS if t.name == RULES_STATE_TOPIC)
    assert spec.cleanup_policy == "compact"


def test_every_field_of_rule_state_is_in_the_snapshot() -> None:
    """A field added to a state record but not to its snapshot would be lost on restart: after
    every event of the golden recording and of the compatibility test's edge stream (open seq
    gaps, a sensor fault, raised and inhibited pump alarms, held timers), each patient's record,
    encoded as the service writes it, decodes to a state equal to the live one in every field."""
    from services.rules.domain.state import patient_from_record
    from tests.unit.test_rules_state_compat import streams

    for config, events in streams().values():
        engine = RulesEngine(config)
        for event in events:
            engine.on_telemetry(event)
            for patient_id, record in engine.encode_patients(set(engine._patients)):
                assert patient_from_record(json.loads(record)) == engine._patients[patient_id]
