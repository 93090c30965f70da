"""The engine port: pinning a rules config, its content hash, and building fresh engines."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from vigil_tools.replay.engine_port import (
    ConfigError,
    default_rules,
    from_telemetry,
    load_rules_file,
    load_rules_text,
    pin,
    with_overrides,
)
from vigil_tools.replay.synthetic import FeverEpisode, course

START = datetime(2026, 3, 1, tzinfo=UTC)


def test_equal_configs_spelled_differently_hash_the_same() -> None:
    """Key order, whitespace and defaults written out do not change a config's identity."""
    a = load_rules_text('{"defaults": {"fever_single_c": 38.3, "fever_sustained_c": 38.0}}')
    b = load_rules_text('{ "defaults" : { "fever_sustained_c": 38, "fever_single_c": 38.30 } }')
    assert a.content_hash == b.content_hash == default_rules().content_hash


def test_a_changed_threshold_changes_the_hash_and_the_limits() -> None:
    """A what-if candidate is a different config, and draws its own limits."""
    base = default_rules()
    candidate = with_overrides(base, {"fever_single_c": 38.0})
    assert candidate.content_hash != base.content_hash
    assert candidate.fever_limits_for("P-1")["single_c"] == 38.0
    assert base.fever_limits_for("P-1")["single_c"] == 38.3
    assert candidate.rule_version_for("P-1") != base.rule_version_for("P-1")


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"defaults": {"no_such_threshold": 1}}',
        '{"defaults": {"fever_single_c": 37.0}}',  # below the clear level: incoherent
    ],
)
def test_configs_that_cannot_be_pinned_are_refused(text: str) -> None:
    """A replay never runs under a config the rules service itself would refuse."""
    with pytest.raises(ConfigError):
        load_rules_text(text)


def test_a_config_file_round_trips_through_its_canonical_form(tmp_path: Path) -> None:
    """What a version stores (canonical JSON) pins to the same hash as the file it came from."""
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"config_version": "site-a-7", "allowed_lateness_s": 30}))
    pinned = load_rules_file(path)
    assert pinned.label == "site-a-7"
    again = pin(json.loads(pinned.canonical()))
    assert again.content_hash == pinned.content_hash


def test_each_engine_starts_empty() -> None:
    """Two replays under one pinned config share no state: a fever the first engine already
    opened is still news to the second."""
    rules = default_rules()
    spike = course(
        "P-1",
        START,
        days=0.1,
        fevers=(FeverEpisode(timedelta(0), timedelta(minutes=5), 38.6),),
        pauses=(),
    )
    first, second = rules.new_engine(), rules.new_engine()
    assert [a.code for a in first.on_event(from_telemetry(spike[0]))] == ["fever_single"]
    assert first.on_event(from_telemetry(spike[0])) == []  # the same reading again: already decided
    assert [a.code for a in second.on_event(from_telemetry(spike[0]))] == ["fever_single"]
