"""A rules service upgraded in place restores from the state records the previous version wrote.

``fixtures/rules_state_v1.jsonl`` holds state-topic records (one patient's state per record,
and the partition's ``__meta__`` record) exactly as the rules service wrote them before rule
state was typed records encoded by ``msgspec`` (pumps under the patient, ``pump_timers``): the
engine's records after every 35th event of the golden recording, and after every fourth event
of ``edge_stream`` below (sensor fault, seq gaps, inhibited and open pump alarms, an
interruption clock, a pipeline outage with held timers).
Each line is ``{"stream", "cut", "key", "value"}`` with the record's bytes as ``value``.

An engine restored from the records of a cut and fed the rest of the stream decides exactly the
alerts of an uninterrupted run, and ends in the same state.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from schemas.device import PumpAlarmCode, PumpEventKind, PumpState, TemperatureSite
from schemas.events import Alert, Telemetry
from services.rules.domain.config import RulesConfig
from services.rules.domain.engine import RulesEngine
from tests.golden.test_rules_golden import load
from tests.support.rules import Home, Pulse, run_stream

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rules_state_v1.jsonl"
META_KEY = "__meta__/0"
T0 = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)


def edge_stream() -> list[Telemetry]:
    """Heartbeats and two homes whose state holds what the golden recording does not."""
    pulse = Pulse(T0)
    beats = pulse.every(15, 0, 28) + pulse.every(15, 34, 90)  # nothing delivered 28-34 min
    fault = Home("P-v1-fault", T0)
    temps = [fault.temp(m, 37.0, site=TemperatureSite.AXILLARY) for m in range(0, 90, 5)]
    temps[3] = fault.temp(15, 44.0)  # implausible: a sensor fault until the next reading
    del temps[6]  # a seq gap never filled: data lost
    del temps[8:10]
    pump = Home("P-v1-pump", T0)
    events = [pump.status(m) for m in range(0, 12)]
    events += [
        pump.alarm(12, PumpAlarmCode.OCCLUSION_DOWNSTREAM),
        pump.clear(14, PumpAlarmCode.OCCLUSION_DOWNSTREAM),
        pump.status(15, state=PumpState.STOPPED, remaining_ml=200.0),
        pump.alarm(16, PumpAlarmCode.RESERVOIR_LOW),  # inhibited: the pump is stopped
        pump.alarm(17, PumpAlarmCode.AIR_IN_LINE),
        pump.status(40, state=PumpState.STOPPED, remaining_ml=200.0),
        pump.pump_event(50, PumpEventKind.INFUSION_STARTED),
    ]
    events += [pump.status(m, remaining_ml=200.0 - m / 6) for m in range(51, 70, 3)]
    events += [pump.status(m, remaining_ml=5.0) for m in range(70, 80, 3)]
    return sorted([*beats, *temps, *events], key=lambda e: e.ingest_time)


def streams() -> dict[str, tuple[RulesConfig, list[Telemetry]]]:
    config, golden, _ = load()
    return {"golden": (config, golden), "edge": (RulesConfig(), edge_stream())}


def fixture_records() -> dict[tuple[str, int], list[tuple[str, bytes]]]:
    records: dict[tuple[str, int], list[tuple[str, bytes]]] = defaultdict(list)
    for line in FIXTURE.read_text().splitlines():
        entry = json.loads(line)
        records[(entry["stream"], entry["cut"])].append((entry["key"], entry["value"].encode()))
    return records


def restored(config: RulesConfig, records: list[tuple[str, bytes]]) -> RulesEngine:
    """An engine restored as the service restores one partition from its state topic."""
    engine = RulesEngine(config)
    meta: dict[str, Any] | None = None
    patients: dict[str, Any] = {}
    for key, value in records:
        if key == META_KEY:
            meta = orjson.loads(value)
        else:
            patients[key] = orjson.loads(value)
    assert meta is not None
    engine.restore_meta(meta)
    engine.restore_patients(patients)
    engine.take_dirty()
    return engine


def encoded(alerts: list[Alert]) -> list[str]:
    return [a.model_dump_json(by_alias=True) for a in alerts]


def test_the_fixture_covers_each_stream_and_every_kind_of_state() -> None:
    """Open seq gaps, a sensor fault, a silence, open and inhibited pump alarms, armed pump
    clocks, a fever window of several readings, timers held after an outage."""
    records = fixture_records()
    assert {stream for stream, _ in records} == {"golden", "edge"}
    values = [orjson.loads(v) for group in records.values() for k, v in group if k != META_KEY]
    metas = [orjson.loads(v) for group in records.values() for k, v in group if k == META_KEY]
    devices = [d for p in values for d in p["devices"].values()]
    pumps = [pump for p in values for pump in p["pumps"].values()]
    assert any(d["gaps"] for d in devices)
    assert any(d["fault_key"] for d in devices)
    assert any(d["silent_key"] for d in devices)
    assert any(pump["alarms"] for pump in pumps)
    assert any(pump["inhibited"] for pump in pumps)
    assert any(p["pump_timers"] for p in values)
    assert any(len(p["fever"]["window"]) > 3 for p in values)
    assert any(p["unobserved_key"] for p in values)
    assert any(m["held"] for m in metas)


def test_records_of_the_previous_version_restore_to_the_same_decisions() -> None:
    records = fixture_records()
    for name, (config, events) in streams().items():
        through = RulesEngine(config)
        expected = encoded(run_stream(through, events))
        cuts = sorted(cut for stream, cut in records if stream == name)
        assert cuts, name
        for cut in cuts:
            prefix = run_stream(RulesEngine(config), events[:cut])
            engine = restored(config, records[(name, cut)])
            rest = run_stream(engine, events[cut:])
            assert encoded(prefix + rest) == expected, f"{name}: resumed after {cut} events"
            assert engine.snapshot() == through.snapshot(), f"{name}: state after {cut}"
