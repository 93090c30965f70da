"""Device silent (a technical alert on the arrival clock: nothing from the device has reached
us for its limit) and the patient-profile rule (a 7-day bag programmed for a patient under
22 kg)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import AlertKind, AlertPhase, AlertPriority
from services.rules.domain.config import PatientProfile, RulesConfig
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def clock_stream(until: int) -> list:
    """Another home whose pump reports every minute: it moves the partition's clocks."""
    other = Home("P-clock", T0)
    return [other.status(m) for m in range(0, until + 1)]


def merged(*streams: list) -> list:
    return sorted((e for s in streams for e in s), key=lambda e: e.device_time)


def test_pump_silent_for_15_min_is_a_technical_alert() -> None:
    """A pump from which nothing arrives for 15 min raises device_silent, medium, dated at the
    deadline: its last message's ingest time (1 s after its device time here) plus 15 min."""
    home = Home("P-silent-1", T0)
    alerts = run_stream(RulesEngine(), merged([home.status(0)], clock_stream(20)))
    mine = [a for a in alerts if a.patient_id == "P-silent-1"]
    assert [(a.code, a.kind, a.priority) for a in mine] == [
        ("device_silent", AlertKind.TECHNICAL, AlertPriority.MEDIUM)
    ]
    assert mine[0].device_time == T0 + timedelta(minutes=15, seconds=1)
    assert mine[0].device_id == home.pump_id


def test_pump_reporting_within_the_limit_is_not_silent() -> None:
    """Watermark at 14 min after its last message: not silent yet."""
    home = Home("P-silent-2", T0)
    alerts = run_stream(RulesEngine(), merged([home.status(0)], clock_stream(15)))
    assert [a for a in alerts if a.patient_id == "P-silent-2"] == []


def test_silent_device_coming_back_gets_an_all_clear_and_can_go_silent_again() -> None:
    """Back after silence: END; silent again later: a new alert with a new dedup key."""
    home = Home("P-silent-3", T0)
    engine = RulesEngine()
    first = run_stream(engine, merged([home.status(0)], clock_stream(20)))
    back = engine.on_telemetry(home.status(21))
    assert [(a.code, a.phase) for a in back] == [("device_silent", AlertPhase.END)]
    other = Home("P-clock", T0)
    again = run_stream(engine, [other.status(m) for m in range(21, 40)])
    mine = [a for a in again if a.patient_id == "P-silent-3"]
    assert len(mine) == 1 and mine[0].dedup_key != first[-1].dedup_key


def test_thermometer_has_its_own_silence_limit() -> None:
    """A spot-check thermometer is allowed 4 h by default: 3 h of quiet is not an alert."""
    home = Home("P-silent-4", T0)
    alerts = run_stream(RulesEngine(), merged([home.temp(0, 36.9)], clock_stream(181)))
    assert [a for a in alerts if a.patient_id == "P-silent-4"] == []


def test_device_clock_ahead_does_not_advance_the_watermark() -> None:
    """A message whose device clock ingest flagged as ahead (``device_clock_ahead``, or the
    older ``device_clock_skew``) does not move event time: another pump's bag clock does not
    fire from it. The positive control: the same message unflagged does fire it."""
    low = {"remaining_ml": 6.0}  # 36 min left at 10 mL/h: at risk (30 min lead) at +6 min
    ahead_ingest = T0 + timedelta(minutes=1)

    def run(flags: tuple[str, ...]) -> list[str]:
        home = Home("P-silent-5", T0)
        skewed = (
            Home("P-skew", T0)
            .status(10)
            .model_copy(update={"flags": flags, "ingest_time": ahead_ingest})
        )
        alerts = run_stream(RulesEngine(), [home.status(0, **low), skewed])
        return [a.code for a in alerts if a.patient_id == "P-silent-5"]

    assert run(("device_clock_ahead",)) == []
    assert run(("device_clock_skew",)) == []
    assert run(()) == ["bag_change_due"]


def test_on_time_fires_due_timers_explicitly() -> None:
    """on_time moves both clocks by hand (end of a replay): the silence fires at its deadline
    (ingest time of the last message + 15 min), not a moment before."""
    home = Home("P-silent-6", T0)
    engine = RulesEngine()
    assert engine.on_telemetry(home.status(0)) == []
    assert engine.on_time(T0 + timedelta(minutes=15)) == []
    deadline = T0 + timedelta(minutes=15, seconds=1)
    assert [a.code for a in engine.on_time(deadline)] == ["device_silent"]


def weighted(patient_id: str, weight_kg: float | None) -> RulesConfig:
    return RulesConfig(
        profiles={patient_id: PatientProfile(patient_id=patient_id, weight_kg=weight_kg)}
    )


def test_seven_day_bag_for_a_child_under_22_kg_alerts_high() -> None:
    """0.6 mL/h (7-day bag) for an 18 kg patient: high, with weight and rate as evidence."""
    home = Home("P-7d-1", T0)
    alerts = run_stream(
        RulesEngine(weighted("P-7d-1", 18.0)), [home.status(0, rate_ml_h=0.6, remaining_ml=100)]
    )
    assert [(a.code, a.priority) for a in alerts] == [
        ("seven_day_bag_underweight", AlertPriority.HIGH)
    ]
    assert {e.name: (e.value, e.limit) for e in alerts[0].evidence} == {
        "weight_kg": (18.0, 22.0),
        "rate_ml_h": (0.6, 0.6),
    }


def test_seven_day_bag_at_exactly_22_kg_does_not_alert() -> None:
    """22.0 kg is not under 22 kg: no alert (the PI's limit is 'under 22 kg')."""
    home = Home("P-7d-2", T0)
    engine = RulesEngine(weighted("P-7d-2", 22.0))
    assert run_stream(engine, [home.status(0, rate_ml_h=0.6, remaining_ml=100)]) == []


def test_other_bag_rates_for_a_small_child_do_not_alert_and_repeat_statuses_page_once() -> None:
    """1.8 mL/h (72 h bag) at 15 kg is fine; repeated 0.6 mL/h statuses alert once."""
    home = Home("P-7d-3", T0)
    engine = RulesEngine(weighted("P-7d-3", 15.0))
    assert run_stream(engine, [home.status(0, rate_ml_h=1.8)]) == []
    alerts = run_stream(
        engine, [home.status(m, rate_ml_h=0.6, remaining_ml=100) for m in range(5, 30, 5)]
    )
    assert len(alerts) == 1
    ended = engine.on_telemetry(home.status(31, rate_ml_h=1.8))
    assert [a.phase for a in ended] == [AlertPhase.END]


def test_unknown_weight_does_not_alert() -> None:
    """Without a weight in the profile the rule cannot decide; it stays quiet."""
    home = Home("P-7d-4", T0)
    assert run_stream(RulesEngine(), [home.status(0, rate_ml_h=0.6)]) == []
