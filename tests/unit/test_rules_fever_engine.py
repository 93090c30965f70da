"""Fever through the RulesEngine: site offsets, a thermometer silent during a fever, and the
composite rule (cycle days 1-3, the step-up day) that raises a fever's priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.device import TemperatureSite
from schemas.events import AlertPhase, AlertPriority, AlertState
from services.rules.domain.config import PatientProfile, RulesConfig, Thresholds
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def axillary_config(offset: float = 0.5) -> RulesConfig:
    return RulesConfig(defaults=Thresholds(fever_site_offsets_c={"axillary": offset}))


def test_axillary_offset_pages_a_reading_that_is_a_fever_at_the_core() -> None:
    """37.8 °C axillary + 0.5 °C offset = 38.3 °C: pages, with both values in the evidence."""
    home = Home("P-ax-1", T0)
    alerts = run_stream(
        RulesEngine(axillary_config()), [home.temp(0, 37.8, site=TemperatureSite.AXILLARY)]
    )
    assert [a.code for a in alerts] == ["fever_single"]
    core, measured = alerts[0].evidence
    assert (core.value, core.limit) == (38.3, 38.3)
    assert measured.name == "temperature_as_measured_axillary"
    assert (measured.value, measured.limit) == (37.8, 37.8)


def test_axillary_offset_one_step_below_does_not_page() -> None:
    """37.79 °C axillary (38.29 °C corrected) is below the single-reading threshold."""
    home = Home("P-ax-2", T0)
    engine = RulesEngine(axillary_config())
    assert run_stream(engine, [home.temp(0, 37.79, site=TemperatureSite.AXILLARY)]) == []


def test_offset_applies_only_to_its_own_site() -> None:
    """The axillary offset does not change an oral reading: 37.8 °C oral stays quiet."""
    home = Home("P-ax-3", T0)
    engine = RulesEngine(axillary_config())
    assert run_stream(engine, [home.temp(0, 37.8, site=TemperatureSite.ORAL)]) == []


def test_default_protocol_has_no_site_offset() -> None:
    """Without a configured offset, 37.8 °C axillary is not a page (sites differ: opt in)."""
    home = Home("P-ax-4", T0)
    assert run_stream(RulesEngine(), [home.temp(0, 37.8, site=TemperatureSite.AXILLARY)]) == []


def fever_then_silence(home: Home, last_minute: int) -> list:
    """A fever at minute 0, readings every 10 min until ``last_minute``, then the pump alone."""
    events = [home.temp(m, 38.6) for m in range(0, last_minute + 1, 10)]
    events += [home.status(m) for m in range(0, last_minute + 120, 5)]
    return sorted(events, key=lambda e: e.device_time)


def test_thermometer_silent_during_fever_pages_high() -> None:
    """A fever open and no temperature reaching us for 30 min pages high priority, dated at
    the deadline: the last reading's ingest time (1 s after its device time) + 30 min."""
    home = Home("P-unobs-1", T0)
    alerts = run_stream(RulesEngine(), fever_then_silence(home, 20))
    unobserved = [a for a in alerts if a.code == "fever_unobserved"]
    assert len(unobserved) == 1
    assert unobserved[0].priority is AlertPriority.HIGH
    assert unobserved[0].device_time == T0 + timedelta(minutes=50, seconds=1)
    assert unobserved[0].device_id == home.thermometer_id


def test_thermometer_silence_edge_one_minute_before_and_at_the_limit() -> None:
    """Arrival clock just short of 30 min after the last reading of a fever: quiet; past it:
    pages. Arrival lateness 5 s: the clock is the newest ingest time - 5 s."""
    home = Home("P-unobs-2", T0)
    engine = RulesEngine()
    events = [home.temp(0, 38.6), home.temp(29, 38.6)]
    events += [home.status(m) for m in range(0, 60)]
    alerts = run_stream(engine, sorted(events, key=lambda e: e.device_time))
    # Last reading reached us at 29:01: deadline 59:01; the clock stands at 59:01 - 5 s.
    assert [a.code for a in alerts] == ["fever_single"]
    later = engine.on_telemetry(home.status(60))
    assert [a.code for a in later] == ["fever_unobserved"]
    assert later[0].device_time == T0 + timedelta(minutes=59, seconds=1)


