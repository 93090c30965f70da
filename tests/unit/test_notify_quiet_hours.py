"""Quiet hours (pure): which instants are quiet, across midnight and daylight-saving changes,
and that only LOW and INFO alerts are ever held."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from schemas.events import Alert, AlertKind, AlertPriority, Page
from services.notify.domain.message import compose_digest_email, compose_digest_sms
from services.notify.domain.message import pagerduty_event as pd_event
from services.notify.domain.quiet_hours import QuietHours, held_until, quiet_span_at
from services.notify.domain.routing import PagePurpose
from tests.factories import make_alert

BERLIN_NIGHT = QuietHours("Europe/Berlin", time(22, 0), time(7, 0))
BERLIN_NIGHT_ZONE = ZoneInfo("Europe/Berlin")


def _utc(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_window_crossing_midnight_is_quiet_from_start_to_end_only() -> None:
    """22:00-07:00 UTC: quiet at 22:00 and 06:59:59 (the night before's window), not at 07:00
    (half-open) nor at 21:59:59; the span of an instant after midnight began the day before."""
    quiet = QuietHours("UTC", time(22, 0), time(7, 0))
    assert quiet_span_at(quiet, _utc(2025, 6, 1, 21, 59, 59)) is None
    span = quiet_span_at(quiet, _utc(2025, 6, 1, 22, 0))
    assert span is not None and span.ends_at == _utc(2025, 6, 2, 7, 0)
    early = quiet_span_at(quiet, _utc(2025, 6, 2, 6, 59, 59))
    assert early is not None and early.starts_at == _utc(2025, 6, 1, 22, 0)
    assert quiet_span_at(quiet, _utc(2025, 6, 2, 7, 0)) is None
    assert quiet_span_at(quiet, _utc(2025, 6, 2, 12, 0)) is None


def test_window_within_one_day() -> None:
    """13:00-15:00 in New York (EDT, UTC-4): 17:00 UTC is quiet, 19:00 UTC (15:00) and 16:59 UTC
    (12:59) are not."""
    quiet = QuietHours("America/New_York", time(13, 0), time(15, 0))
    assert quiet_span_at(quiet, _utc(2025, 7, 1, 16, 59)) is None
    span = quiet_span_at(quiet, _utc(2025, 7, 1, 17, 0))
    assert span is not None and (span.starts_at, span.ends_at) == (
        _utc(2025, 7, 1, 17, 0),
        _utc(2025, 7, 1, 19, 0),
    )
    assert quiet_span_at(quiet, _utc(2025, 7, 1, 19, 0)) is None


def test_berlin_spring_forward_night_is_one_hour_shorter() -> None:
    """On 2025-03-30 Berlin jumps from 02:00 CET to 03:00 CEST: 22:00-07:00 local starts at
    21:00 UTC and ends at 05:00 UTC (07:00 CEST), 8 hours; 05:00 UTC is already outside."""
    span = quiet_span_at(BERLIN_NIGHT, _utc(2025, 3, 30, 1, 30))
    assert span is not None
    assert (span.starts_at, span.ends_at) == (_utc(2025, 3, 29, 21, 0), _utc(2025, 3, 30, 5, 0))
    assert quiet_span_at(BERLIN_NIGHT, _utc(2025, 3, 30, 4, 59, 59)) is not None
    assert quiet_span_at(BERLIN_NIGHT, _utc(2025, 3, 30, 5, 0)) is None


def test_berlin_fall_back_night_is_one_hour_longer() -> None:
    """On 2025-10-26 Berlin goes back from 03:00 CEST to 02:00 CET: 22:00 CEST is 20:00 UTC and
    07:00 CET is 06:00 UTC, 10 hours; 05:30 UTC (06:30 CET) is still quiet."""
    span = quiet_span_at(BERLIN_NIGHT, _utc(2025, 10, 26, 5, 30))
    assert span is not None
    assert (span.starts_at, span.ends_at) == (_utc(2025, 10, 25, 20, 0), _utc(2025, 10, 26, 6, 0))
    assert quiet_span_at(BERLIN_NIGHT, _utc(2025, 10, 26, 6, 0)) is None


def test_start_in_the_skipped_hour_begins_at_the_jump() -> None:
    """02:30 does not exist in Berlin on 2025-03-30: quiet hours 02:30-06:00 begin when the clock
    jumps (01:00 UTC, 03:00 CEST), not earlier: 00:59:59 UTC is not quiet, 01:00 UTC is."""
    quiet = QuietHours("Europe/Berlin", time(2, 30), time(6, 0))
    assert quiet_span_at(quiet, _utc(2025, 3, 30, 0, 59, 59)) is None
    span = quiet_span_at(quiet, _utc(2025, 3, 30, 1, 0))
    assert span is not None and span.starts_at == _utc(2025, 3, 30, 1, 0)
    assert span.ends_at == _utc(2025, 3, 30, 4, 0)


def test_repeated_hour_makes_quiet_hours_shorter_on_both_ends() -> None:
    """02:30 happens twice in Berlin on 2025-10-26 (00:30 UTC in CEST, 01:30 UTC in CET): a start
    at 02:30 takes the second (later) one, an end at 02:30 the first (earlier) one."""
    starts = QuietHours("Europe/Berlin", time(2, 30), time(6, 0))
    # 01:00 UTC is 02:00 CET: after the first 02:30 (CEST), before the second.
    assert quiet_span_at(starts, _utc(2025, 10, 26, 1, 0)) is None
    span = quiet_span_at(starts, _utc(2025, 10, 26, 1, 30))
    assert span is not None and span.starts_at == _utc(2025, 10, 26, 1, 30)
    ends = QuietHours("Europe/Berlin", time(22, 0), time(2, 30))
    assert quiet_span_at(ends, _utc(2025, 10, 26, 0, 29, 59)) is not None
    assert quiet_span_at(ends, _utc(2025, 10, 26, 0, 30)) is None
    assert quiet_span_at(ends, _utc(2025, 10, 26, 1, 30)) is None


@pytest.mark.parametrize(
    ("first", "hours"),
    [(_utc(2025, 3, 28, 12, 0), {8.0, 9.0}), (_utc(2025, 10, 24, 12, 0), {9.0, 10.0})],
)
def test_every_minute_around_a_dst_change_agrees_with_its_span(
    first: datetime, hours: set[float]
) -> None:
    """Minute by minute over three days around each Berlin DST change: an instant is quiet exactly
    when its local wall time is at or after 22:00 or before 07:00 (the wall clock and the span
    agree), and every span lasts 9 hours, or 8/10 on the night of the change."""
    seen: set[float] = set()
    at = first
    while at < first + timedelta(days=3):
        span = quiet_span_at(BERLIN_NIGHT, at)
        local = at.astimezone(BERLIN_NIGHT_ZONE).time()
        assert (span is not None) == (local >= time(22, 0) or local < time(7, 0)), at
        if span is not None:
            assert span.starts_at <= at < span.ends_at
            seen.add((span.ends_at - span.starts_at).total_seconds() / 3600)
        at += timedelta(minutes=1)
    assert seen == hours


def test_high_and_medium_are_never_held_low_and_info_are() -> None:
    """Inside quiet hours HIGH and MEDIUM page now (None); LOW and INFO are held until the end.
    Outside quiet hours, or with none set, nothing is held."""
    inside, outside = _utc(2025, 6, 1, 23, 0), _utc(2025, 6, 1, 12, 0)
    end = _utc(2025, 6, 2, 5, 0)  # 07:00 CEST
    for priority in (AlertPriority.HIGH, AlertPriority.MEDIUM):
        assert held_until(priority, BERLIN_NIGHT, inside) is None
    for priority in (AlertPriority.LOW, AlertPriority.INFO):
        assert held_until(priority, BERLIN_NIGHT, inside) == end
        assert held_until(priority, BERLIN_NIGHT, outside) is None
        assert held_until(priority, None, inside) is None


def test_invalid_quiet_hours_and_naive_times_are_refused() -> None:
    """An unknown zone, a window that starts when it ends, and a naive instant raise."""
    with pytest.raises(Exception):  # noqa: B017  # zoneinfo raises its own not-found error
        QuietHours("Mars/Olympus_Mons", time(22, 0), time(7, 0))
    with pytest.raises(ValueError, match="different"):
        QuietHours("UTC", time(22, 0), time(22, 0))
    with pytest.raises(ValueError, match="aware"):
        quiet_span_at(BERLIN_NIGHT, datetime(2025, 6, 1, 23, 0))  # noqa: DTZ001  # on purpose


def _low(patient: str, code: str) -> Alert:
    return make_alert(
        patient_id=patient,
        code=code,
        at=_utc(2025, 6, 1, 23, 0),
        alert_id=uuid.uuid4(),
        device_id=f"pump-{patient}",
        kind=AlertKind.TECHNICAL,
        priority=AlertPriority.LOW,
        title=f"{code} low",
        evidence=(),
        rule_id="pump",
    )


def test_digest_lists_resolved_alerts_as_resolved() -> None:
    """The digest e-mail names every alert, a resolved one as "RESOLVED at <time>" and the others
    as ACTIVE; the SMS and the PagerDuty trigger say the same."""
    active, gone = _low("P-1", "battery_low"), _low("P-2", "reservoir_low")
    resolved_at = _utc(2025, 6, 2, 1, 15)
    entries = ((active, None), (gone, resolved_at))
    page = Page(
        page_id=uuid.uuid4(),
        alert_id=active.alert_id,
        dedup_key=active.dedup_key,
        patient_id=active.patient_id,
        care_team_id="CT",
        channel="email",
        recipient="n@h.test",
        idempotency_key="k",
        created_at=resolved_at,
    )
    message = compose_digest_email(
        entries, page, sender="v@h.test", composed_at=_utc(2025, 6, 2, 5, 0)
    )
    body = message.get_content()
    assert "Quiet hours: 2 alerts (1 resolved)" in message["Subject"]
    assert "P-1, P-2" in message["Subject"]
    assert "ACTIVE ---" in body and "RESOLVED at 2025-06-02 01:15:00 UTC by Vigil's clock" in body
    sms = compose_digest_sms(entries, reference="ABC")
    assert "reservoir_low low (P-2) resolved 01:15 UTC" in sms and "Ref ABC" in sms
    event = pd_event(
        active, PagePurpose.QUIET_DIGEST, routing_key="rk", dedup_key="d", digest=entries
    )
    details = event["payload"]["custom_details"]  # type: ignore[index]
    assert event["event_action"] == "trigger"
    assert details["resolved_at"] == {gone.dedup_key: resolved_at.isoformat()}
