"""The morning summary of a night of cover (services/notify/domain/cover_summary.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.notify.domain.cover import CoverHours
from services.notify.domain.cover_summary import (
    CoverNight,
    NightToTell,
    Revocation,
    SummaryMail,
    compose_summary_mail,
    nights_to_tell,
    summary_key,
)
from services.notify.public import NightAlert, summarise

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


# -- the e-mail to the covered team -------------------------------------------------------------

PARIS_NIGHT = CoverNight(
    agreement_id="7f0c2d3e-0000-4000-8000-000000000001",
    version=3,
    covering_team_id="big",
    covered_team_id="small",
    timezone="Europe/Paris",
    starts=STARTS,  # 20:00 CET
    ends=ENDS,  # 08:00 CET
)
NAMES = {"big": "Regional oncology", "small": "Partner ward"}


def mail(alerts: list[NightAlert]) -> SummaryMail:
    return compose_summary_mail(
        PARIS_NIGHT,
        summarise(STARTS, ENDS, alerts),
        team_names=NAMES,
        covering_centre="City hospital",
        dashboard_path="/roster",
    )


def test_the_mail_tells_each_patients_night_in_the_agreements_zone() -> None:
    at_two = STARTS + timedelta(hours=6)  # 02:00 CET
    acked = alert(
        "b:fever",
        "P-B",
        at_two,
        acknowledged_by="person:big-nurse",
        acknowledged_at=at_two + timedelta(minutes=4),
        events=((at_two, "paged_under_cover"), (at_two + timedelta(minutes=4), "acknowledged")),
        handed_back_at=ENDS + timedelta(seconds=1),
        repaged=False,
    )
    still_open = alert(
        "a:pump",
        "P-A",
        at_two + timedelta(hours=4),
        handed_back_at=ENDS + timedelta(seconds=1),
        repaged=True,
    )
    resolved = alert(
        "a:early", "P-A", STARTS + timedelta(hours=1), resolved_at=STARTS + timedelta(hours=2)
    )
    sent = mail([acked, still_open, resolved])
    assert (sent.patients, sent.alerts, sent.still_open) == (2, 3, 2)
    assert sent.subject == (
        "[VIGIL] Overnight cover by Regional oncology, 2026-12-07 20:00 CET (Europe/Paris) to "
        "2026-12-08 08:00 CET (Europe/Paris): 3 alerts, 2 still open at the end"
    )
    body = sent.body
    assert "Care team: Partner ward (small)" in body
    assert "Covered by: Regional oncology (big), City hospital, under cover agreement " in body
    assert f"{PARIS_NIGHT.agreement_id} version 3" in body
    # Patients by id, as the dashboard lists them, in order; each alert with its story.
    assert body.index("Patient P-A:") < body.index("Patient P-B:")
    assert "Resolved at 2026-12-07 22:00 CET (Europe/Paris)." in body
    assert (
        "Still open at the end of the window: handed back to Partner ward (small) at "
        "2026-12-08 08:00 CET (Europe/Paris), whose on-call was paged again." in body
    )
    assert "Acknowledged by person:big-nurse at 2026-12-08 02:04 CET (Europe/Paris)." in body
    assert "acknowledged before the hand-back, it stays with who acknowledged it" in body
    assert "Done: paged under cover 2026-12-08 02:00 CET (Europe/Paris), acknowledged" in body
    assert "paged: Regional oncology (big)'s on-call" in body
    assert "/roster" in body
    assert "quiet night" not in body


def test_a_quiet_night_is_one_line() -> None:
    sent = mail([])
    assert sent.subject.endswith(": a quiet night")
    assert "A quiet night: no alert was opened for any of your patients in the window." in sent.body
    assert "Patient" not in sent.body
    assert (sent.patients, sent.alerts, sent.still_open) == (0, 0, 0)


def test_an_alert_not_yet_handed_back_is_not_said_to_be() -> None:
    body = mail([alert("k", "P", STARTS + timedelta(hours=3))]).body
    assert "Not acknowledged during the window." in body
    assert "Still open at the end of the window.\n" in body
    assert "handed back" not in body


def test_the_key_is_the_agreement_and_the_windows_end_in_utc() -> None:
    paris_end = ENDS.astimezone(ZoneInfo("Europe/Paris"))
    assert summary_key("a-1", paris_end) == summary_key("a-1", ENDS)
    assert summary_key("a-1", ENDS) == "cover-summary:a-1:2026-12-08T07:00:00+00:00"
    assert summary_key("a-1", ENDS) != summary_key("a-1", ENDS + timedelta(days=1))
    assert summary_key("a-1", ENDS) != summary_key("a-2", ENDS)
    with pytest.raises(ValueError):
        summary_key("a-1", ENDS.replace(tzinfo=None))


# -- the windows to e-mail, a revocation's among them ------------------------------------------

NIGHTLY = CoverHours("Europe/Paris", frozenset(range(7)), time(20), time(8))
SIGNED = STARTS - timedelta(days=3)


def test_the_latest_window_ended_within_the_day_is_told_once_it_has_ended() -> None:
    assert nights_to_tell(NIGHTLY, SIGNED, ENDS - timedelta(seconds=1), SIGNED) == [
        NightToTell(STARTS - timedelta(days=1), ENDS - timedelta(days=1))
    ]
    assert nights_to_tell(NIGHTLY, SIGNED, ENDS, SIGNED) == [NightToTell(STARTS, ENDS)]
    # Ended before ``since``, or under a version signed off after it ended: not this version's.
    assert nights_to_tell(NIGHTLY, SIGNED, ENDS, ENDS + timedelta(seconds=1)) == []
    assert nights_to_tell(NIGHTLY, ENDS, ENDS + timedelta(hours=1), SIGNED) == []


def test_a_window_cut_short_by_a_revocation_is_told_from_its_start_to_the_revocation() -> None:
    revoked = Revocation(STARTS + timedelta(hours=7), "small-nurse", "small", "staffed tonight")
    # Before the revocation the night is in progress: only the night before is due.
    before = nights_to_tell(NIGHTLY, SIGNED, revoked.at - timedelta(seconds=1), SIGNED, revoked)
    assert before == [NightToTell(STARTS - timedelta(days=1), ENDS - timedelta(days=1))]
    after = nights_to_tell(NIGHTLY, SIGNED, revoked.at + timedelta(minutes=1), SIGNED, revoked)
    assert after == [
        NightToTell(STARTS - timedelta(days=1), ENDS - timedelta(days=1)),
        NightToTell(STARTS, revoked.at, revoked),
    ]
    # Days later nothing more: no window of a revoked agreement ends after its revocation.
    later = revoked.at + timedelta(days=3)
    assert nights_to_tell(NIGHTLY, SIGNED, later, later - timedelta(days=1), revoked) == []


def test_a_revocation_outside_a_window_or_at_its_start_cuts_nothing_short() -> None:
    by_day = Revocation(ENDS + timedelta(hours=2))
    assert nights_to_tell(NIGHTLY, SIGNED, by_day.at + timedelta(hours=1), SIGNED, by_day) == [
        NightToTell(STARTS, ENDS)
    ]
    at_start = Revocation(STARTS + timedelta(days=1))
    assert nights_to_tell(NIGHTLY, SIGNED, at_start.at + timedelta(hours=1), SIGNED, at_start) == [
        NightToTell(STARTS, ENDS)
    ]


def test_the_mail_of_a_revoked_window_says_when_by_whom_and_why() -> None:
    revoked = Revocation(STARTS + timedelta(hours=7), "small-nurse", "small", "staffed tonight")
    night = replace(PARIS_NIGHT, ends=revoked.at, revocation=revoked)
    at_two = STARTS + timedelta(hours=6)
    sent = compose_summary_mail(
        night,
        summarise(STARTS, revoked.at, [alert("b:fever", "P-B", at_two)]),
        team_names=NAMES,
        covering_centre="City hospital",
        dashboard_path="/roster",
    )
    assert sent.subject == (
        "[VIGIL] Overnight cover by Regional oncology, 2026-12-07 20:00 CET (Europe/Paris) to "
        "2026-12-08 03:00 CET (Europe/Paris) (revoked): 1 alert, 1 still open at the end"
    )
    assert (
        "The cover was revoked at 2026-12-08 03:00 CET (Europe/Paris) by small-nurse of "
        "Partner ward (small), cutting the window short: from then on Partner ward (small) was "
        "paged for its own patients. Reason given: staffed tonight." in sent.body
    )
    assert "Patient P-B:" in sent.body
    quiet = compose_summary_mail(
        replace(night, revocation=Revocation(revoked.at)),
        [],
        team_names=NAMES,
        covering_centre=None,
        dashboard_path="/roster",
    )
    assert quiet.subject.endswith("(revoked): no alert")
    assert "The cover was revoked at 2026-12-08 03:00 CET (Europe/Paris), cutting" in quiet.body
    assert "No alert was opened for any of your patients while they were covered." in quiet.body
    assert "Reason given" not in quiet.body and "quiet night" not in quiet.body
