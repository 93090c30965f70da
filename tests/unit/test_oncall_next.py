"""Who is on call next (``services.notify.domain.schedule.next_change``) and the care-team API's
view of it (``services.api.domain.oncall``): hand-offs in the rotation's zone, overrides,
daylight-saving changes, a rotation nobody else takes over, references outside the team."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from services.api.domain.oncall import shift, team_zone, unknown_refs
from services.notify.domain.schedule import Override, Rotation, next_change

BERLIN = "Europe/Berlin"


def rotation(**changes: object) -> Rotation:
    fields: dict[str, object] = {
        "schedule_id": "s1",
        "timezone": BERLIN,
        "start_date": date(2025, 1, 1),
        "handoff_time": time(8, 0),
        "shift_days": 1,
        "participants": ("ana", "ben"),
    }
    fields.update(changes)
    return Rotation(**fields)  # type: ignore[arg-type]


def test_next_is_the_next_handoff_in_the_rotations_zone() -> None:
    # 2025-01-02 07:00 UTC is 08:00 CET: ana's day (day 0) ended then, ben's began.
    at = datetime(2025, 1, 2, 6, 0, tzinfo=UTC)  # 07:00 CET, ana still on
    assert next_change(rotation(), at) == (datetime(2025, 1, 2, 7, 0, tzinfo=UTC), "ben")


def test_a_handoff_keeps_its_local_time_across_daylight_saving() -> None:
    # Summer time began 2025-03-30: the 08:00 hand-off is 06:00 UTC from then on.
    at = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)
    when, _ = next_change(rotation(), at) or (None, None)
    assert when == datetime(2025, 3, 31, 6, 0, tzinfo=UTC)


def test_multi_day_shifts_change_only_at_the_end_of_the_shift() -> None:
    at = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)  # ana's first of three days
    assert next_change(rotation(shift_days=3), at) == (
        datetime(2025, 1, 4, 7, 0, tzinfo=UTC),
        "ben",
    )


def test_an_override_ahead_is_the_next_change_and_its_end_the_one_after() -> None:
    cover = Override(
        "cara",
        datetime(2025, 1, 1, 12, 0, tzinfo=UTC),
        datetime(2025, 1, 1, 18, 0, tzinfo=UTC),
    )
    r = rotation(overrides=(cover,))
    assert next_change(r, datetime(2025, 1, 1, 9, 0, tzinfo=UTC)) == (cover.starts_at, "cara")
    assert next_change(r, datetime(2025, 1, 1, 13, 0, tzinfo=UTC)) == (cover.ends_at, "ana")


def test_an_override_by_whoever_is_on_anyway_is_no_change() -> None:
    same = Override(
        "ana", datetime(2025, 1, 1, 12, 0, tzinfo=UTC), datetime(2025, 1, 1, 18, 0, tzinfo=UTC)
    )
    at = datetime(2025, 1, 1, 9, 0, tzinfo=UTC)
    assert next_change(rotation(overrides=(same,)), at) == (
        datetime(2025, 1, 2, 7, 0, tzinfo=UTC),
        "ben",
    )


def test_a_lone_participant_is_never_relieved_unless_an_override_comes() -> None:
    at = datetime(2025, 1, 5, 9, 0, tzinfo=UTC)
    assert next_change(rotation(participants=("ana",)), at) is None
    later = Override(
        "ben", datetime(2025, 3, 1, 0, 0, tzinfo=UTC), datetime(2025, 3, 2, 0, 0, tzinfo=UTC)
    )
    assert next_change(rotation(participants=("ana",), overrides=(later,)), at) == (
        later.starts_at,
        "ben",
    )


def test_before_the_rotation_starts_the_next_is_its_first_handoff() -> None:
    at = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert next_change(rotation(), at) == (datetime(2025, 1, 1, 7, 0, tzinfo=UTC), "ana")


def test_a_naive_instant_is_refused() -> None:
    with pytest.raises(ValueError):
        next_change(rotation(), datetime(2025, 1, 1, 12, 0))  # noqa: DTZ001


def test_references_outside_the_team_are_named_and_email_is_free() -> None:
    targets = [
        ("person", "ana"),
        ("person", "mallory"),
        ("schedule", "s1"),
        ("schedule", "other-team"),
        ("email", "ward@example.org"),
    ]
    assert unknown_refs(targets, ["ana", "ben"], ["s1"]) == [
        "person:mallory",
        "schedule:other-team",
    ]


def test_the_shift_is_given_in_the_teams_zone_with_the_zone_named() -> None:
    view = shift(
        "s1",
        "Nights",
        "ana",
        datetime(2025, 1, 2, 7, 0, tzinfo=UTC),
        "ben",
        BERLIN,
        {"ana": "Ana A.", "ben": "Ben B."},
    )
    assert view.until is not None and view.until.isoformat() == "2025-01-02T08:00:00+01:00"
    # The text is the API's usual local time (domain/clocks.py), zone named.
    assert view.until_local is not None
    assert "08:00" in view.until_local and "Europe/Berlin" in view.until_local
    assert (view.person_name, view.next_person_id, view.next_person_name) == (
        "Ana A.",
        "ben",
        "Ben B.",
    )


def test_nobody_next_leaves_the_handover_empty() -> None:
    view = shift("s1", "Days", "ana", None, None, "UTC", {"ana": "Ana A."})
    assert (view.until, view.until_local, view.next_person_id) == (None, None, None)


def test_an_unknown_or_unset_team_zone_is_utc() -> None:
    assert team_zone(None) == "UTC"
    assert team_zone("Mars/Olympus") == "UTC"
    assert team_zone(BERLIN) == BERLIN
