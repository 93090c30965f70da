"""The words of a page are true when read: clock times in the care team's zone with the zone
named, relative times anchored on a named clock, all clears marked as such, repeats numbered,
critical limits and °F readings shown as they were."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from uuid import UUID

from schemas.events import Alert, AlertPhase, AlertPriority, Evidence, Page
from services.notify.adapters.postgres.outbox import page_position
from services.notify.domain import page_id_for
from services.notify.domain.message import (
    PageContext,
    clock_time,
    compose_bundle_email,
    compose_digest_sms,
    compose_page_email,
    compose_sms_text,
    pagerduty_event,
)
from services.notify.domain.routing import PagePurpose
from tests.factories import fever_evidence, make_alert

READING_ID = UUID("00000000-0000-4000-8000-00000000f00d")
# 03:00 in Berlin (winter, CET = UTC+1) is 02:00 UTC.
DEVICE_TIME = datetime(2025, 1, 15, 2, 0, 0, tzinfo=UTC)
INGEST_TIME = DEVICE_TIME + timedelta(seconds=2)
SENT = DEVICE_TIME + timedelta(seconds=3)
BERLIN = "Europe/Berlin"


def alert(
    phase: AlertPhase = AlertPhase.START,
    *,
    title: str = "Fever 38.6 °C",
    evidence: tuple[Evidence, ...] | None = None,
    device_time: datetime = DEVICE_TIME,
    ingest_time: datetime = INGEST_TIME,
    code: str = "fever_single",
) -> Alert:
    ended = phase is AlertPhase.END
    return make_alert(
        patient_id="P-1",
        code=code,
        phase=phase,
        at=ingest_time,
        device_time=device_time,
        alert_id=UUID(int=1 if not ended else 2),
        dedup_key="P-1:fever:x",
        device_id="thermo-1",
        priority=AlertPriority.INFO if ended else AlertPriority.HIGH,
        title=title,
        evidence=evidence
        if evidence is not None
        else (fever_evidence(device_time, unit="Cel", message_id=READING_ID),),
        rule_id="fever",
        rule_version="1.1.0+x",
    )


def page(channel: str = "email", key: str = "esc:1:alert:0:0:person:a#0") -> Page:
    return Page(
        page_id=page_id_for(key),
        alert_id=UUID(int=1),
        dedup_key="P-1:fever:x",
        patient_id="P-1",
        care_team_id="team-1",
        channel=channel,
        recipient="a@h.test",
        idempotency_key=key,
        created_at=SENT,
    )


def mail(
    a: Alert,
    purpose: PagePurpose = PagePurpose.ALERT,
    context: PageContext | None = None,
    sent: datetime = SENT,
) -> EmailMessage:
    return compose_page_email(
        a,
        page(),
        sender="v@h.test",
        composed_at=sent,
        purpose=purpose,
        context=context or PageContext(zone=BERLIN),
    )


def body(message: EmailMessage) -> str:
    parsed = message_from_bytes(message.as_bytes(policy=policy.SMTP), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    content = parsed.get_content()
    assert isinstance(content, str)
    return content


# -- clock times in the care team's zone ---------------------------------------------------------


def test_clock_times_are_in_the_team_zone_with_the_zone_named() -> None:
    """02:00 UTC reads 03:00 CET (Europe/Berlin) in winter and 04:00 CEST in summer."""
    assert clock_time(DEVICE_TIME, BERLIN) == "2025-01-15 03:00:00 CET (Europe/Berlin)"
    summer = datetime(2025, 7, 15, 2, 0, tzinfo=UTC)
    assert clock_time(summer, BERLIN) == "2025-07-15 04:00:00 CEST (Europe/Berlin)"
    assert clock_time(DEVICE_TIME, "UTC") == "2025-01-15 02:00:00 UTC"


def test_an_unknown_zone_falls_back_to_utc_and_says_utc() -> None:
    """A zone name the system does not know must not crash a page nor mislabel its times."""
    assert clock_time(DEVICE_TIME, "Mars/Olympus") == "2025-01-15 02:00:00 UTC"


def test_email_times_are_in_the_team_zone_and_name_the_clock() -> None:
    """Device time, receipt and sending are each shown in the team's zone, each naming whose
    clock it is; the device's own offset is still there for the auditor."""
    text = body(mail(alert(device_time=DEVICE_TIME.astimezone(timezone(timedelta(hours=-5))))))
    assert "Device time:  2025-01-15 03:00:00 CET (Europe/Berlin) by the device's clock" in text
    assert "(sent as 2025-01-14T21:00:00-05:00)" in text
    assert "Received:     2025-01-15 03:00:02 CET (Europe/Berlin) by Vigil's clock" in text
    assert "Sent:         2025-01-15 03:00:03 CET (Europe/Berlin) by Vigil's clock" in text
    assert "(device time 2025-01-15 03:00:00 CET (Europe/Berlin))" in text


