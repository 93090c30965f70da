"""Records the golden stream and its expected alerts (run by hand, then review the diff).

``python -m tests.golden.record`` writes ``home_week.telemetry.jsonl`` (the recorded input: one
``Telemetry`` per line, as ingest puts it on Kafka), ``home_week.config.json`` (the pinned
``RulesConfig``) and ``home_week.alerts.jsonl`` (what the engine decided). The expected file is
only ever rewritten on purpose, after a rule change whose new decisions were read and agreed;
``tests/golden/test_rules_golden.py`` fails on any difference.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.device import PumpAlarmCode, PumpEventKind, PumpState, TemperatureSite
from schemas.events import Telemetry
from services.rules.domain.config import PatientProfile, RulesConfig, Thresholds
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home

HERE = Path(__file__).resolve().parent
T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)
NAME = "home_week"
_NUMBERED = uuid.UUID("6f1c1e0a-3b7d-4c52-9a0e-2d8b5f4c7e19")


def config(prefix: str = "") -> RulesConfig:
    return RulesConfig(
        config_version="golden-1",
        # A team that wants the bag page two hours ahead (the default lead is 30 min).
        defaults=Thresholds(fever_site_offsets_c={"axillary": 0.5}, bag_change_lead_minutes=120),
        profiles={
            f"{prefix}G-FEVER": PatientProfile(
                patient_id=f"{prefix}G-FEVER", weight_kg=30.0, cycle_start=T0 - timedelta(days=1)
            ),
            f"{prefix}G-PUMP": PatientProfile(
                patient_id=f"{prefix}G-PUMP", weight_kg=18.5, cycle_start=T0 - timedelta(days=10)
            ),
            f"{prefix}G-QUIET": PatientProfile(patient_id=f"{prefix}G-QUIET", weight_kg=40.0),
        },
    )


def stream(prefix: str = "") -> list[Telemetry]:
    """The recorded stream in arrival order; ``prefix`` renames the patients and devices."""
    fever = Home(f"{prefix}G-FEVER", T0)
    pump = Home(f"{prefix}G-PUMP", T0)
    quiet = Home(f"{prefix}G-QUIET", T0)
    events: list[Telemetry] = []
    # G-QUIET: a healthy home all day long; its pump reports every 5 min (it moves the watermark).
    # Its bag runs empty at 13 h: "bag change due" at 11 h; the family hangs a new bag at 11:30.
    for m in range(0, 12 * 60, 5):
        left = 130 - 10 * m / 60 if m < 690 else 250 - 10 * (m - 690) / 60
        events.append(quiet.status(m, rate_ml_h=10.0, remaining_ml=left))
        if m == 690:
            events.append(quiet.pump_event(m, PumpEventKind.BAG_CHANGED))
        if m % 60 == 0:
            events.append(quiet.temp(m, 36.7 + (m % 120) / 600, site=TemperatureSite.ORAL))
    # A broken reading from G-QUIET's thermometer: a sensor fault, never a fever; the next
    # plausible reading is its all clear.
    events.append(quiet.temp(200, 45.0, site=TemperatureSite.ORAL))
    # G-FEVER (cycle day 2): a sustained axillary fever, a critical reading, a thermometer that
    # goes quiet during the fever, then back and clearing; one duplicate, one late reading.
    for m in range(0, 61, 10):
        events.append(fever.temp(60 + m, 37.6, site=TemperatureSite.AXILLARY))
    duplicate = fever.temp(140, 39.1, site=TemperatureSite.AXILLARY)
    events += [duplicate, duplicate]
    # Buffered on the hub: reaches ingest 21 min after it was measured.
    late = fever.temp(135, 37.7, site=TemperatureSite.AXILLARY)
    late = late.model_copy(update={"ingest_time": late.device_time + timedelta(minutes=21)})
    events.append(late)
    events.append(fever.temp(150, 38.4, site=TemperatureSite.AXILLARY))
    events.append(fever.temp(240, 37.0, site=TemperatureSite.AXILLARY))
    events.append(fever.temp(250, 36.9, site=TemperatureSite.AXILLARY))
    for m in range(0, 12 * 60, 5):
        events.append(fever.status(m, rate_ml_h=5.0, remaining_ml=240 - 5 * m / 60))
    # G-PUMP (18.5 kg, 7-day bag): profile alert; an occlusion that stops the pump for 2.5 h,
    # cleared; reservoir low while stopped (inhibited); the pump then goes silent.
    events.append(pump.status(0, rate_ml_h=0.6, remaining_ml=100))
    events.append(pump.status(5, rate_ml_h=0.6, remaining_ml=99.95))
    events.append(pump.alarm(10, PumpAlarmCode.OCCLUSION_DOWNSTREAM))
    for m in range(15, 160, 5):
        events.append(pump.status(m, state=PumpState.ALARMING, rate_ml_h=0.6, remaining_ml=99.9))
    events.append(pump.alarm(20, PumpAlarmCode.RESERVOIR_LOW))
    events.append(pump.clear(158, PumpAlarmCode.OCCLUSION_DOWNSTREAM))
    events.append(pump.pump_event(160, PumpEventKind.INFUSION_STARTED))
    events.append(pump.status(165, rate_ml_h=1.8, remaining_ml=99.8))
    events.append(pump.status(170, rate_ml_h=1.8, remaining_ml=99.6))
    # Arrival order is ingest order (a stable sort keeps a duplicate next to its original).
    events.sort(key=lambda e: e.ingest_time)
    # Three of G-QUIET's pump statuses (6:40 to 6:50) are lost on the way, after the pump
    # numbered them: the gap in its seq is raised as data lost 30 min after it was seen.
    lost = {quiet.pump_id: {T0 + timedelta(minutes=m) for m in (400, 405, 410)}}
    return [
        e for e in numbered_as_sent(events) if e.device_time not in lost.get(e.device_id, set())
    ]


def numbered_as_sent(events: list[Telemetry]) -> list[Telemetry]:
    """Each device numbers its messages in the order it takes them (device time), one by one,
    as the device contract asks: the script above builds some messages out of that order. A
    duplicate keeps its original's number and id."""
    order = sorted(
        {e.message.message_id: e for e in events}.values(),
        key=lambda e: (
            e.device_id,
            e.device_time,
            e.message.seq,
        ),
    )
    renamed: dict[object, tuple[int, uuid.UUID]] = {}
    counters: dict[str, int] = {}
    for event in order:
        seq = counters[event.device_id] = counters.get(event.device_id, 0) + 1
        renamed[event.message.message_id] = (seq, uuid.uuid5(_NUMBERED, f"{event.device_id}|{seq}"))
    out = []
    for event in events:
        seq, message_id = renamed[event.message.message_id]
        message = event.message.model_copy(update={"seq": seq, "message_id": message_id})
        out.append(event.model_copy(update={"message": message}))
    return out


def decide(cfg: RulesConfig, events: list[Telemetry]) -> list[str]:
    engine = RulesEngine(cfg)
    lines = []
    for event in events:
        lines += [a.model_dump_json(by_alias=True) for a in engine.on_telemetry(event)]
    return lines


def main() -> None:
    cfg = config()
    events = stream()
    (HERE / f"{NAME}.config.json").write_text(
        json.dumps(json.loads(cfg.model_dump_json()), indent=2, sort_keys=True) + "\n"
    )
    (HERE / f"{NAME}.telemetry.jsonl").write_text(
        "".join(e.model_dump_json(by_alias=True) + "\n" for e in events)
    )
    (HERE / f"{NAME}.alerts.jsonl").write_text("".join(line + "\n" for line in decide(cfg, events)))


if __name__ == "__main__":
    main()
