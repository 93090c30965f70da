"""The rules after the care team ends a patient's infusion or discharges them (the profile's
``infusion_ended_at`` and ``discharged_at``): a discharged patient's home going quiet pages
nothing, a reading taken after the discharge is not evaluated (counted), and after the end of
infusion the pump pages nothing while fever is still watched. Each with a patient still
monitored in the same stream as the positive control."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.device import PumpState
from schemas.events import Alert
from services.rules.domain.config import PatientProfile, RulesConfig
from services.rules.domain.config_pieces import profile_piece
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, Pulse, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def engine_with(**profiles: PatientProfile) -> RulesEngine:
    return RulesEngine(RulesConfig(profiles=dict(profiles)))


def started(alerts: list[Alert], patient_id: str) -> list[tuple[str, str]]:
    return [
        (a.code, a.device_id)
        for a in alerts
        if a.patient_id == patient_id and a.phase.value in ("start", "escalate")
    ]


def test_a_discharged_home_going_quiet_pages_nothing_while_a_monitored_one_does() -> None:
    gone, kept = Home("P-gone", T0), Home("P-kept", T0)
    discharged = T0 + timedelta(minutes=5)
    engine = engine_with(
        **{"P-gone": PatientProfile(patient_id="P-gone", discharged_at=discharged)}
    )
    alerts = run_stream(
        engine, [gone.status(0), gone.temp(0, 36.8), kept.status(0), kept.temp(0, 36.8)]
    )
    alerts += run_stream(engine, Pulse(T0).every(15, 0.25, 300))
    # The positive control: the same devices of a monitored patient are paged silent.
    assert ("device_silent", kept.pump_id) in started(alerts, "P-kept")
    assert ("device_silent", kept.thermometer_id) in started(alerts, "P-kept")
    assert started(alerts, "P-gone") == []
    assert sorted(engine.take_stopped()) == [("silent", "discharged"), ("silent", "discharged")]


def test_a_silence_due_before_the_discharge_is_still_paged() -> None:
    """Edge: the pump's silence fell due (15 min) before the discharge was recorded at 20 min:
    it was a real silence of a monitored child."""
    home = Home("P-late", T0)
    engine = engine_with(
        **{"P-late": PatientProfile(patient_id="P-late", discharged_at=T0 + timedelta(minutes=20))}
    )
    alerts = run_stream(engine, [home.status(0), *Pulse(T0).every(15, 0.25, 30)])
    assert started(alerts, "P-late") == [("device_silent", home.pump_id)]


def test_a_reading_taken_after_the_discharge_is_not_evaluated_and_is_counted() -> None:
    gone, kept = Home("P-fever-gone", T0), Home("P-fever-kept", T0)
    engine = engine_with(
        **{"P-fever-gone": PatientProfile(patient_id="P-fever-gone", discharged_at=T0)}
    )
    alerts = run_stream(engine, [gone.temp(1, 39.8), kept.temp(1, 39.8)])
    assert started(alerts, "P-fever-kept")[0][0].startswith("fever")
    assert started(alerts, "P-fever-gone") == []
    assert engine.take_stopped() == [("reading", "discharged")]
    # Nothing of it is kept: no state for the discharged patient.
    assert engine.snapshot_patients({"P-fever-gone"}) == {}


def test_after_the_end_of_infusion_the_pump_pages_nothing_and_fever_is_still_watched() -> None:
    home, kept = Home("P-ended", T0), Home("P-running", T0)
    ended = T0 + timedelta(minutes=2)
    engine = engine_with(
        **{"P-ended": PatientProfile(patient_id="P-ended", infusion_ended_at=ended)}
    )
    alerts = run_stream(
        engine,
        [
            home.status(0),
            kept.status(0),
            # The pump stops at the end of the course: no interruption clock pages for it.
            home.status(1, state=PumpState.STOPPED),
            kept.status(1, state=PumpState.STOPPED),
            # A pump report after the end of infusion is not evaluated.
            home.status(3, state=PumpState.STOPPED),
        ],
    )
    alerts += run_stream(engine, [home.temp(4, 39.8), *Pulse(T0).every(15, 4.25, 120)])
    codes = [code for code, _ in started(alerts, "P-ended")]
    assert any(code.startswith("fever") for code in codes)
    assert not any(device == home.pump_id for _, device in started(alerts, "P-ended"))
    control = started(alerts, "P-running")
    assert ("device_silent", kept.pump_id) in control
    assert any(code.startswith("infusion_interrupted") for code, _ in control), control
    stopped = engine.take_stopped()
    assert ("reading", "infusion_ended") in stopped
    assert ("silent", "infusion_ended") in stopped


def test_a_profile_piece_without_an_end_keeps_its_text() -> None:
    """The fields are written only once recorded: the pieces of patients still monitored keep
    the digest they had before the fields existed."""
    plain = profile_piece(PatientProfile(patient_id="P-1", weight_kg=20.0))
    assert "discharged_at" not in plain.text and "infusion_ended_at" not in plain.text
    ended = profile_piece(PatientProfile(patient_id="P-1", weight_kg=20.0, discharged_at=T0))
    assert "discharged_at" in ended.text and ended.digest != plain.digest