def test_default_zone_is_utc_and_says_so() -> None:
    text = body(mail(alert(), context=PageContext()))
    assert "Device time:  2025-01-15 02:00:00 UTC by the device's clock" in text


def test_sms_names_the_zone_and_the_device_clock() -> None:
    sms = compose_sms_text(alert(), PagePurpose.ALERT, reference="r", context=PageContext(BERLIN))
    assert "03:00 CET device time" in sms
    assert "UTC" not in sms


def test_digest_sms_resolved_time_is_in_the_team_zone() -> None:
    """A held alert resolved at 02:30 UTC reads "resolved 03:30 CET", not a bare UTC time."""
    sms = compose_digest_sms(
        [(alert(), DEVICE_TIME + timedelta(minutes=30))],
        reference="r",
        context=PageContext(BERLIN),
    )
    assert "resolved 03:30 CET" in sms and "UTC" not in sms


# -- relative times: anchored on a named device time, edges --------------------------------------


def bag_alert(*, left_min: float, at: datetime, ingest: datetime, fired: datetime) -> Alert:
    return alert(
        title="Bag change due: bag predicted to run empty",
        code="bag_change_due",
        device_time=fired,
        ingest_time=ingest,
        evidence=(
            Evidence(
                name="minutes_to_empty",
                value=left_min,
                unit="min",
                limit=120.0,
                comparator="<=",
                device_time=at,
            ),
        ),
    )


def test_bag_time_left_is_counted_from_the_evidence_device_time() -> None:
    """90 min left at the status of 03:30 CET: predicted empty 05:00 CET by the pump's clock,
    whenever the page is read; no "in N min" counted from the timer or from now."""
    status = DEVICE_TIME + timedelta(minutes=30)
    text = body(
        mail(
            bag_alert(left_min=90.0, at=status, ingest=status, fired=DEVICE_TIME),
            sent=status + timedelta(seconds=5),
        )
    )
    assert "minutes_to_empty: 90.0 min <= limit 120.0 min" in text
    assert "(device time 2025-01-15 03:30:00 CET (Europe/Berlin))" in text
    assert "predicted empty at 2025-01-15 05:00 CET (Europe/Berlin) by the pump's clock" in text
    assert " in 90 min" not in text and "in 120 min" not in text


def test_late_data_page_says_how_late_it_is_sent() -> None:
    """A page sent 40 min after Vigil received its data says so, and that the times are the
    device's; a fresh page carries no such note."""
    late = body(mail(alert(), sent=INGEST_TIME + timedelta(minutes=40)))
    assert "sent 40 min after Vigil received the data this alert is based on" in late
    fresh = body(mail(alert()))
    assert "after Vigil received the data" not in fresh


def test_late_note_edge_is_five_minutes() -> None:
    """4 min 59 s after receipt: no note; 5 min: the note."""
    just_under = INGEST_TIME + timedelta(minutes=5) - timedelta(seconds=1)
    assert "after Vigil received" not in body(mail(alert(), sent=just_under))
    assert "sent 5 min after" in body(mail(alert(), sent=INGEST_TIME + timedelta(minutes=5)))


def test_deadline_already_past_when_the_data_arrived() -> None:
    """The status arrived when only 7 min were left (the lead is 120): the page shows 7 min at
    that status's device time and the empty time it implies, never the 120-min lead."""
    status = DEVICE_TIME + timedelta(minutes=3)
    text = body(
        mail(
            bag_alert(
                left_min=7.0, at=status, ingest=status, fired=DEVICE_TIME - timedelta(hours=2)
            )
        )
    )
    assert "minutes_to_empty: 7.0 min" in text
    assert "predicted empty at 2025-01-15 03:10 CET (Europe/Berlin) by the pump's clock" in text


