"""The outage summary, composed from in-memory data: outage window + episodes -> text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import AlertPriority
from services.notify.domain.message import clock_time
from services.notify.domain.outage import Episode, OutageWindow, compose_summary, should_hold

T0 = datetime(2025, 1, 15, 1, 0, tzinfo=UTC)
WINDOW = OutageWindow(T0, T0 + timedelta(minutes=40))
NOW = T0 + timedelta(minutes=43)
ZONE = "Europe/Berlin"


def _episode(
    patient: str, title: str, began: float, ended: float | None = None, **kw: object
) -> Episode:
    return Episode(
        patient_id=patient,
        dedup_key=f"{patient}:{title}",
        title=title,
        priority=kw.pop("priority", AlertPriority.MEDIUM),  # type: ignore[arg-type]
        began_at=T0 + timedelta(minutes=began),
        ended_at=None if ended is None else T0 + timedelta(minutes=ended),
        **kw,  # type: ignore[arg-type]
    )


def test_summary_reports_ended_episodes_once_and_lists_open_ones_as_needing_action() -> None:
    summary = compose_summary(
        WINDOW,
        team_name="Onc",
        zone=ZONE,
        patients=("P1", "P2", "P3"),
        during=(
            _episode("P1", "Infusion interrupted", 10, 25),
            _episode("P2", "Fever 38.9 °C", 30, priority=AlertPriority.HIGH, paged=True),
        ),
        composed_at=NOW,
    )
    start, end = clock_time(T0, ZONE), clock_time(WINDOW.ended_at, ZONE)
    assert f"Vigil was not watching from {start} to {end} (about 40 min)" in summary.body
    assert "CET (Europe/Berlin)" in start
    assert (
        f"Infusion interrupted: began {clock_time(T0 + timedelta(minutes=10), ZONE)}, ended "
        f"{clock_time(T0 + timedelta(minutes=25), ZONE)} (not paged: reported here only)"
        in summary.body
    )
    assert "Fever 38.9 °C: STILL OPEN since" in summary.body and "paged separately" in summary.body
    assert "No alarms: P3." in summary.body
    needs = summary.body.split("Needs action now:")[1]
    assert "Patient P2: Fever 38.9 °C" in needs and "Infusion interrupted" not in needs
    assert summary.needs_action == 1 and summary.during == 2
    assert summary.subject.endswith("2 alarms, 1 needs action")
    assert f"Status as of {clock_time(NOW, ZONE)}" in summary.body
    assert "02:00 CET-02:40 CET" in summary.short_text and "1 already ended" in summary.short_text


def test_summary_with_nothing_to_report_says_so() -> None:
    summary = compose_summary(
        WINDOW, team_name="Onc", zone="UTC", patients=("P1",), during=(), composed_at=NOW
    )
    assert "No alarms for any patient of this team." in summary.body
    assert "Nothing from this account." in summary.body
    assert summary.subject.endswith(": no alarms") and summary.needs_action == 0
    assert "UTC" in summary.subject


def test_only_episodes_inside_the_window_are_reported_and_acknowledged_ones_need_no_action() -> (
    None
):
    summary = compose_summary(
        WINDOW,
        team_name="Onc",
        zone="UTC",
        patients=("P1",),
        during=(
            _episode("P1", "Before", -5),  # began before the outage: not "during"
            _episode("P1", "Inside", 5, acknowledged_by="person:n1", paged=True),
        ),
        open_before=(_episode("P1", "Older alarm", -60, paged=True),),
        composed_at=NOW,
    )
    assert "Before" not in summary.body.split("Needs action now:")[0]
    assert (
        "Inside: STILL OPEN since" in summary.body and "acknowledged by person:n1" in summary.body
    )
    needs = summary.body.split("Needs action now:")[1]
    assert "Older alarm" in needs and "Inside" not in needs


def test_high_is_never_held_and_naive_times_are_refused() -> None:
    assert not should_hold(AlertPriority.HIGH)
    assert should_hold(AlertPriority.MEDIUM) and should_hold(AlertPriority.LOW)
    with pytest.raises(ValueError):
        OutageWindow(datetime(2025, 1, 1), T0)  # noqa: DTZ001
    with pytest.raises(ValueError):
        compose_summary(
            WINDOW,
            team_name="x",
            zone="UTC",
            patients=(),
            during=(),
            composed_at=datetime(2025, 1, 1),  # noqa: DTZ001
        )
