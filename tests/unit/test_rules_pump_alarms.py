"""PumpAlarmRule: which pump alarms page at which priority, the all clear, inhibition by a
stopped pump, and the edges (duplicates, out-of-order raise and clear)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas.device import PumpAlarmCode, PumpEventKind, PumpState
from schemas.events import AlertKind, AlertPhase, AlertPriority, AlertState
from services.rules.domain.config import RulesConfig, Thresholds
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)

HIGH = [
    PumpAlarmCode.OCCLUSION_UPSTREAM,
    PumpAlarmCode.OCCLUSION_DOWNSTREAM,
    PumpAlarmCode.AIR_IN_LINE,
    PumpAlarmCode.RESERVOIR_EMPTY,
    PumpAlarmCode.PUMP_ERROR,
    PumpAlarmCode.DOOR_OPEN,
]
MEDIUM = [PumpAlarmCode.BATTERY_LOW, PumpAlarmCode.RESERVOIR_LOW]


@pytest.mark.parametrize("code", HIGH)
def test_stopping_alarms_page_high(code: PumpAlarmCode) -> None:
    """Occlusion, air in line, reservoir empty, pump error, door open: high, technical."""
    home = Home(f"P-alarm-{code.value}", T0)
    alerts = run_stream(RulesEngine(), [home.status(0), home.alarm(1, code)])
    assert [(a.code, a.priority, a.kind, a.phase) for a in alerts] == [
        (f"pump_{code.value}", AlertPriority.HIGH, AlertKind.TECHNICAL, AlertPhase.START)
    ]
    assert alerts[0].rule_id == "pump_alarm"
    assert alerts[0].evidence[0].message_id is not None


@pytest.mark.parametrize("code", MEDIUM)
def test_warning_alarms_page_medium(code: PumpAlarmCode) -> None:
    """Battery low and reservoir low (on a running pump) are medium priority."""
    home = Home(f"P-warn-{code.value}", T0)
    alerts = run_stream(RulesEngine(), [home.status(0), home.alarm(1, code)])
    assert [a.priority for a in alerts] == [AlertPriority.MEDIUM]


def test_clearing_resolves_with_an_all_clear() -> None:
    """The pump clearing its alarm ends the alert: same dedup key, state inactive."""
    home = Home("P-clear-1", T0)
    alerts = run_stream(
        RulesEngine(),
        [home.alarm(0, PumpAlarmCode.AIR_IN_LINE), home.clear(3, PumpAlarmCode.AIR_IN_LINE)],
    )
    assert [a.phase for a in alerts] == [AlertPhase.START, AlertPhase.END]
    assert alerts[0].dedup_key == alerts[1].dedup_key
    assert alerts[1].state is AlertState.INACTIVE and alerts[1].title.startswith("All clear")
    assert alerts[0].alert_id != alerts[1].alert_id


def test_clear_of_another_alarm_does_not_resolve() -> None:
    """Clearing battery-low says nothing about an occlusion: no all clear for it."""
    home = Home("P-clear-2", T0)
    alerts = run_stream(
        RulesEngine(),
        [
            home.alarm(0, PumpAlarmCode.OCCLUSION_DOWNSTREAM),
            home.clear(3, PumpAlarmCode.BATTERY_LOW),
        ],
    )
    assert [a.phase for a in alerts] == [AlertPhase.START]


def test_repeated_raise_pages_once() -> None:
    """A pump repeating the same alarm (or a redelivery) is one alert, not a page each time."""
    home = Home("P-dup-alarm", T0)
    raised = home.alarm(0, PumpAlarmCode.OCCLUSION_UPSTREAM)
    alerts = run_stream(
        RulesEngine(), [raised, raised, home.alarm(1, PumpAlarmCode.OCCLUSION_UPSTREAM)]
    )
    assert len(alerts) == 1


def test_raise_again_after_clear_is_a_new_alert() -> None:
    """Raised, cleared, raised again: two separate alerts with different dedup keys."""
    home = Home("P-again", T0)
    code = PumpAlarmCode.DOOR_OPEN
    alerts = run_stream(
        RulesEngine(), [home.alarm(0, code), home.clear(1, code), home.alarm(5, code)]
    )
    assert [a.phase for a in alerts] == [AlertPhase.START, AlertPhase.END, AlertPhase.START]
    assert alerts[2].dedup_key != alerts[0].dedup_key


def test_raise_arriving_after_its_own_clear_does_not_page() -> None:
    """Out of order: the clear (minute 3) arrives before the raise (minute 1): already over."""
    home = Home("P-ooo-alarm", T0)
    code = PumpAlarmCode.AIR_IN_LINE
    raised = home.alarm(1, code)
    cleared = home.clear(3, code)
    assert run_stream(RulesEngine(), [cleared, raised]) == []


def test_stopped_pump_inhibits_its_reservoir_low_alarm() -> None:
    """Reservoir low on a stopped pump does not page (the interruption clock speaks); the same
    alarm on a running pump does."""
    home = Home("P-inhibit-1", T0)
    stopped = run_stream(
        RulesEngine(),
        [home.status(0, state=PumpState.STOPPED), home.alarm(1, PumpAlarmCode.RESERVOIR_LOW)],
    )
    assert "pump_reservoir_low" not in {a.code for a in stopped}
    home = Home("P-inhibit-2", T0)
    running = run_stream(
        RulesEngine(), [home.status(0), home.alarm(1, PumpAlarmCode.RESERVOIR_LOW)]
    )
    assert [a.code for a in running] == ["pump_reservoir_low"]


def test_paused_event_inhibits_too_and_does_not_inhibit_an_occlusion() -> None:
    """A pause event inhibits reservoir low but never a high-priority stopping alarm."""
    home = Home("P-inhibit-3", T0)
    alerts = run_stream(
        RulesEngine(),
        [
            home.status(0),
            home.pump_event(1, PumpEventKind.INFUSION_PAUSED),
            home.alarm(2, PumpAlarmCode.RESERVOIR_LOW),
            home.alarm(3, PumpAlarmCode.OCCLUSION_UPSTREAM),
        ],
    )
    assert [a.code for a in alerts] == ["pump_occlusion_upstream"]


def test_alarm_priorities_follow_the_protocol() -> None:
    """A protocol that maps battery low to high pages it high."""
    config = RulesConfig(
        defaults=Thresholds(pump_alarm_priorities={"battery_low": AlertPriority.HIGH})
    )
    home = Home("P-proto-alarm", T0)
    alerts = run_stream(RulesEngine(config), [home.alarm(0, PumpAlarmCode.BATTERY_LOW)])
    assert [a.priority for a in alerts] == [AlertPriority.HIGH]
