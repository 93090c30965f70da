"""Golden replay: the recorded stream in, exactly the recorded alerts out, also across a crash.

``home_week.telemetry.jsonl`` is a recorded stream (three homes over 12 h: a sustained axillary
fever on cycle day 2 that escalates, goes unobserved and clears; a 7-day bag for an 18.5 kg
child with an occlusion that stops the pump past the escalation point and a pump that goes
silent; a healthy home whose bag needs changing). ``home_week.alerts.jsonl`` is what the engine
decided when the stream was recorded (``python -m tests.golden.record``), reviewed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import Alert, Telemetry
from services.rules.domain.config import RulesConfig
from services.rules.domain.engine import RulesEngine

HERE = Path(__file__).resolve().parent


def load() -> tuple[RulesConfig, list[Telemetry], list[str]]:
    config = RulesConfig.model_validate_json((HERE / "home_week.config.json").read_text())
    events = [
        Telemetry.model_validate_json(line)
        for line in (HERE / "home_week.telemetry.jsonl").read_text().splitlines()
    ]
    expected = (HERE / "home_week.alerts.jsonl").read_text().splitlines()
    return config, events, expected


def encoded(alerts: list[Alert]) -> list[str]:
    return [a.model_dump_json(by_alias=True) for a in alerts]


def test_recorded_stream_gives_exactly_the_recorded_alerts() -> None:
    """Every alert, byte for byte and in order: ids, phases, evidence, rule versions."""
    config, events, expected = load()
    engine = RulesEngine(config)
    decided: list[Alert] = []
    for event in events:
        decided += engine.on_telemetry(event)
    assert encoded(decided) == expected
    assert len(expected) >= 10  # the recording exercises every rule, not an empty file


def test_every_rule_is_exercised_by_the_recording() -> None:
    """The golden file covers each rule's start and end, so a silent rule change shows."""
    _, _, expected = load()
    codes = {(json.loads(line)["rule_id"], json.loads(line)["phase"]) for line in expected}
    for rule in (
        "fever",
        "pump_alarm",
        "interruption_clock",
        "bag_clock",
        "device_silent",
        "fever_unobserved",
        "seven_day_bag_weight",
    ):
        assert (rule, "start") in codes, rule
    assert ("interruption_clock", "escalate") in codes and ("fever", "escalate") in codes


def test_crash_and_resume_at_every_point_gives_the_same_alerts() -> None:
    """At every position of the stream: stop, snapshot through JSON, restore into a fresh
    engine, go on. Alerts before plus after equal the uninterrupted run: none lost, none
    duplicated, same order."""
    config, events, expected = load()
    prefix: list[Alert] = []
    running = RulesEngine(config)
    for cut in range(len(events) + 1):
        saved = json.dumps(running.snapshot())
        resumed = RulesEngine(RulesConfig.model_validate_json(config.model_dump_json()))
        resumed.restore(json.loads(saved))
        decided = list(prefix)
        for event in events[cut:]:
            decided += resumed.on_telemetry(event)
        assert encoded(decided) == expected, f"resume after {cut} events"
        if cut < len(events):
            prefix += running.on_telemetry(events[cut])


def test_partial_snapshots_of_dirty_patients_restore_the_same_state() -> None:
    """Persisting only the patients each batch touched (as the service does) loses nothing."""
    config, events, expected = load()
    engine = RulesEngine(config)
    store: dict[str, dict] = {}
    meta: dict = {}
    decided: list[Alert] = []
    for start in range(0, 200, 25):
        for event in events[start : start + 25]:
            decided += engine.on_telemetry(event)
        store.update(json.loads(json.dumps(engine.snapshot_patients(engine.take_dirty()))))
        meta = engine.meta_snapshot()
    resumed = RulesEngine(config)
    resumed.restore_meta(meta)
    resumed.restore_patients(store)
    for event in events[200:]:
        decided += resumed.on_telemetry(event)
    assert encoded(decided) == expected


def test_a_different_rule_version_is_visible_in_the_diff() -> None:
    """Replaying under another threshold set changes decisions and names the new version."""
    config, events, expected = load()
    stricter = config.model_copy(
        update={
            "config_version": "golden-2",
            "defaults": config.defaults.model_copy(update={"interruption_page_minutes": 20.0}),
        }
    )
    engine = RulesEngine(stricter)
    decided: list[Alert] = []
    for event in events:
        decided += engine.on_telemetry(event)
    assert encoded(decided) != expected
    assert {a.config_version for a in decided} == {"golden-2"}


def test_encoded_patient_state_is_the_snapshot_at_every_position() -> None:
    """What the service writes to its state topic (``encode_patients``, serialised straight
    from the live records) decodes to exactly ``snapshot_patients`` after every event of the
    recording, and restores to an engine that decides the rest of the stream identically."""
    import orjson

    config, events, expected = load()
    engine = RulesEngine(config)
    decided: list[Alert] = []
    for n, event in enumerate(events):
        decided += engine.on_telemetry(event)
        touched = engine.take_dirty()
        fast = {p: orjson.loads(v) for p, v in engine.encode_patients(touched)}
        slow = orjson.loads(orjson.dumps(engine.snapshot_patients(touched)))
        assert fast == slow, n
        if n == len(events) // 2:
            twin = RulesEngine(config)
            twin.restore_meta(engine.meta_snapshot())
            everyone = {e.patient_id for e in events}
            twin.restore_patients({p: orjson.loads(v) for p, v in engine.encode_patients(everyone)})
            rest = [a for e in events[n + 1 :] for a in twin.on_telemetry(e)]
    assert rest, "the second half of the recording pages"
    assert encoded(decided[len(decided) - len(rest) :]) == encoded(rest)
    assert encoded(decided) == expected
