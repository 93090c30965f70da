"""Regional cover's windows, grants and who is paged (services/notify/domain/cover.py): before,
during and after a window, across midnight and the clock changes, exception dates, revoked
agreements and two agreements at once."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfoNotFoundError

import pytest

from services.notify.domain.cover import (
    Agreement,
    CoverHours,
    grants,
    paged_team,
    window_at,
)

PARIS = "Europe/Paris"
NIGHTS = CoverHours(PARIS, frozenset(range(7)), time(20, 0), time(8, 0))


def paris(text: str) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(PARIS))


def agreement(hours: CoverHours = NIGHTS, **changes: object) -> Agreement:
    fields: dict[str, object] = {
        "agreement_id": "ag-1",
        "version": 2,
        "covering_team_id": "big",
        "covered_team_id": "small",
        "hours": hours,
        "signed_off_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    fields.update(changes)
    return Agreement(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("local", "covered"),
    [
        ("2026-12-07 19:59:59", False),  # before the window
        ("2026-12-07 20:00:00", True),  # its first second
        ("2026-12-08 02:00:00", True),  # after midnight, in the window started the day before
        ("2026-12-08 07:59:59", True),
        ("2026-12-08 08:00:00", False),  # the end is outside
        ("2026-12-08 10:00:00", False),  # the day
    ],
)
def test_a_night_window_runs_across_midnight(local: str, covered: bool) -> None:
    assert (window_at(NIGHTS, paris(local)) is not None) is covered


def test_the_window_found_is_the_night_that_started_the_evening_before() -> None:
    window = window_at(NIGHTS, paris("2026-12-08 02:00:00"))
    assert window is not None
    assert window.local_date == date(2026, 12, 7)
    assert window.starts == paris("2026-12-07 20:00:00")
    assert window.ends == paris("2026-12-08 08:00:00")


def test_days_name_the_evening_a_window_starts() -> None:
    """Friday night cover (starts Friday 20:00) covers 02:00 on Saturday, not on Friday."""
    fridays = CoverHours(PARIS, frozenset({4}), time(20, 0), time(8, 0))
    assert window_at(fridays, paris("2026-12-12 02:00:00")) is not None  # Saturday 02:00
    assert window_at(fridays, paris("2026-12-11 02:00:00")) is None  # Friday 02:00
    assert window_at(fridays, paris("2026-12-13 02:00:00")) is None  # Sunday 02:00


def test_an_exception_date_starts_no_window() -> None:
    hours = CoverHours(
        PARIS, frozenset(range(7)), time(20, 0), time(8, 0), frozenset({date(2026, 12, 24)})
    )
    assert window_at(hours, paris("2026-12-25 02:00:00")) is None  # the night of the 24th
    assert window_at(hours, paris("2026-12-24 02:00:00")) is not None  # the night of the 23rd
    assert window_at(hours, paris("2026-12-26 02:00:00")) is not None


def test_the_spring_change_makes_the_night_an_hour_shorter() -> None:
    window = window_at(NIGHTS, paris("2026-03-29 05:00:00"))
    assert window is not None
    assert (window.ends - window.starts).total_seconds() == 11 * 3600


def test_the_autumn_change_makes_the_night_an_hour_longer() -> None:
    window = window_at(NIGHTS, paris("2026-10-25 05:00:00"))
    assert window is not None
    assert (window.ends - window.starts).total_seconds() == 13 * 3600
    # The repeated hour is covered both times.
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET
    assert window_at(NIGHTS, first) == window_at(NIGHTS, second) == window


def test_a_start_in_the_skipped_hour_is_read_with_the_offset_before_the_change() -> None:
    hours = CoverHours(PARIS, frozenset(range(7)), time(2, 30), time(6, 0))
    window = window_at(hours, paris("2026-03-29 05:00:00"))
    assert window is not None
    assert window.starts == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 03:30 CEST


def test_same_start_and_end_is_a_whole_day() -> None:
    hours = CoverHours("UTC", frozenset({0}), time(0, 0), time(0, 0))
    assert window_at(hours, datetime(2026, 12, 7, 23, 59, tzinfo=UTC)) is not None
    assert window_at(hours, datetime(2026, 12, 8, 0, 0, tzinfo=UTC)) is None


def test_hours_are_checked() -> None:
    with pytest.raises(ValueError):
        CoverHours(PARIS, frozenset(), time(20), time(8))
    with pytest.raises(ValueError):
        CoverHours(PARIS, frozenset({7}), time(20), time(8))
    with pytest.raises(ZoneInfoNotFoundError):
        CoverHours("Nowhere/Atlantis", frozenset({1}), time(20), time(8))
    with pytest.raises(ValueError):
        window_at(NIGHTS, datetime(2026, 12, 8, 2, 0).replace(tzinfo=None))  # noqa: DTZ001


def test_the_covering_team_is_paged_during_the_window_and_the_home_team_outside() -> None:
    night = paged_team("small", [agreement()], paris("2026-12-08 02:00:00"))
    assert night.care_team_id == "big" and night.covered_team_id == "small"
    assert night.covering and night.agreement_id == "ag-1" and night.version == 2
    assert night.window_ends == paris("2026-12-08 08:00:00")
    for local in ("2026-12-07 19:00:00", "2026-12-08 10:00:00"):
        day = paged_team("small", [agreement()], paris(local))
        assert day.care_team_id == "small" and not day.covering
    other = paged_team("elsewhere", [agreement()], paris("2026-12-08 02:00:00"))
    assert other.care_team_id == "elsewhere" and not other.covering


def test_a_revoked_agreement_pages_and_grants_nothing() -> None:
    revoked = agreement(revoked=True)
    at = paris("2026-12-08 02:00:00")
    assert not paged_team("small", [revoked], at).covering
    assert grants(frozenset({"big"}), [revoked], at) == []


def test_two_agreements_at_once_the_one_signed_off_first_acts() -> None:
    first = agreement(agreement_id="ag-2", covering_team_id="first")
    later = agreement(
        agreement_id="ag-0",
        covering_team_id="later",
        signed_off_at=datetime(2026, 6, 1, tzinfo=UTC),
    )
    assert paged_team("small", [later, first], paris("2026-12-08 02:00:00")).care_team_id == "first"


def test_grants_go_to_the_covering_team_only_during_the_window() -> None:
    during = grants(frozenset({"big"}), [agreement()], paris("2026-12-08 02:00:00"))
    assert [(g.covered_team_id, g.agreement_id, g.version) for g in during] == [
        ("small", "ag-1", 2)
    ]
    assert during[0].ends == paris("2026-12-08 08:00:00")
    assert grants(frozenset({"big"}), [agreement()], paris("2026-12-08 08:00:00")) == []
    # The covered team's own users and third teams get nothing from it.
    assert grants(frozenset({"small"}), [agreement()], paris("2026-12-08 02:00:00")) == []
    assert grants(frozenset({"third"}), [agreement()], paris("2026-12-08 02:00:00")) == []


def test_the_last_window_is_the_night_that_ended_before() -> None:
    from services.notify.domain.cover import last_window

    morning = last_window(NIGHTS, paris("2026-12-08 09:00:00"))
    assert morning is not None and morning.local_date == date(2026, 12, 7)
    # During a window, the one before it.
    night = last_window(NIGHTS, paris("2026-12-08 02:00:00"))
    assert night is not None and night.local_date == date(2026, 12, 6)
    # The end itself counts as ended.
    assert last_window(NIGHTS, paris("2026-12-08 08:00:00")) == morning
    fridays = CoverHours(PARIS, frozenset({4}), time(20, 0), time(8, 0))
    monday = last_window(fridays, paris("2026-12-14 09:00:00"))
    assert monday is not None and monday.local_date == date(2026, 12, 11)
