"""``RulesCompiler``: every patient's rules equal ``RulesConfig.compile_for``'s, the thresholds
are resolved once per care team (not once per patient), and a config change compiles each
patient once, in the check before the swap, not again in the engines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import AlertPriority
from services.rules.domain.config import (
    PatientOverride,
    PatientProfile,
    Protocol,
    RulesCompiler,
    RulesConfig,
    Thresholds,
)
from services.rules.domain.engine import RulesEngine
from services.rules.service_layer.config_swap import ConfigWatch
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def fleet(version: str = "v1") -> RulesConfig:
    """Patients resolving every way there is: no profile; a profile without a team; a team
    without a protocol; two protocol teams; overrides with and without a team; and profiles
    that differ only in weight, cycle start and step-up day."""
    profiles = {}
    for n in range(6):
        profiles[f"A{n}"] = PatientProfile(
            patient_id=f"A{n}",
            care_team_id="team-a",
            weight_kg=10.0 + n,
            cycle_start=T0 - timedelta(days=n),
            step_up_day=None if n == 5 else 8,
        )
        profiles[f"B{n}"] = PatientProfile(patient_id=f"B{n}", care_team_id="team-b")
    profiles["loner"] = PatientProfile(patient_id="loner", weight_kg=21.0)
    profiles["no-protocol"] = PatientProfile(patient_id="no-protocol", care_team_id="team-z")
    profiles["A-own"] = PatientProfile(
        patient_id="A-own",
        care_team_id="team-a",
        weight_kg=14.0,
        override=PatientOverride(version=2, overrides={"fever_single_c": 38.1}),
    )
    profiles["own"] = PatientProfile(
        patient_id="own",
        override=PatientOverride(version=1, overrides={"pump_silent_minutes": 10}),
    )
    return RulesConfig(
        config_version=version,
        defaults=Thresholds(fever_clear_c=37.7),
        protocols={
            "team-a": Protocol(
                care_team_id="team-a", version=3, overrides={"fever_sustained_c": 37.9}
            ),
            "team-b": Protocol(
                care_team_id="team-b",
                version=1,
                overrides={"pump_alarm_priorities": {"battery_low": "high"}},
            ),
        },
        profiles=profiles,
    )


def test_every_patient_compiles_to_exactly_what_compile_for_gives() -> None:
    config = fleet()
    compiler = RulesCompiler(config)
    patients = [*config.profiles, "no-profile-1", "no-profile-2"]
    for patient_id in patients:
        assert compiler.rules_for(patient_id) == config.compile_for(patient_id), patient_id
    # The resolutions really differ, so the equality above compares something.
    rules = {p: compiler.rules_for(p) for p in patients}
    assert rules["A0"].fever.sustained_c == 37.9 and rules["B0"].fever.sustained_c == 38.0
    assert rules["A-own"].fever.single_c == 38.1 and rules["A1"].fever.single_c == 38.3
    assert rules["B0"].pump_alarm_priorities["battery_low"] is AlertPriority.HIGH
    assert rules["A0"].pump_alarm_priorities["battery_low"] is AlertPriority.MEDIUM
    assert rules["own"].pump_silent_s == 600.0 and rules["loner"].pump_silent_s != 600.0
    assert (rules["A0"].weight_kg, rules["A3"].weight_kg, rules["A5"].step_up_day) == (
        10.0,
        13.0,
        None,
    )
    assert rules["A0"].cycle_start_s != rules["A1"].cycle_start_s
    assert len({r.rules_version for r in rules.values()}) == 5  # defaults, a, b, A-own, own


def test_a_team_resolves_its_thresholds_once_and_an_override_stays_its_own() -> None:
    compiler = RulesCompiler(fleet())
    a0, a1, own = (compiler.rules_for(p) for p in ("A0", "A1", "A-own"))
    assert a0 is not a1  # each has its own weight and cycle
    assert a0.fever is a1.fever and a0.pump_alarm_priorities is a1.pump_alarm_priorities
    assert own.fever is not a0.fever
    # Without a profile, or with one that sets nothing the defaults' patients lack: one copy.
    assert compiler.rules_for("no-profile-1") is compiler.rules_for("no-profile-2")
    assert compiler.rules_for("no-profile-1").fever is compiler.rules_for("no-protocol").fever
    assert compiler.rules_for("A0") is a0  # each patient once


def test_an_engine_refuses_a_compiler_of_another_config() -> None:
    with pytest.raises(ValueError, match="another config"):
        RulesEngine(fleet("v1"), RulesCompiler(fleet("v2")))
    engine = RulesEngine(fleet("v1"))
    with pytest.raises(ValueError, match="another config"):
        engine.reconfigure(fleet("v2"), RulesCompiler(fleet("v3")))


async def test_a_checked_config_is_swapped_in_without_compiling_again() -> None:
    """The watch compiles every profiled patient while checking the new config; the engine
    swapped to it with the watch's compiler runs those very rules (the same objects), and
    decides by them."""
    old = RulesConfig(config_version="v-old", allowed_lateness_s=0)
    engine = RulesEngine(old)
    home = Home("A2", T0)
    assert run_stream(engine, [home.temp(0, 37.0)]) == []
    new = fleet("v-new").model_copy(update={"allowed_lateness_s": 0.0})

    async def load() -> RulesConfig:
        return new

    watch = ConfigWatch(load, old, interval_s=5)
    assert await watch.check_once() is new
    assert watch.compiled is not None and watch.compiled.config is new
    checked = watch.compiled.rules_for("A2")
    taken = watch.take()
    assert taken is new
    engine.reconfigure(taken, watch.compiled)
    assert engine._rules_for("A2") is checked
    # Team a's sustained level (37.9 °C) now decides: 60 min at 37.9 °C pages.
    alerts = run_stream(engine, [home.temp(m, 37.9) for m in range(5, 70, 5)])
    assert [a.code for a in alerts] == ["fever_sustained"]
    assert alerts[0].config_version == "v-new"


def test_check_refuses_an_override_the_rules_cannot_read_and_passes_the_rest() -> None:
    """``check`` (run on every config loaded from PostgreSQL) resolves each team's thresholds
    once and each override on its own: a bad override is refused even among teammates whose
    thresholds are fine, and a good fleet passes."""
    RulesCompiler(fleet()).check()
    good = fleet()
    bad_profile = good.profiles["A3"].model_copy(
        update={"override": PatientOverride(version=1, overrides={"fever_clear_c": 39.0})}
    )
    bad = good.model_copy(update={"profiles": {**good.profiles, "A3": bad_profile}})
    with pytest.raises(ValueError, match="clear"):
        bad.thresholds_for("A3")  # what check must surface
    with pytest.raises(ValueError, match="clear"):
        RulesCompiler(bad).check()