def test_thermometer_back_ends_the_unobserved_alert() -> None:
    """A temperature arriving after the unobserved alert ends it with an all clear."""
    home = Home("P-unobs-3", T0)
    engine = RulesEngine()
    alerts = run_stream(engine, fever_then_silence(home, 20))
    back = engine.on_telemetry(home.temp(200, 38.4))
    assert back[0].code == "fever_unobserved" and back[0].phase is AlertPhase.END
    assert back[0].dedup_key == next(a for a in alerts if a.code == "fever_unobserved").dedup_key
    assert back[0].state is AlertState.INACTIVE


def test_no_fever_no_unobserved_alert() -> None:
    """A thermometer quiet after normal readings is a device-silent matter, not a fever one."""
    home = Home("P-unobs-4", T0)
    events = [home.temp(0, 36.8)] + [home.status(m) for m in range(0, 120, 5)]
    alerts = run_stream(RulesEngine(), events)
    assert "fever_unobserved" not in {a.code for a in alerts}


# A site protocol that grades a sustained fever medium by itself: the composite rule is what
# raises it on the risky days. (The default protocol pages every fever high already.)
GRADED = Thresholds(fever_sustained_priority=AlertPriority.MEDIUM)


def profile_config(patient_id: str, cycle_start: datetime) -> RulesConfig:
    return RulesConfig(
        defaults=GRADED,
        profiles={patient_id: PatientProfile(patient_id=patient_id, cycle_start=cycle_start)},
    )


def sustained(home: Home, start_minute: int) -> list:
    return [home.temp(start_minute + m, 38.1) for m in range(0, 61, 10)]


def test_sustained_fever_on_cycle_day_2_is_raised_to_high() -> None:
    """The same sustained fever is medium on day 5 and high on cycle day 2 (CRS risk)."""
    home = Home("P-crs-1", T0)
    day2 = run_stream(
        RulesEngine(profile_config("P-crs-1", T0 - timedelta(days=1))), sustained(home, 0)
    )
    home = Home("P-crs-1", T0)
    day5 = run_stream(
        RulesEngine(profile_config("P-crs-1", T0 - timedelta(days=4))), sustained(home, 0)
    )
    assert [a.priority for a in day2] == [AlertPriority.HIGH]
    assert [a.priority for a in day5] == [AlertPriority.MEDIUM]
    assert day2[0].evidence[-1].name == "cycle_day" and day2[0].evidence[-1].value == 2
    assert "cycle day 2" in day2[0].title


def test_day_after_step_up_is_raised_and_the_edge_of_day_4_is_not() -> None:
    """Day 9 (day after the day-8 step-up) raises; one second into day 4 does not."""
    home = Home("P-crs-2", T0)
    day9 = run_stream(
        RulesEngine(profile_config("P-crs-2", T0 - timedelta(days=8))), sustained(home, 0)
    )
    assert [a.priority for a in day9] == [AlertPriority.HIGH]
    # The sustained alert is decided at minute 60: cycle start so that minute 60 is day 4 + 1 s.
    home = Home("P-crs-2", T0)
    start = T0 + timedelta(minutes=60) - timedelta(days=3, seconds=1)
    day4 = run_stream(RulesEngine(profile_config("P-crs-2", start)), sustained(home, 0))
    assert [a.priority for a in day4] == [AlertPriority.MEDIUM]


def test_no_profile_no_composite() -> None:
    """Without a cycle start the rule cannot know the day and leaves the priority alone."""
    home = Home("P-crs-3", T0)
    alerts = run_stream(RulesEngine(RulesConfig(defaults=GRADED)), sustained(home, 0))
    assert [a.priority for a in alerts] == [AlertPriority.MEDIUM]
    assert all(e.name != "cycle_day" for e in alerts[0].evidence)


def test_default_protocol_pages_a_sustained_fever_high() -> None:
    """Both fever criteria are the definition of fever: by default both page high."""
    alerts = run_stream(RulesEngine(), sustained(Home("P-crs-4", T0), 0))
    assert [(a.code, a.priority) for a in alerts] == [("fever_sustained", AlertPriority.HIGH)]


def test_engine_fever_duplicate_and_out_of_order() -> None:
    """Through the engine, a duplicate reading pages once and a late reading completes a run."""
    home = Home("P-dup-1", T0)
    first = home.temp(0, 38.5)
    assert len(run_stream(RulesEngine(), [first, first])) == 1
    home = Home("P-ooo-1", T0)
    events = [home.temp(60, 38.2), home.temp(0, 38.1), home.temp(30, 38.1)]
    assert [a.code for a in run_stream(RulesEngine(), events)] == ["fever_sustained"]
