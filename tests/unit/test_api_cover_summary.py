"""The morning summary of a night of cover (services/api/domain/cover_summary.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.api.domain.cover_summary import NightAlert, summarise

STARTS = datetime(2026, 12, 7, 19, tzinfo=UTC)
ENDS = STARTS + timedelta(hours=12)


def alert(key: str, patient: str, opened: datetime, **fields: object) -> NightAlert:
    return NightAlert(key, patient, "FEVER", "Fever 38.6 °C", opened, "big", **fields)  # type: ignore[arg-type]


def test_the_night_per_patient_with_who_acknowledged_and_what_was_handed_back() -> None:
    at_two = STARTS + timedelta(hours=7)
    summary = summarise(
        STARTS,
        ENDS,
        [
            alert(
                "b:fever",
                "P-B",
                at_two,
                acknowledged_by="big-nurse",
                acknowledged_at=at_two + timedelta(minutes=4),
                resolved_at=at_two + timedelta(hours=1),
                events=((at_two, "paged"), (at_two + timedelta(minutes=4), "acknowledged")),
            ),
            alert("a:pump", "P-A", at_two + timedelta(hours=4)),
            alert("a:early", "P-A", STARTS + timedelta(hours=1)),
            alert("before", "P-A", STARTS - timedelta(seconds=1)),  # the evening: not the night
            alert("after", "P-C", ENDS),  # the morning: not the night
        ],
    )
    assert [p.patient_id for p in summary] == ["P-A", "P-B"]
    a, b = summary
    assert [x.dedup_key for x in a.alerts] == ["a:early", "a:pump"]
    assert a.handed_back == 2 and b.handed_back == 0
    assert b.alerts[0].acknowledged_by == "big-nurse"
    assert [kind for _, kind in b.alerts[0].done] == ["paged", "acknowledged"]


def test_what_happened_after_the_window_is_not_told_as_overnight() -> None:
    at_seven = ENDS - timedelta(hours=1)
    late = alert(
        "k",
        "P",
        at_seven,
        acknowledged_by="small-nurse",
        acknowledged_at=ENDS + timedelta(minutes=5),
        resolved_at=ENDS + timedelta(hours=1),
        events=((at_seven, "paged"), (ENDS + timedelta(minutes=5), "acknowledged")),
    )
    (patient,) = summarise(STARTS, ENDS, [late])
    (summary,) = patient.alerts
    assert summary.acknowledged_by is None and summary.resolved_at is None
    assert summary.open_at_handback
    assert [kind for _, kind in summary.done] == ["paged"]
