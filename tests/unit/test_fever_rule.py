"""FeverRule: the cases that must page, must not page, and the edges between them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from schemas.device import TemperatureReading, TemperatureUnit
from schemas.events import AlertPhase, AlertPriority, AlertState, Telemetry
from services.rules.domain.fever import FeverState, FeverThresholds, evaluate_fever

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
DEFAULT = FeverThresholds()


def reading(minutes: float, celsius: float, *, message_id: uuid.UUID | None = None) -> Telemetry:
    at = T0 + timedelta(minutes=minutes)
    message = TemperatureReading.model_validate(
        {
            "schema": "vigil.device.temperature.v1",
            "message_id": str(message_id or uuid.uuid4()),
            "device_id": "thermo-P-0001",
            "seq": int(minutes * 60),
            "device_time": at.isoformat(),
            "value": celsius,
            "unit": TemperatureUnit.CELSIUS,
        }
    )
    return Telemetry(
        patient_id="P-0001",
        device_id="thermo-P-0001",
        mqtt_topic="vigil/v1/dev/thermo-P-0001/temperature",
        ingest_time=at + timedelta(seconds=1),
        message=message,
        temperature_c=celsius,
    )


def run(events: list[Telemetry], thresholds: FeverThresholds = DEFAULT) -> list:
    state = FeverState()
    emitted = []
    for event in events:
        state, alerts = evaluate_fever(state, event, thresholds)
        emitted.extend(alerts)
    return emitted


def test_single_reading_at_threshold_pages() -> None:
    """A single reading exactly at 38.3 °C pages high priority, with value and limit as evidence."""
    alerts = run([reading(0, 37.0), reading(5, 38.3)])
    assert len(alerts) == 1
    alert = alerts[0]
    assert alert.phase is AlertPhase.START
    assert alert.priority is AlertPriority.HIGH
    assert alert.state is AlertState.ACTIVE
    assert alert.code == "fever_single"
    assert alert.evidence[0].value == 38.3
    assert alert.evidence[0].limit == 38.3
    assert alert.device_time == T0 + timedelta(minutes=5)
    assert alert.ingest_time == T0 + timedelta(minutes=5, seconds=1)
    assert alert.rule_id == "fever" and alert.rule_version == DEFAULT.rule_version()


def test_single_reading_just_below_threshold_does_not_page() -> None:
    """38.29 °C once, with nothing sustained, is not a page."""
    assert run([reading(0, 37.0), reading(5, 38.29)]) == []


def test_normal_readings_never_page() -> None:
    """A day of normal temperatures produces no alert."""
    events = [reading(m, 36.6 + (m % 7) / 10) for m in range(0, 24 * 60, 10)]
    assert run(events) == []


def test_sustained_38_for_60_minutes_pages() -> None:
    """38.0 °C held for exactly 60 minutes pages, naming the start of the run as evidence."""
    events = [reading(m, 38.0) for m in range(0, 61, 10)]
    alerts = run(events)
    assert [a.code for a in alerts] == ["fever_sustained"]
    assert alerts[0].evidence[0].device_time == T0
    assert alerts[0].evidence[-1].device_time == T0 + timedelta(minutes=60)
    assert alerts[0].device_time == T0 + timedelta(minutes=60)


def test_sustained_one_second_short_does_not_page() -> None:
    """59 minutes 59 seconds at 38.0 °C is one second short of the duration: no page yet."""
    events = [reading(m, 38.1) for m in range(0, 60, 10)] + [reading(59 + 59 / 60, 38.1)]
    assert run(events) == []


def test_sustained_run_broken_by_a_normal_reading_restarts() -> None:
    """A reading below 38.0 in the middle restarts the hour."""
    events = [reading(0, 38.1), reading(30, 37.9), reading(40, 38.1), reading(90, 38.1)]
    assert run(events) == []
    alerts = run([*events, reading(100, 38.1)])
    assert [a.code for a in alerts] == ["fever_sustained"]


def test_readings_too_far_apart_are_not_a_sustained_run() -> None:
    """Two febrile readings further apart than max_gap are not one sustained hour."""
    thresholds = FeverThresholds(max_gap=timedelta(minutes=45))
    assert run([reading(0, 38.1), reading(60, 38.1)], thresholds) == []
    assert len(run([reading(0, 38.1), reading(40, 38.1), reading(60, 38.1)], thresholds)) == 1


def test_out_of_order_readings_complete_the_run() -> None:
    """Readings that arrive out of order are placed by device time and still page."""
    events = [reading(60, 38.2), reading(0, 38.1), reading(30, 38.1)]
    alerts = run(events)
    assert [a.code for a in alerts] == ["fever_sustained"]


def test_late_normal_reading_inside_the_run_breaks_it() -> None:
    """A normal reading arriving late, from inside the hour, means the fever was not sustained."""
    events = [reading(0, 38.1), reading(50, 38.1), reading(25, 37.2), reading(60, 38.1)]
    assert run(events) == []


def test_duplicate_reading_does_not_page_twice() -> None:
    """The same message delivered twice pages once."""
    mid = uuid.uuid4()
    alerts = run([reading(0, 38.6, message_id=mid), reading(0, 38.6, message_id=mid)])
    assert len(alerts) == 1


def test_hysteresis_keeps_a_bouncing_reading_to_one_page() -> None:
    """Readings bouncing around 38.3 °C stay one episode until one falls below clear_c."""
    events = [
        reading(0, 38.4),
        reading(5, 38.2),
        reading(10, 38.4),
        reading(15, 37.9),
        reading(20, 38.5),
    ]
    alerts = run(events)
    assert [a.phase for a in alerts] == [AlertPhase.START]


def test_clearing_below_clear_level_sends_all_clear_and_a_new_fever_pages_again() -> None:
    """Below 37.8 °C ends the episode with an all clear; a later fever is a new episode."""
    alerts = run([reading(0, 38.5), reading(30, 37.7), reading(90, 38.6)])
    assert [a.phase for a in alerts] == [AlertPhase.START, AlertPhase.END, AlertPhase.START]
    assert alerts[0].dedup_key == alerts[1].dedup_key
    assert alerts[2].dedup_key != alerts[0].dedup_key
    assert alerts[1].state is AlertState.INACTIVE


def test_critical_level_escalates_once() -> None:
    """39.5 °C during an open fever escalates, and only once."""
    alerts = run([reading(0, 38.4), reading(10, 39.5), reading(20, 39.8)])
    assert [a.phase for a in alerts] == [AlertPhase.START, AlertPhase.ESCALATE]
    assert alerts[1].code == "fever_critical"


def test_critical_first_reading_starts_as_critical() -> None:
    """A first reading at the critical level opens as critical, with no extra escalation."""
    alerts = run([reading(0, 39.7), reading(10, 39.9)])
    assert [(a.phase, a.code) for a in alerts] == [(AlertPhase.START, "fever_critical")]


def test_critical_first_reading_shows_the_critical_limit_in_its_evidence() -> None:
    """A first reading of 39.7 °C crossed 39.5 °C: the evidence names that limit, not 38.3 °C;
    a reading of 39.0 °C (single, not critical) keeps the 38.3 °C limit."""
    critical = run([reading(0, 39.7)])[0]
    assert [(e.name, e.value, e.limit) for e in critical.evidence] == [("temperature", 39.7, 39.5)]
    single = run([reading(0, 39.0)])[0]
    assert single.code == "fever_single"
    assert [(e.name, e.limit) for e in single.evidence] == [("temperature", 38.3)]


def test_critical_edge_exactly_at_the_limit() -> None:
    """Exactly 39.5 °C is critical (>=) and shows 39.5 as its limit."""
    alert = run([reading(0, 39.5)])[0]
    assert alert.code == "fever_critical"
    assert alert.evidence[0].limit == 39.5 and alert.evidence[0].comparator == ">="


def test_late_reading_from_a_cleared_fever_does_not_reopen_it() -> None:
    """A febrile reading arriving late from inside an already cleared episode pages no one again."""
    alerts = run([reading(0, 38.5), reading(30, 37.5), reading(10, 38.6)])
    assert [a.phase for a in alerts] == [AlertPhase.START, AlertPhase.END]


def test_alert_ids_are_deterministic() -> None:
    """The same stream gives the same alert ids: a replay reproduces the decision exactly."""
    mid = uuid.UUID(int=7)
    first = run([reading(0, 38.5, message_id=mid)])
    second = run([reading(0, 38.5, message_id=mid)])
    assert first[0].alert_id == second[0].alert_id


def test_configurable_thresholds_change_the_decision() -> None:
    """A protocol that pages on any 38.0 °C reading pages where the default does not."""
    strict = FeverThresholds(single_c=38.0, sustained_c=38.0, clear_c=37.5)
    assert run([reading(0, 38.0)]) == []
    assert len(run([reading(0, 38.0)], strict)) == 1
    assert strict.rule_version() != DEFAULT.rule_version()


@pytest.mark.parametrize(
    "kwargs",
    [{"clear_c": 38.1}, {"single_c": 37.9}, {"critical_c": 38.0}, {"sustained_for": timedelta(0)}],
)
def test_incoherent_thresholds_are_refused(kwargs: dict) -> None:
    """A threshold set whose levels are out of order cannot be built."""
    with pytest.raises(ValueError):
        FeverThresholds(**kwargs)


def test_a_probe_off_reading_does_not_end_a_fever_and_a_normal_one_does() -> None:
    """A patch off the skin reads 34.0 °C in the middle of a fever: the episode stays open
    (no all clear, no second page when the fever reads again). The edge: 35.4 °C clears
    nothing, 35.5 °C is a reading that ends it."""
    events = [reading(0, 38.9), reading(5, 34.0), reading(10, 35.4), reading(15, 38.8)]
    assert [a.phase for a in run(events)] == [AlertPhase.START]
    ended = run([*events, reading(20, 35.5)])
    assert [a.phase for a in ended] == [AlertPhase.START, AlertPhase.END]
