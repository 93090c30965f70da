"""A new configuration swapped into a running engine (hot reload): patient state is kept,
decisions from then on follow the new thresholds and name the new config_version, and timers
armed from the old thresholds fire at the new deadlines. Also ``ConfigWatch``: a config that
fails to load keeps the old one in force."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.device import PumpState
from schemas.events import AlertPhase
from services.rules.domain.config import PatientOverride, PatientProfile, RulesConfig
from services.rules.domain.engine import RulesEngine
from services.rules.service_layer.config_swap import ConfigWatch
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def with_override(patient_id: str, version: str, **overrides: object) -> RulesConfig:
    return RulesConfig(
        config_version=version,
        allowed_lateness_s=0,
        profiles={
            patient_id: PatientProfile(
                patient_id=patient_id, override=PatientOverride(version=1, overrides=overrides)
            )
        },
    )


def test_a_reading_pages_after_the_swap_only_under_the_lowered_threshold() -> None:
    """38.1 °C does not page under the default 38.3 °C; after a swap to an override of 38.0 °C
    the next 38.1 °C reading pages, naming the new config_version and a new rule_version."""
    home = Home("P-swap-1", T0)
    old = RulesConfig(config_version="v-old", allowed_lateness_s=0)
    engine = RulesEngine(old)
    assert run_stream(engine, [home.temp(0, 38.1)]) == []
    engine.reconfigure(
        with_override("P-swap-1", "v-new", fever_single_c=38.0, fever_sustained_c=37.9)
    )
    alerts = run_stream(engine, [home.temp(5, 38.1)])
    assert [a.code for a in alerts] == ["fever_single"]
    assert alerts[0].config_version == "v-new"
    assert alerts[0].rule_version != RulesEngine(old).config.compile_for("x").fever.version
    assert alerts[0].evidence[0].limit == 38.0


def test_without_the_swap_the_same_reading_stays_quiet() -> None:
    """The control: the same two readings under the old config alone page nothing."""
    home = Home("P-swap-2", T0)
    engine = RulesEngine(RulesConfig(config_version="v-old", allowed_lateness_s=0))
    assert run_stream(engine, [home.temp(0, 38.1), home.temp(5, 38.1)]) == []


def test_an_open_fever_stays_one_episode_across_the_swap() -> None:
    """A fever opened under the old config is not paged again after the swap; its all clear
    follows the new clear level and carries the new config_version and the same dedup key."""
    home = Home("P-swap-3", T0)
    engine = RulesEngine(RulesConfig(config_version="v-old", allowed_lateness_s=0))
    (start,) = run_stream(engine, [home.temp(0, 38.6)])
    engine.reconfigure(with_override("P-swap-3", "v-new", fever_clear_c=37.0))
    # 37.5 clears under the old 37.8 but not under the new 37.0; 38.6 again is no new page.
    assert run_stream(engine, [home.temp(10, 38.6), home.temp(20, 37.5)]) == []
    (end,) = run_stream(engine, [home.temp(30, 36.9)])
    assert end.phase is AlertPhase.END and end.dedup_key == start.dedup_key
    assert (start.config_version, end.config_version) == ("v-old", "v-new")


def test_a_lowered_silence_limit_fires_at_the_new_earlier_deadline() -> None:
    """A pump silent since minute 0 under a 15-minute limit; a swap at minute 5 to 10 minutes
    re-arms its timer: it pages at minute 10, not 15, and the patient is reported as moved."""
    home = Home("P-swap-4", T0)
    engine = RulesEngine(RulesConfig(config_version="v-old", allowed_lateness_s=0))
    assert run_stream(engine, [home.status(0), home.temp(5, 36.8)]) == []
    engine.take_dirty()
    moved = engine.reconfigure(with_override("P-swap-4", "v-new", pump_silent_minutes=10))
    assert moved == {"P-swap-4"} and engine.take_dirty() == {"P-swap-4"}
    assert run_stream(engine, [home.temp(9, 36.8)]) == []
    (silent,) = run_stream(engine, [home.temp(11, 36.8)])
    assert silent.code == "device_silent" and silent.config_version == "v-new"
    # The deadline counts from the last message's arrival (ingest 1 s after its device time).
    assert silent.device_time == home.start.replace(minute=10, second=1)


def test_a_raised_silence_limit_does_not_fire_at_the_old_deadline() -> None:
    """The old 15-minute deadline passes without a page after a swap to 30 minutes; the page
    comes at minute 30. No patient is reported as moved (a later deadline needs no re-arm)."""
    home = Home("P-swap-5", T0)
    engine = RulesEngine(RulesConfig(config_version="v-old", allowed_lateness_s=0))
    run_stream(engine, [home.status(0), home.temp(5, 36.8)])
    assert engine.reconfigure(with_override("P-swap-5", "v-new", pump_silent_minutes=30)) == set()
    assert run_stream(engine, [home.temp(m, 36.8) for m in (10, 16, 29)]) == []
    (silent,) = run_stream(engine, [home.temp(31, 36.8)])
    assert silent.code == "device_silent"
    assert silent.device_time == home.start.replace(minute=30, second=1)


def test_a_lowered_interruption_page_moves_the_armed_clock() -> None:
    """A pump stopped at minute 0 pages at 30 min by default; swapped at minute 5 to a 20-minute
    page it pages at minute 20 with the new config_version."""
    home = Home("P-swap-6", T0)
    engine = RulesEngine(RulesConfig(config_version="v-old", allowed_lateness_s=0))
    events = [home.status(0), home.status(1, state=PumpState.STOPPED)]
    events += [home.temp(m, 36.8) for m in (1, 5)]
    assert run_stream(engine, events) == []
    new = with_override("P-swap-6", "v-new", interruption_page_minutes=20)
    assert engine.reconfigure(new) == {"P-swap-6"}
    clock = [
        a
        for a in run_stream(engine, [home.temp(m, 36.8) for m in (10, 20, 22)])
        if a.code == "infusion_interrupted"
    ]
    assert [a.device_time for a in clock] == [home.start.replace(minute=21)]
    assert clock[0].config_version == "v-new"


def test_state_persisted_after_a_swap_restores_to_the_same_decisions() -> None:
    """The snapshot taken right after a swap, restored on an engine built with the new config,
    decides exactly what the swapped engine decides for the rest of the stream."""
    home = Home("P-swap-7", T0)
    engine = RulesEngine(RulesConfig(config_version="v-old", allowed_lateness_s=0))
    run_stream(engine, [home.status(0), home.temp(0, 38.1), home.temp(5, 36.8)])
    new = with_override("P-swap-7", "v-new", pump_silent_minutes=10, fever_single_c=38.0)
    engine.reconfigure(new)
    twin = RulesEngine(new)
    twin.restore(engine.snapshot())
    rest = [home.temp(m, t) for m, t in ((8, 36.9), (11, 38.1), (14, 36.7), (25, 36.6))]
    first = run_stream(engine, rest)
    # The 11-minute reading is decided first, then the silence timer it makes due fires.
    assert [a.code for a in first] == ["fever_single", "device_silent", "fever_cleared"]
    assert run_stream(twin, rest) == first


async def test_a_config_that_fails_to_load_keeps_the_running_one() -> None:
    """A loader that raises is counted and leaves nothing to swap; the current version stays."""

    async def broken() -> RulesConfig:
        raise ConnectionError("postgres unreachable")

    watch = ConfigWatch(broken, RulesConfig(config_version="v-old"), interval_s=5)
    assert await watch.check_once() is None
    assert (watch.failures, watch.take(), watch.current_version) == (1, None, "v-old")


async def test_an_override_the_rules_cannot_read_is_refused() -> None:
    """A config whose patient override is not a valid threshold set (clear above sustained) is
    refused at load, not when the patient next reports."""
    bad = with_override("P-swap-8", "v-bad", fever_clear_c=39.0)

    async def load() -> RulesConfig:
        return bad

    watch = ConfigWatch(load, RulesConfig(config_version="v-old"), interval_s=5)
    assert await watch.check_once() is None
    assert watch.failures == 1 and watch.take() is None


async def test_a_changed_version_is_pending_until_taken_and_an_unchanged_one_is_not() -> None:
    """Same version: nothing to do. New version: held until the loop takes it, then current."""
    configs = [RulesConfig(config_version="v-old"), RulesConfig(config_version="v-new")]

    async def load() -> RulesConfig:
        return configs[0]

    watch = ConfigWatch(load, configs[0], interval_s=5)
    assert await watch.check_once() is None and watch.take() is None
    configs.pop(0)
    assert (await watch.check_once()) is configs[0]
    assert watch.take() is configs[0]
    assert watch.current_version == "v-new" and watch.take() is None
    assert await watch.check_once() is None and watch.failures == 0
