"""The whole-course window (defaults, hours, the 28-day cap), a °F reading's words, and the
course plot's geometry: pure functions the API and the patient page share."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.api.domain.course import CourseWindow, course_window, floor_hour, reading_text
from services.api.entrypoints.http.dashboard import course_plot

NOW = datetime(2025, 3, 10, 14, 37, 12, tzinfo=UTC)
HOUR = NOW.replace(minute=0, second=0)


def test_default_is_the_current_cycle_start_on_its_hour() -> None:
    window = course_window(NOW, requested=None, cycle_start=NOW - timedelta(days=3, minutes=50))
    assert window == CourseWindow(
        datetime(2025, 3, 7, 13, 0, tzinfo=UTC), NOW, "cycle_start", capped=False
    )


def test_without_a_cycle_or_with_only_a_future_one_it_is_28_days_back() -> None:
    for cycle_start in (None, NOW + timedelta(days=2)):
        window = course_window(NOW, requested=None, cycle_start=cycle_start)
        assert window.since == HOUR - timedelta(days=28)
        assert window.basis == "course_length" and window.capped is False


def test_a_start_older_than_28_days_is_capped_to_672_hours_and_the_current_one() -> None:
    for requested, cycle in ((NOW - timedelta(days=40), None), (None, NOW - timedelta(days=30))):
        window = course_window(NOW, requested=requested, cycle_start=cycle)
        assert window.since == HOUR - timedelta(hours=672) and window.capped is True
    # Exactly 28 days before the current hour is not capped; the oldest extreme does not
    # overflow.
    edge = course_window(NOW, requested=HOUR - timedelta(days=28), cycle_start=None)
    assert edge.since == HOUR - timedelta(days=28) and edge.capped is False
    oldest = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    assert course_window(NOW, requested=oldest, cycle_start=None).capped is True


def test_hours_are_utc_hours_even_for_a_half_hour_zone() -> None:
    """05:10 at +05:30 is 23:40 UTC: its hour starts 23:00 UTC, not 05:00 local."""
    at = datetime(2025, 3, 10, 5, 10, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert floor_hour(at) == datetime(2025, 3, 9, 23, 0, tzinfo=UTC)
    window = course_window(NOW, requested=at, cycle_start=None)
    assert window.since == datetime(2025, 3, 9, 23, 0, tzinfo=UTC) and window.basis == "requested"


def test_naive_or_future_times_are_refused() -> None:
    with pytest.raises(ValueError, match="UTC offset"):
        course_window(NOW, requested=NOW.replace(tzinfo=None), cycle_start=None)
    with pytest.raises(ValueError, match="after now"):
        course_window(NOW, requested=NOW + timedelta(minutes=1), cycle_start=None)


def test_a_fahrenheit_reading_is_shown_in_both_units() -> None:
    assert reading_text({"value_c": 38.0, "original_value": 100.4, "original_unit": "F"}) == (
        "38.0 °C (100.4 °F as sent)"
    )
    assert reading_text({"value_c": 37.25, "original_value": 37.25, "original_unit": "C"}) == (
        "37.2 °C"
    )


def _hour(at: datetime, low: float, high: float) -> dict[str, object]:
    return {"bucket": at, "readings": 12, "min_c": low, "max_c": high, "mean_c": (low + high) / 2}


def test_course_plot_draws_one_bar_per_hour_and_breaks_the_mean_at_gaps() -> None:
    window = course_window(NOW, requested=None, cycle_start=HOUR - timedelta(days=2))
    hours = [
        _hour(HOUR - timedelta(days=2), 36.8, 37.2),
        _hour(HOUR - timedelta(days=2) + timedelta(hours=1), 37.0, 38.9),
        # a gap of five hours without readings
        _hour(HOUR - timedelta(days=1, hours=18), 36.5, 37.0),
        _hour(HOUR - timedelta(days=1, hours=17), 36.6, 37.1),
        _hour(HOUR - timedelta(days=1, hours=16), 36.7, 37.3),
    ]
    plot = course_plot(hours, window, {"single": 38.3, "sustained": 38.0})
    assert len(plot["bars"]) == 5
    assert [len(m.split()) for m in plot["means"]] == [2, 3]
    first, second = plot["bars"][0], plot["bars"][1]
    assert first["x"] == pytest.approx(plot["pad"])  # the window starts at the first hour
    assert second["x"] > first["x"]
    assert second["height"] > first["height"]  # 37.0-38.9 spans more than 36.8-37.2
    single = next(line for line in plot["lines"] if line["name"] == "single")
    assert second["y"] < single["y"] < first["y"]  # the 38.9 top is above the 38.3 line
    assert [d["label"] for d in plot["days"]] == ["day 1"]


def test_course_plot_without_a_cycle_counts_days_back() -> None:
    window = course_window(NOW, requested=None, cycle_start=None)
    plot = course_plot([], window, {"single": 38.3})
    assert [d["label"] for d in plot["days"]] == ["now", "-7d", "-14d", "-21d", "-28d"]
    assert plot["bars"] == [] and plot["means"] == []
