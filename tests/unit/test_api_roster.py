"""The roster's rows and their order: facts and their ages, never a judgement of the rules'."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.api.domain.roster import (
    BoundDevice,
    OpenAlert,
    PatientFacts,
    age_text,
    infusion_day,
    roster,
    roster_row,
)

NOW = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)


def facts(patient_id: str = "P-1", **kw: object) -> PatientFacts:
    base: dict[str, object] = {
        "patient_id": patient_id,
        "care_team_id": "team",
        "care_team_name": "Oncology",
        "timezone": "Europe/Berlin",
    }
    base.update(kw)
    return PatientFacts(**base)  # type: ignore[arg-type]


def alert(priority: str, minutes_ago: int, acked_by: str | None = None) -> OpenAlert:
    return OpenAlert(
        f"k-{priority}-{minutes_ago}",
        "Alert",
        priority,
        NOW - timedelta(minutes=minutes_ago),
        acked_by,
    )


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (timedelta(seconds=59), "just now"),
        (timedelta(seconds=60), "1 min ago"),
        (timedelta(minutes=59, seconds=59), "59 min ago"),
        (timedelta(hours=1), "1 h ago"),
        (timedelta(hours=3, minutes=12), "3 h 12 min ago"),
        (timedelta(days=2, hours=4, minutes=5), "2 d 4 h ago"),
        (timedelta(seconds=-5), "ahead of now"),
    ],
)
def test_ages(age: timedelta, text: str) -> None:
    assert age_text(age) == text


def test_infusion_day_at_and_around_its_edges() -> None:
    start = NOW - timedelta(days=1)
    assert infusion_day(None, NOW) is None
    assert infusion_day(NOW + timedelta(seconds=1), NOW) is None  # the cycle has not begun
    assert infusion_day(NOW, NOW) == 1
    assert infusion_day(start + timedelta(seconds=1), NOW) == 1  # one second short of 24 h
    assert infusion_day(start, NOW) == 2  # 24 h exactly: day 2 begins
    assert (
        roster_row(facts(cycle_start=NOW - timedelta(days=27, hours=1)), NOW).infusion_day_text
        == "day 28 of 28"
    )
    assert (
        roster_row(facts(cycle_start=NOW - timedelta(days=28)), NOW).infusion_day_text
        == "day 29 (past 28)"
    )
    assert roster_row(facts(), NOW).infusion_day_text == "no cycle start recorded"


def test_a_running_pump_predicts_its_bag_empty_on_its_own_clock() -> None:
    reported = NOW - timedelta(minutes=10)
    row = roster_row(
        facts(pump_state="running", pump_at=reported, rate_ml_h=10.0, volume_remaining_ml=25.0),
        NOW,
    )
    assert row.bag_empty_at == reported + timedelta(hours=2.5)
    assert row.bag_text == "25 mL at 10 mL/h, empty about 10 Mar 05:20 (Europe/Berlin)"
    assert row.pump_text == "running, reported 10 min ago"


def test_a_stopped_pump_has_no_empty_time_and_says_when_it_last_ran() -> None:
    row = roster_row(
        facts(
            pump_state="stopped",
            pump_at=NOW - timedelta(minutes=2),
            rate_ml_h=0.0,
            volume_remaining_ml=25.0,
            pump_running_at=NOW - timedelta(minutes=40),
            battery_pct=81.0,
        ),
        NOW,
    )
    assert row.bag_empty_at is None
    assert row.bag_text == "25 mL, not running: no empty time"
    assert row.pump_last_running_at == NOW - timedelta(minutes=40)
    assert row.pump_text == (
        "stopped, reported 2 min ago; last running at 10 Mar 02:20 (Europe/Berlin); battery 81 %"
    )
    assert roster_row(facts(), NOW).pump_text == "no pump report"


def test_a_row_states_facts_not_judgements() -> None:
    row = roster_row(
        facts(
            temperature_c=39.1,
            temperature_at=NOW - timedelta(minutes=7),
            temperature_site="axillary",
            devices=(
                BoundDevice("T-1", "thermometer", NOW - timedelta(hours=5)),
                BoundDevice("X-1", "pump", None),
            ),
        ),
        NOW,
    )
    assert row.temperature_text == "39.1 °C (axillary), 7 min ago"
    assert row.devices_text == ("thermometer T-1: last seen 5 h ago", "pump X-1: never heard from")
    words = " ".join([row.temperature_text, *row.devices_text]).lower()
    assert "fever" not in words and "silent" not in words
    assert roster_row(facts(), NOW).devices_text == ("no device bound",)
    assert roster_row(facts(), NOW).temperature_text == "no reading"


def test_urgency_order() -> None:
    patients = [
        facts("P-quiet"),
        facts("P-stopped", pump_state="stopped", pump_at=NOW),
        facts("P-acked-high", alerts=(alert("high", 50, "nurse"),)),
        facts("P-medium", alerts=(alert("medium", 5),)),
        facts("P-high-new", alerts=(alert("high", 3),)),
        facts("P-high-old", alerts=(alert("high", 30), alert("low", 1))),
        facts("P-running", pump_state="running", pump_at=NOW),
    ]
    order = [r.patient_id for r in roster(patients, NOW)]
    assert order == [
        "P-high-old",  # unacknowledged high, open longest
        "P-high-new",
        "P-medium",
        "P-acked-high",  # acknowledged: someone is on it
        "P-stopped",  # no alert, but the pump is not running
        "P-quiet",
        "P-running",
    ]
    row = roster_row(patients[5], NOW)
    assert row.alerts_text == "2 open, 2 not acknowledged"
    assert [a.priority for a in row.alerts] == ["high", "low"]
    assert roster_row(patients[2], NOW).alerts_text == "1 open"
    assert roster_row(patients[0], NOW).alerts_text == "none open"


def test_other_sorts() -> None:
    patients = [
        facts("P-b", cycle_start=NOW - timedelta(days=3)),
        facts(
            "P-a",
            cycle_start=NOW - timedelta(days=10),
            pump_state="running",
            pump_at=NOW,
            rate_ml_h=10.0,
            volume_remaining_ml=50.0,
        ),
        facts("P-c", pump_state="running", pump_at=NOW, rate_ml_h=10.0, volume_remaining_ml=5.0),
    ]
    assert [r.patient_id for r in roster(patients, NOW, "patient")] == ["P-a", "P-b", "P-c"]
    assert [r.patient_id for r in roster(patients, NOW, "day")] == ["P-a", "P-b", "P-c"]
    assert [r.patient_id for r in roster(patients, NOW, "bag")] == ["P-c", "P-a", "P-b"]
    with pytest.raises(ValueError, match="unknown sort"):
        roster(patients, NOW, "name")


def test_a_row_names_its_teams_centre() -> None:
    row = roster_row(facts(care_team_centre="Valley general"), NOW)
    assert (row.care_team_name, row.care_team_centre) == ("Oncology", "Valley general")
    assert roster_row(facts(), NOW).care_team_centre is None  # a team in no centre
