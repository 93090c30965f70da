"""An implausible temperature is a sensor fault, never a fever (docs/mqtt.md: outside
30.0-43.0 °C). It raises a technical alert of its own, does not count as a temperature taken,
and cannot open or end a fever episode. The Kafka record path is tested as ingest writes it:
``temperature_c`` empty and the ``implausible_temperature`` flag set."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas.device import TemperatureSite, TemperatureUnit
from schemas.events import AlertKind, AlertPhase, AlertPriority, Telemetry
from services.rules.adapters.codec import decode_observation
from services.rules.domain.config import Thresholds
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import observe
from tests.support.rules import Home, run_stream
from vigil.kafka import encode

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def as_ingest_writes_it(event: Telemetry) -> Telemetry:
    """An implausible reading as ingest puts it on Kafka: flagged, no normalised value."""
    return event.model_copy(update={"temperature_c": None, "flags": ("implausible_temperature",)})


def test_45_degrees_pages_a_sensor_fault_not_a_fever() -> None:
    """The reported defect: 45.0 °C through the record ingest writes raised "Fever 45.0 °C" at
    high priority. It raises one technical sensor-fault alert, medium, with the reading and
    the limit it crossed as evidence, and no fever alert."""
    home = Home("P-fault-1", T0)
    record = as_ingest_writes_it(home.temp(0, 45.0))
    alerts = RulesEngine().on_observation(decode_observation(encode(record)))
    assert [(a.rule_id, a.code, a.kind, a.priority, a.phase) for a in alerts] == [
        (
            "sensor_fault",
            "implausible_temperature",
            AlertKind.TECHNICAL,
            AlertPriority.MEDIUM,
            AlertPhase.START,
        )
    ]
    (evidence,) = alerts[0].evidence
    assert (evidence.value, evidence.limit, evidence.comparator) == (45.0, 43.0, ">")
    assert "not a fever" in alerts[0].title


def test_the_validated_model_path_decides_the_same() -> None:
    """``observe`` (the validated path, the replay's Kafka fallback) gives the same alerts as
    the fast decoder for the flagged record."""
    record = as_ingest_writes_it(Home("P-fault-2", T0).temp(0, 45.0))
    fast = RulesEngine().on_observation(decode_observation(encode(record)))
    slow = RulesEngine().on_observation(observe(record))
    assert fast == slow


@pytest.mark.parametrize(
    ("celsius", "fault"),
    [(43.0, False), (43.01, True), (30.0, False), (29.99, True)],
)
def test_the_edges_of_the_plausible_range(celsius: float, fault: bool) -> None:
    """30.0 and 43.0 °C are temperatures (43.0 pages as a fever); just outside them is a
    sensor fault and never a fever."""
    alerts = run_stream(RulesEngine(), [Home("P-fault-3", T0).temp(0, celsius)])
    rules = [a.rule_id for a in alerts]
    if fault:
        assert rules == ["sensor_fault"]
    else:
        assert "sensor_fault" not in rules
        assert (rules == ["fever"]) == (celsius >= 38.3)


def test_a_fahrenheit_reading_out_of_range_is_a_fault_too() -> None:
    """113 °F is 45 °C: the range applies to the reading in °C, whatever unit it came in."""
    home = Home("P-fault-4", T0)
    event = home.temp(0, 45.0)
    message = event.message.model_copy(update={"value": 113.0, "unit": TemperatureUnit.FAHRENHEIT})
    record = as_ingest_writes_it(event.model_copy(update={"message": message}))
    alerts = RulesEngine().on_observation(decode_observation(encode(record)))
    assert [a.rule_id for a in alerts] == ["sensor_fault"]


def test_a_fault_does_not_end_a_fever_and_the_next_plausible_reading_ends_the_fault() -> None:
    """A probe off the skin in the middle of a fever (25 °C) neither clears the fever nor
    counts as a temperature taken; one fault alert for the run of bad readings, and the next
    plausible reading is its all clear (and folds into the fever as a reading)."""
    home = Home("P-fault-5", T0)
    engine = RulesEngine()
    (fever,) = run_stream(engine, [home.temp(0, 38.9, site=TemperatureSite.ORAL)])
    bad = run_stream(engine, [home.temp(m, 25.0) for m in (5, 10, 15)])
    assert [(a.rule_id, a.phase) for a in bad] == [("sensor_fault", AlertPhase.START)]
    good = run_stream(engine, [home.temp(20, 38.7, site=TemperatureSite.ORAL)])
    assert [(a.rule_id, a.phase) for a in good] == [("sensor_fault", AlertPhase.END)]
    assert good[0].dedup_key == bad[0].dedup_key
    # The fever is still open: a clearing reading ends it now, with the fever's own key.
    (end,) = run_stream(engine, [home.temp(30, 37.0)])
    assert (end.rule_id, end.phase, end.dedup_key) == ("fever", AlertPhase.END, fever.dedup_key)


def test_implausible_readings_do_not_keep_a_fever_observed() -> None:
    """Only temperatures count for "no temperature for 30 min": a fever followed by 40 min of
    implausible readings pages fever_unobserved (the child's temperature is unknown)."""
    home = Home("P-fault-6", T0)
    engine = RulesEngine()
    events = [home.temp(0, 38.9)] + [home.temp(m, 45.0) for m in range(5, 45, 5)]
    codes = [a.code for a in run_stream(engine, events)]
    assert codes.count("fever_unobserved") == 1
    assert "fever_single" in codes and codes.count("implausible_temperature") == 1


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        ({"fever_single_c": 44.0, "fever_critical_c": 44.5}, True),
        ({"fever_critical_c": 43.01}, True),
        ({"fever_critical_c": 43.0}, False),
        ({"fever_clear_c": 30.0, "fever_sustained_c": 30.5}, True),
        ({"fever_clear_c": 30.1, "fever_sustained_c": 30.5}, False),
    ],
)
def test_a_threshold_no_body_temperature_can_reach_is_refused(
    overrides: dict[str, float], refused: bool
) -> None:
    """A charge nurse's 44.0 °C fever threshold would switch fever paging off for the whole
    team (every reading above 43.0 °C is a sensor fault): the protocol does not validate, so
    it is refused at sign-off and a reload keeps the config in force. The edge: 43.0 °C is
    allowed, 43.01 is not; a clear level at or under 30.0 °C is refused too."""
    if refused:
        with pytest.raises(ValidationError):
            Thresholds(**overrides)
    else:
        Thresholds(**overrides)
