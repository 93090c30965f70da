"""An alert's timeline as the care team reads it: the rules' phases, notify's events and every
delivery attempt, in time order, worded from the record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.api.domain.timeline import timeline

T0 = datetime(2026, 1, 15, 2, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


PHASES = [
    {
        "phase": "start",
        "title": "Fever 39.1 °C",
        "priority": "high",
        "device_time": at(-1),
        "received_at": at(0),
    },
    {
        "phase": "end",
        "title": "Fever cleared",
        "priority": "high",
        "device_time": at(59),
        "received_at": at(60),
    },
]
NOTIFY = {
    "events": [
        {"at": at(0).isoformat(), "kind": "opened", "detail": {"policy_id": "night"}},
        {"at": at(0).isoformat(), "kind": "phase", "detail": {"phase": "start"}},
        {
            "at": at(0).isoformat(),
            "kind": "step_fired",
            "detail": {"step": 0, "pass": 0, "recipients": ["person:nurse"], "fallback": []},
        },
        {"at": at(0.1).isoformat(), "kind": "attempt", "detail": {"status": "accepted"}},
        {"at": at(5).isoformat(), "kind": "acknowledged", "detail": {"by": "nurse", "via": "link"}},
        {"at": at(61).isoformat(), "kind": "resolved", "detail": {"all_clear_to": ["nurse"]}},
        {"at": at(62).isoformat(), "kind": "something_new", "detail": {"x": 1}},
    ],
    "attempts": [
        {
            "at": at(0.1).isoformat(),
            "channel": "sms",
            "recipient": "+15550100",
            "purpose": "alert",
            "status": "failed",
            "detail": "Twilio 503",
        },
        {
            "at": at(0.2).isoformat(),
            "channel": "email",
            "recipient": "nurse@ward.test",
            "purpose": "alert",
            "status": "accepted",
            "detail": "250 OK",
        },
        {
            "at": at(61).isoformat(),
            "channel": "email",
            "recipient": "nurse@ward.test",
            "purpose": "all_clear",
            "status": "accepted",
            "detail": None,
        },
    ],
}


def test_the_timeline_in_order_worded_from_the_record() -> None:
    entries = timeline(PHASES, NOTIFY, "Europe/Berlin")
    assert [e.text for e in entries] == [
        "Raised by the rules: Fever 39.1 °C [high] (device time 15 Jan 02:59 (Europe/Berlin))",
        "Escalation opened under policy night",
        "Step 1 of the escalation (pass 1): paging person:nurse",
        "Page to +15550100 by sms: failed (Twilio 503)",
        "Page to nurse@ward.test by email: accepted",
        "Acknowledged by nurse (via link)",
        "Ended by the rules: Fever cleared (device time 15 Jan 03:59 (Europe/Berlin))",
        "Resolved; all clear to nurse",
        "All clear to nurse@ward.test by email: accepted",
        "something_new: x=1",  # a kind this module does not know is shown, not dropped
    ]
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    # notify's own "attempt" and "phase" events repeat the attempts and phases: not shown twice
    assert not any(e.kind in ("attempt", "phase") for e in entries)


def test_an_alert_notify_never_escalated_still_shows_its_phases() -> None:
    entries = timeline(PHASES[:1], None, "UTC")
    assert [e.text for e in entries] == [
        "Raised by the rules: Fever 39.1 °C [high] (device time 15 Jan 01:59 (UTC))"
    ]
    assert timeline([], None, "UTC") == []


def test_within_one_second_the_phase_that_caused_it_comes_first() -> None:
    raised = {**PHASES[0], "received_at": T0 + timedelta(milliseconds=400)}
    opened = {"events": [{"at": T0.isoformat(), "kind": "opened", "detail": {"policy_id": "p"}}]}
    assert [e.kind for e in timeline([raised], opened, "UTC")] == ["alert_start", "opened"]
    # A second apart, time decides.
    later = {**PHASES[0], "received_at": T0 + timedelta(seconds=1)}
    assert [e.kind for e in timeline([later], opened, "UTC")] == ["opened", "alert_start"]


def test_an_alert_of_a_discharged_patient_says_it_was_not_paged() -> None:
    """Notify's record of an alert decided after the patient's discharge (docs/notify.md,
    "Discharged patients")."""
    detail = {"reason": "discharged", "alert_id": "a", "rule_id": "device.silent"}
    record = {"events": [{"at": T0.isoformat(), "kind": "not_paged", "detail": detail}]}
    entries = timeline(PHASES[:1], record, "UTC")
    assert [e.text for e in entries][-1] == "Not paged: discharged"


def test_regional_cover_entries_name_the_teams_the_agreement_and_the_end() -> None:
    """Paged under cover (until the window's end, in the patient's team's zone) and handed back,
    re-paged or left with who acknowledged it (docs/regional-cover.md)."""
    ends = datetime(2026, 1, 15, 7, 0, tzinfo=UTC)  # 08:00 in Paris
    under = {
        "care_team_id": "big",
        "covered_team_id": "small",
        "agreement_id": "a-1",
        "agreement_version": 2,
        "window_ends": ends.isoformat(),
    }
    repaged = {"from_team": "big", "to_team": "small", "repaged": True}
    kept = {**repaged, "repaged": False, "acknowledged_by": "person:big-nurse"}
    record = {
        "events": [
            {"at": at(0).isoformat(), "kind": "paged_under_cover", "detail": under},
            {"at": ends.isoformat(), "kind": "handed_back", "detail": repaged},
            {"at": ends.isoformat(), "kind": "handed_back", "detail": kept},
        ]
    }
    names = {"big": "Regional oncology", "small": "Partner ward"}
    texts = [e.text for e in timeline([], record, "Europe/Paris", names)]
    assert texts == [
        "Paged Regional oncology under cover for Partner ward (agreement v2) until "
        "15 Jan 08:00 (Europe/Paris)",
        "Handed back to Partner ward; home on-call paged again",
        "Handed back to Partner ward: acknowledged overnight, stays with person:big-nurse "
        "(Regional oncology)",
    ]
    # A team whose name is not known is named by its id; an older entry without who
    # acknowledged names the covering team.
    older = {**kept}
    del older["acknowledged_by"]
    record = {"events": [{"at": ends.isoformat(), "kind": "handed_back", "detail": older}]}
    (entry,) = timeline([], record, "UTC")
    assert entry.text == "Handed back to small: acknowledged overnight, stays with big"
