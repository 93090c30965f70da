"""A thermometer's reporting pattern is part of its registration: "silent" means later than
this device normally reports. A spot-check thermometer (a caregiver reads it a few times a day)
is silent after 12 h, not after the continuous thermometer's 4 h, and during a fever its "no
temperature" limit follows the hourly re-measuring rhythm (75 min), not 30 min."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from schemas.events import Alert, AlertPriority
from services.rules.domain.config import PatientProfile, Protocol, RulesConfig, Thresholds
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, Pulse, run_stream

T0 = datetime(2026, 11, 21, 8, 0, tzinfo=UTC)
SPOT_READINGS_H = (0, 4, 10, 14, 24)  # 08:00, 12:00, 18:00, 22:00, then 08:00 the next day


def config(home: Home, *, spot_check: bool) -> RulesConfig:
    thermometers = (home.thermometer_id,) if spot_check else ()
    return RulesConfig(
        profiles={
            home.patient_id: PatientProfile(
                patient_id=home.patient_id, spot_check_thermometers=thermometers
            )
        }
    )


def day_of_spot_checks(home: Home, until_h: float) -> list:
    """Spot-check readings at home times, heartbeats every 5 min (the pump plays no part)."""
    readings = [home.temp(h * 60, 36.8) for h in SPOT_READINGS_H if h <= until_h]
    beats = Pulse(T0).every(300, 0, until_h * 60)
    return sorted([*readings, *beats], key=lambda e: e.ingest_time)


def silent(alerts: list[Alert], home: Home) -> list[Alert]:
    return [a for a in alerts if a.code == "device_silent" and a.device_id == home.thermometer_id]


def test_a_spot_check_thermometer_between_its_readings_is_not_silent() -> None:
    """A day of spot checks, the longest gap 10 h overnight: no silence. Positive control: the
    same readings from a thermometer registered continuous page after 4 h in the two gaps
    longer than that (6 h and 10 h)."""
    home = Home("P-spot-1", T0)
    stream = day_of_spot_checks(home, 24)
    assert silent(run_stream(RulesEngine(config(home, spot_check=True)), stream), home) == []
    continuous = run_stream(RulesEngine(config(home, spot_check=False)), stream)
    assert len([a for a in silent(continuous, home) if a.phase.value == "start"]) == 2


def test_a_spot_check_thermometer_is_silent_after_12_h_and_not_a_minute_before() -> None:
    """Edge: the last reading reached us at 08:00:01; heartbeats up to 11 h 59 min later: quiet;
    at 12 h (plus the 5 s arrival lateness): silent, dated at the 12 h deadline."""
    home = Home("P-spot-2", T0)
    engine = RulesEngine(config(home, spot_check=True))
    run_stream(engine, [home.temp(0, 36.8)])
    pulse = Pulse(T0)
    assert silent(run_stream(engine, pulse.every(60, 1, 12 * 60 - 1)), home) == []
    (alert,) = silent(run_stream(engine, [pulse.beat(12 * 60 + 6 / 60)]), home)
    assert alert.device_time == T0 + timedelta(hours=12, seconds=1)
    assert "720 min" in alert.title


def test_during_a_fever_a_spot_check_home_re_measuring_hourly_is_observed() -> None:
    """A fever read by a spot-check thermometer, re-measured every 60 min: no "no temperature"
    page; 75 min without a reading: one. Positive control: a continuous thermometer with the
    same readings pages at 30 min after each."""
    home = Home("P-spot-3", T0)
    readings = [home.temp(m, 38.6) for m in (0, 60, 120, 180)]
    stream = sorted([*readings, *Pulse(T0).every(60, 0, 180 + 74)], key=lambda e: e.ingest_time)
    spot = run_stream(RulesEngine(config(home, spot_check=True)), stream)
    assert [a.code for a in spot if a.code == "fever_unobserved"] == []
    later = run_stream(
        RulesEngine(config(home, spot_check=True)),
        [*stream, Pulse(T0 + timedelta(minutes=180)).beat(75 + 6 / 60)],
    )
    (unobserved,) = [a for a in later if a.code == "fever_unobserved"]
    assert "75 min" in unobserved.title
    continuous = run_stream(RulesEngine(config(home, spot_check=False)), stream)
    starts = [a for a in continuous if a.code == "fever_unobserved" and a.phase.value == "start"]
    assert len(starts) == 4


def _silence_after_12_h(home: Home, overrides: dict[str, str], *, spot_check: bool) -> Alert:
    """The silence alert of a thermometer unread for 12 h, under the care team's protocol."""
    profile = PatientProfile(
        patient_id=home.patient_id,
        care_team_id="T-spot",
        spot_check_thermometers=(home.thermometer_id,) if spot_check else (),
    )
    protocol = Protocol(care_team_id="T-spot", version=1, overrides=overrides)
    engine = RulesEngine(
        RulesConfig(protocols={"T-spot": protocol}, profiles={home.patient_id: profile})
    )
    run_stream(engine, [home.temp(0, 36.8)])
    (alert,) = silent(run_stream(engine, Pulse(T0).every(60, 1, 12 * 60 + 1)), home)
    return alert


def test_a_protocol_can_let_a_missed_spot_check_wait_for_the_morning_round() -> None:
    """By default a missed spot check pages at any hour (medium). A care team's protocol may
    make it low, which notify holds through the team's quiet hours and pages as the morning
    digest. Edge: the same protocol leaves a continuous thermometer's silence medium."""
    morning = {"spot_check_silent_priority": "low"}
    default = _silence_after_12_h(Home("P-spot-5", T0), {}, spot_check=True)
    assert default.priority is AlertPriority.MEDIUM
    waits = _silence_after_12_h(Home("P-spot-6", T0), morning, spot_check=True)
    assert waits.priority is AlertPriority.LOW
    assert waits.code == "device_silent" and "720 min" in waits.title
    continuous = _silence_after_12_h(Home("P-spot-7", T0), morning, spot_check=False)
    assert continuous.priority is AlertPriority.MEDIUM


def test_a_missed_spot_check_is_medium_or_low_never_anything_else() -> None:
    for refused in (AlertPriority.HIGH, AlertPriority.INFO):
        with pytest.raises(ValidationError, match="morning round"):
            Thresholds(spot_check_silent_priority=refused)
