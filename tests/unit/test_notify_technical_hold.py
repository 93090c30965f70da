"""The technical hold and the all clear at night: pure decisions (docs/notify.md)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest

from schemas.events import AlertKind, AlertPriority
from services.notify.domain.quiet_hours import QuietHours, all_clear_deferred_until
from services.notify.domain.technical_hold import (
    DEFAULT_SILENCE_HOLD_S,
    DEFAULT_TECHNICAL_HOLD_S,
    hold_seconds,
    technical_hold_until,
)

AT = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)  # 03:00 in Berlin
NIGHT = QuietHours(timezone="Europe/Berlin", start=time(22, 0), end=time(7, 0))
NIGHT_START = datetime(2025, 2, 28, 21, 0, tzinfo=UTC)  # 22:00 CET
NIGHT_END = datetime(2025, 3, 1, 6, 0, tzinfo=UTC)  # 07:00 CET


@pytest.mark.parametrize("priority", [AlertPriority.MEDIUM, AlertPriority.LOW, AlertPriority.INFO])
def test_technical_medium_low_info_are_held_for_the_hold(priority: AlertPriority) -> None:
    assert technical_hold_until(AlertKind.TECHNICAL, priority, AT, 300) == AT + timedelta(
        seconds=300
    )


@pytest.mark.parametrize("priority", list(AlertPriority))
def test_physiological_alerts_are_never_held(priority: AlertPriority) -> None:
    assert technical_hold_until(AlertKind.PHYSIOLOGICAL, priority, AT, 300) is None


def test_high_technical_alert_is_never_held_and_a_zero_hold_holds_nothing() -> None:
    assert technical_hold_until(AlertKind.TECHNICAL, AlertPriority.HIGH, AT, 3600) is None
    assert technical_hold_until(AlertKind.TECHNICAL, AlertPriority.MEDIUM, AT, 0) is None


def test_technical_hold_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError):
        technical_hold_until(
            AlertKind.TECHNICAL, AlertPriority.MEDIUM, AT.replace(tzinfo=None), 300
        )


def test_a_device_silence_waits_the_silence_hold_other_rules_the_technical_hold() -> None:
    """A hub dropout forwards its buffer within the hour: a device silence waits the silence
    hold (45 min by default: a pump unheard for 60 min pages); a sensor fault, a data loss or a
    pump alarm keep the 5-min technical hold."""
    silence = hold_seconds("device_silent", DEFAULT_TECHNICAL_HOLD_S, DEFAULT_SILENCE_HOLD_S)
    assert silence == 2700.0
    for rule in ("sensor_fault", "data_lost", "pump_alarm", "bag_clock"):
        assert hold_seconds(rule, DEFAULT_TECHNICAL_HOLD_S, DEFAULT_SILENCE_HOLD_S) == 300.0
    until = technical_hold_until(AlertKind.TECHNICAL, AlertPriority.MEDIUM, AT, silence)
    assert until == AT + timedelta(minutes=45)


def test_the_silence_hold_is_never_shorter_than_the_technical_hold_and_off_with_it() -> None:
    """Edges: a silence hold under the technical hold (or 0) gives the technical hold; a
    technical hold of 0 turns both off, so a silence pages at once; a HIGH silence is never
    held whatever the hold."""
    assert hold_seconds("device_silent", 300, 120) == 300
    assert hold_seconds("device_silent", 300, 0) == 300
    assert hold_seconds("device_silent", 0, 2700) == 0
    assert technical_hold_until(AlertKind.TECHNICAL, AlertPriority.MEDIUM, AT, 0) is None
    assert technical_hold_until(AlertKind.TECHNICAL, AlertPriority.HIGH, AT, 2700) is None


def test_all_clear_at_night_waits_for_morning_when_the_alarm_paged_before_the_night() -> None:
    paged = NIGHT_START - timedelta(minutes=30)
    assert all_clear_deferred_until(AlertPriority.MEDIUM, NIGHT, AT, paged) == NIGHT_END
    assert all_clear_deferred_until(AlertPriority.LOW, NIGHT, AT, None) == NIGHT_END


def test_all_clear_at_night_goes_at_once_to_whoever_the_alarm_woke() -> None:
    # Paged at the first instant of the quiet hours (edge) or later: woken, told at once.
    assert all_clear_deferred_until(AlertPriority.MEDIUM, NIGHT, AT, NIGHT_START) is None
    paged_just_before = NIGHT_START - timedelta(seconds=1)
    assert all_clear_deferred_until(AlertPriority.MEDIUM, NIGHT, AT, paged_just_before) == (
        NIGHT_END
    )


def test_all_clear_of_a_high_alarm_or_outside_quiet_hours_goes_at_once() -> None:
    assert all_clear_deferred_until(AlertPriority.HIGH, NIGHT, AT, None) is None
    assert all_clear_deferred_until(AlertPriority.MEDIUM, None, AT, None) is None
    # 07:00 Berlin is outside the half-open window: sent at once (edge).
    assert all_clear_deferred_until(AlertPriority.MEDIUM, NIGHT, NIGHT_END, None) is None
