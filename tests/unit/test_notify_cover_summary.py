"""The morning summary of a night of cover (services/notify/domain/cover_summary.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.notify.domain.cover_summary import (
    CoverNight,
    SummaryMail,
    compose_summary_mail,
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