def test_device_clock_ahead_and_behind_are_shown_as_the_devices_clock() -> None:
    """A pump clock 60 min ahead of Vigil's (or behind): the predicted empty time is labelled as
    the pump's clock and the receipt as Vigil's, so nothing mixes the two; no countdown is
    computed from Vigil's clock against the pump's."""
    for skew in (timedelta(minutes=60), timedelta(minutes=-60)):
        status = DEVICE_TIME + skew
        text = body(mail(bag_alert(left_min=30.0, at=status, ingest=DEVICE_TIME, fired=status)))
        empty = clock_time(status + timedelta(minutes=30), BERLIN, seconds=False)
        assert f"predicted empty at {empty} by the pump's clock" in text
        assert f"Device time:  {clock_time(status, BERLIN)} by the device's clock" in text
        assert f"Received:     {clock_time(DEVICE_TIME, BERLIN)} by Vigil's clock" in text
        assert "min left at sending" not in text


# -- all clear -------------------------------------------------------------------------------


def test_all_clear_email_carries_its_own_phase_and_priority() -> None:
    """Filed under the start alert (HIGH, start), the all clear still says end / info, is marked
    as all clear, and is not flagged important."""
    message = mail(alert(), PagePurpose.ALL_CLEAR)
    assert message["X-Vigil-Phase"] == "end"
    assert message["X-Vigil-Priority"] == "info"
    assert message["X-Vigil-All-Clear"] == "yes"
    assert message["Subject"] == "[VIGIL ALL CLEAR] Fever 38.6 °C — patient P-1"
    assert message["Importance"] is None and message["X-Priority"] is None
    assert "[VIGIL HIGH]" not in message["Subject"]


def test_all_clear_shows_when_and_how_it_cleared() -> None:
    """With the end alert at hand the page says what cleared it and when, in the team's zone."""
    ended = alert(
        AlertPhase.END,
        title="All clear: temperature 37.5 °C",
        device_time=DEVICE_TIME + timedelta(hours=1),
        evidence=(
            Evidence(
                name="temperature",
                value=37.5,
                unit="Cel",
                limit=37.8,
                comparator="<",
                device_time=DEVICE_TIME + timedelta(hours=1),
            ),
        ),
    )
    message = mail(alert(), PagePurpose.ALL_CLEAR, PageContext(zone=BERLIN, cleared_by=ended))
    text = body(message)
    assert "Cleared:      All clear: temperature 37.5 °C" in text
    assert "Cleared at:   2025-01-15 04:00:00 CET (Europe/Berlin) (device clock)" in text
    assert "temperature: 37.5 °C < limit 37.8 °C" in text
    assert "The alert this clears:" in text
    sms = compose_sms_text(
        alert(), PagePurpose.ALL_CLEAR, reference="r", context=PageContext(BERLIN, cleared_by=ended)
    )
    assert sms.startswith("VIGIL ALL CLEAR: Fever 38.6 °C, patient P-1. Cleared 04:00 CET")


def test_all_clear_of_an_end_alert_does_not_repeat_all_clear_in_the_subject() -> None:
    message = mail(
        alert(AlertPhase.END, title="All clear: temperature 37.5 °C"), PagePurpose.ALL_CLEAR
    )
    assert message["Subject"] == "[VIGIL ALL CLEAR] temperature 37.5 °C — patient P-1"


# -- repeat pages ------------------------------------------------------------------------------


def test_first_page_is_not_marked_repeat() -> None:
    message = mail(alert())
    assert message["Subject"] == "[VIGIL HIGH] Fever 38.6 °C — patient P-1"
    assert message["X-Vigil-Repeat"] is None
    assert "REPEAT" not in body(message)


def test_repeat_page_says_it_is_a_repeat_which_and_since_when() -> None:
    """The second pass of a 4-pass chain: "Repeat 1 of 3", page 2, open since the first page."""
    opened = DEVICE_TIME + timedelta(seconds=3)
    context = PageContext(zone=BERLIN, pass_no=1, passes=4, opened_at=opened)
    message = mail(alert(), context=context, sent=opened + timedelta(minutes=5))
    assert message["Subject"] == "[VIGIL HIGH] Repeat 1 of 3: Fever 38.6 °C — patient P-1"
    assert message["X-Vigil-Repeat"] == "1"
    text = body(message)
    assert "REPEAT 1 of 3: page 2 to you about this alert" in text
    assert "Open since 2025-01-15 03:00:03 CET (Europe/Berlin) (first paged)" in text
    sms = compose_sms_text(alert(), PagePurpose.ALERT, reference="r", context=context)
    assert sms.startswith("VIGIL HIGH REPEAT 1: Fever 38.6 °C")
    assert "open since 03:00 CET" in sms
    event = pagerduty_event(
        alert(), PagePurpose.ALERT, routing_key="k", dedup_key="d", context=context
    )
    payload = event["payload"]
    assert isinstance(payload, dict)
    assert str(payload["summary"]).startswith("[VIGIL HIGH] Repeat 1 of 3:")
    details = payload["custom_details"]
    assert isinstance(details, dict) and details["repeat"] == 1


def test_page_after_a_snooze_says_it_is_paged_again() -> None:
    context = PageContext(zone=BERLIN, round_no=1, opened_at=DEVICE_TIME)
    message = mail(alert(), context=context)
    assert message["Subject"].startswith("[VIGIL HIGH] Paged again after snooze 1: Fever")


def test_bundle_repeat_is_marked() -> None:
    second = alert(title="Pump alarm: occlusion downstream", code="pump_alarm")
    message = compose_bundle_email(
        [alert(), second],
        page(),
        sender="v@h.test",
        composed_at=SENT,
        context=PageContext(zone=BERLIN, pass_no=2, passes=4, opened_at=DEVICE_TIME),
    )
    assert message["Subject"].startswith("[VIGIL HIGH] Repeat 2 of 3: 2 alerts")


def test_page_position_from_idempotency_keys() -> None:
    """The page's round and pass come from its key, whatever its owner and recipient."""
    esc = "esc:0b7c3f8e-1111-4222-8333-944445555666"
    assert page_position(f"{esc}:alert:0:0:person:nurse#0") == (0, 0)
    assert page_position(f"{esc}:alert:2:1:email:x@h.test#0") == (0, 2)
    assert page_position(f"{esc}~round3:alert:1:0:person:nurse#1") == (3, 1)
    assert page_position(f"bundle:{esc[4:]}:quiet_digest:1:0:person:a#0") == (0, 1)
    assert page_position(f"{esc}:4:0:fallback#0") == (0, 4)
    assert page_position("pd:resolve:whatever") == (0, 0)


# -- evidence: critical limit, °F ------------------------------------------------------------


def test_fahrenheit_reading_is_shown_as_sent_and_in_celsius() -> None:
    """A thermometer set to °F sent 101.5 °F: the page shows 38.6 °C and 101.5 °F, and the limit
    in both units, so the clinician can repeat back what the caregiver read."""
    context = PageContext(zone=BERLIN, measured={str(READING_ID): (101.5, "F")})
    text = body(mail(alert(), context=context))
    assert "temperature: 38.6 °C (sent as 101.5 °F) >= limit 38.3 °C (100.9 °F)" in text
    sms = compose_sms_text(alert(), PagePurpose.ALERT, reference="r", context=context)
    assert "Fever 38.6 °C (sent as 101.5 °F)" in sms


def test_celsius_reading_is_not_given_a_fahrenheit_twin() -> None:
    """A reading sent in °C is shown in °C only (nothing invented)."""
    text = body(mail(alert(), context=PageContext(zone=BERLIN, measured={})))
    assert "°F" not in text
    assert "temperature: 38.6 °C >= limit 38.3 °C" in text


def test_critical_evidence_shows_the_critical_limit() -> None:
    """Evidence carrying 39.5 °C (the critical limit) is shown with it."""
    critical = alert(
        title="Fever 39.7 °C",
        code="fever_critical",
        evidence=(
            Evidence(
                name="temperature",
                value=39.7,
                unit="Cel",
                limit=39.5,
                comparator=">=",
                device_time=DEVICE_TIME,
            ),
        ),
    )
    text = body(mail(critical))
    assert "temperature: 39.7 °C >= limit 39.5 °C" in text
    assert "38.3" not in text
