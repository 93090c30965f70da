"""Burst bundling decisions and the messages a bundle and an upstream sync become (pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import Alert, AlertKind, AlertPriority, Page
from services.notify.domain.bundling import (
    BundleWindow,
    Placement,
    bundle_priority,
    is_bundled,
    place,
)
from services.notify.domain.message import (
    compose_bundle_email,
    compose_bundle_sms,
    pagerduty_event,
)
from services.notify.domain.routing import PagePurpose
from tests.factories import make_alert

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
WAIT = 5.0
WINDOW_END = T0 + timedelta(seconds=WAIT)


def _s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _window(*follow_up: str) -> BundleWindow:
    """The window opened by an alert paged at T0, with the given follow-up members."""
    return BundleWindow(opened_at=T0, closes_at=WINDOW_END, follow_up=follow_up)


def test_first_alert_of_a_patient_is_paged_now_and_opens_a_window() -> None:
    """No window: the alert is due at the instant it arrived (no wait at all) and opens a
    window of exactly group_wait with no follow-up yet."""
    decision = place(None, dedup_key="P:A", at=T0, group_wait_s=WAIT)
    assert decision.placement is Placement.PAGE_NOW
    assert decision.due_at == T0
    assert decision.window == BundleWindow(opened_at=T0, closes_at=WINDOW_END, follow_up=())


def test_second_alert_inside_the_window_is_due_at_the_window_end() -> None:
    """An alert 1 ms before the window closes joins the follow-up, due at the window end: it
    waits 1 ms, and no alert in the window waits longer than group_wait."""
    decision = place(_window(), dedup_key="P:B", at=_s(WAIT - 0.001), group_wait_s=WAIT)
    assert decision.placement is Placement.FOLLOW_UP
    assert decision.due_at == WINDOW_END
    assert decision.window == _window("P:B")


def test_alert_exactly_at_the_window_end_starts_afresh() -> None:
    """The window is half-open: at its end the follow-up is being paged, so the alert arriving
    then is paged at once and opens a new window; the follow-up is not joined."""
    decision = place(_window("P:B"), dedup_key="P:C", at=WINDOW_END, group_wait_s=WAIT)
    assert decision.placement is Placement.PAGE_NOW
    assert decision.due_at == WINDOW_END
    assert decision.window == BundleWindow(WINDOW_END, WINDOW_END + timedelta(seconds=WAIT))


def test_alert_after_a_follow_up_was_paged_is_paged_at_once() -> None:
    """The follow-up's page opens no window of its own (no group_interval): the next alert
    after the window is paged at once, not held behind the last burst."""
    decision = place(_window("P:B", "P:C"), dedup_key="P:D", at=_s(WAIT + 0.5), group_wait_s=WAIT)
    assert decision.placement is Placement.PAGE_NOW
    assert decision.due_at == _s(WAIT + 0.5)


def test_burst_of_three_is_one_immediate_page_and_one_follow_up_of_two() -> None:
    """Three alerts 1 s apart, folded through place as the store would: the first is due at
    once, the other two share one follow-up due at the first alert + group_wait."""
    window: BundleWindow | None = None
    decisions = []
    for i, key in enumerate(("P:OCCLUSION", "P:STOPPED", "P:BATTERY")):
        decision = place(window, dedup_key=key, at=_s(i), group_wait_s=WAIT)
        decisions.append(decision)
        window = decision.window
    assert [d.placement for d in decisions] == [
        Placement.PAGE_NOW,
        Placement.FOLLOW_UP,
        Placement.FOLLOW_UP,
    ]
    assert [d.due_at for d in decisions] == [T0, WINDOW_END, WINDOW_END]
    assert window == _window("P:STOPPED", "P:BATTERY")


def test_two_patients_have_independent_windows() -> None:
    """Each patient's window is its own: a second patient's first alert, arriving inside the
    first patient's window, is still paged at once."""
    windows: dict[str, BundleWindow | None] = {"P1": None, "P2": None}
    first = place(windows["P1"], dedup_key="P1:A", at=T0, group_wait_s=WAIT)
    windows["P1"] = first.window
    other = place(windows["P2"], dedup_key="P2:A", at=_s(1), group_wait_s=WAIT)
    windows["P2"] = other.window
    again = place(windows["P1"], dedup_key="P1:B", at=_s(2), group_wait_s=WAIT)
    assert (first.placement, other.placement, again.placement) == (
        Placement.PAGE_NOW,
        Placement.PAGE_NOW,
        Placement.FOLLOW_UP,
    )
    assert other.due_at == _s(1) and again.due_at == WINDOW_END
    assert other.window.closes_at == _s(1 + WAIT)


def test_redelivered_follow_up_alert_is_recognised_as_already_waiting() -> None:
    """The same dedup key again inside the window (a Kafka redelivery) is neither a new member
    nor a new page."""
    decision = place(_window("P:B"), dedup_key="P:B", at=_s(1), group_wait_s=WAIT)
    assert decision.placement is Placement.ALREADY
    assert decision.window == _window("P:B")


def test_clock_behind_the_window_pages_at_once_and_keeps_the_window() -> None:
    """An alert stamped before the window opened (an instance whose clock is behind) would wait
    longer than group_wait if it joined: it is paged at once and the window stays as it is."""
    decision = place(_window("P:B"), dedup_key="P:C", at=_s(-1), group_wait_s=WAIT)
    assert decision.placement is Placement.PAGE_NOW
    assert decision.due_at == _s(-1)
    assert decision.window == _window("P:B")


def test_no_alert_waits_longer_than_the_window() -> None:
    """Whatever the arrival time around a window, the wait (due_at - at) is never negative and
    never longer than group_wait (exactly group_wait only for an alert arriving the instant the
    window opened)."""
    for tenths in range(-20, 120):
        at = _s(tenths / 10)
        decision = place(_window("P:B"), dedup_key="P:X", at=at, group_wait_s=WAIT)
        wait = (decision.due_at - at).total_seconds()
        assert 0 <= wait <= WAIT, (tenths, wait)


def test_zero_window_pages_every_alert_at_once() -> None:
    """group_wait 0 is bundling off: the window is empty, so the next alert at the same
    instant is paged at once too."""
    first = place(None, dedup_key="P:A", at=T0, group_wait_s=0)
    second = place(first.window, dedup_key="P:B", at=T0, group_wait_s=0)
    assert (first.placement, second.placement) == (Placement.PAGE_NOW, Placement.PAGE_NOW)


def test_a_bundle_of_one_is_paged_as_a_plain_alert() -> None:
    """Only two or more alerts make a shared page."""
    assert not is_bundled(("P:A",))
    assert is_bundled(("P:A", "P:B"))


def test_naive_times_and_negative_windows_are_refused() -> None:
    """Times without a zone and a negative window are programming errors, not paging decisions."""
    with pytest.raises(ValueError):
        place(None, dedup_key="P:A", at=T0.replace(tzinfo=None), group_wait_s=WAIT)
    with pytest.raises(ValueError):
        place(None, dedup_key="P:A", at=T0, group_wait_s=-1)


def test_bundle_priority_is_its_most_urgent_alert() -> None:
    """A bundle with one HIGH alert among lower ones is paged HIGH."""
    assert (
        bundle_priority((AlertPriority.LOW, AlertPriority.HIGH, AlertPriority.MEDIUM))
        is AlertPriority.HIGH
    )
    assert bundle_priority((AlertPriority.INFO, AlertPriority.LOW)) is AlertPriority.LOW


def _alert(code: str, title: str, priority: AlertPriority) -> Alert:
    return make_alert(
        patient_id="P-1",
        code=code,
        at=T0,
        alert_id=uuid.uuid4(),
        device_id="pump-1",
        kind=AlertKind.TECHNICAL,
        priority=priority,
        title=title,
        evidence=(),
        rule_id="pump.alarm",
    )


BURST = (
    _alert("OCCLUSION", "Downstream occlusion", AlertPriority.HIGH),
    _alert("BATTERY_LOW", "Battery low", AlertPriority.LOW),
)


def _page() -> Page:
    return Page(
        page_id=uuid.uuid4(),
        alert_id=BURST[0].alert_id,
        dedup_key=BURST[0].dedup_key,
        patient_id="P-1",
        care_team_id="CT-1",
        channel="email",
        recipient="nurse@h.test",
        idempotency_key="bundle:x:alert:0:0:person:n#0",
        created_at=T0,
    )


def test_bundle_email_lists_every_alert_and_says_the_link_acknowledges_all() -> None:
    """One e-mail: the subject counts and names the alerts at the highest priority, the body
    carries each alert's dedup key and an ack link that covers all of them."""
    message = compose_bundle_email(
        BURST, _page(), sender="v@h.test", composed_at=T0, ack_url="http://x/ack/t"
    )
    body = message.get_content()
    assert message["Subject"].startswith("[VIGIL HIGH] 2 alerts")
    assert "Downstream occlusion; Battery low" in message["Subject"]
    assert all(a.dedup_key in body for a in BURST)
    assert "ACKNOWLEDGE ALL 2 ALERTS (stops further paging): http://x/ack/t" in body
    with pytest.raises(ValueError):
        compose_bundle_email(BURST[:1], _page(), sender="v@h.test", composed_at=T0)


def test_bundle_sms_names_every_alert_and_keeps_its_reference() -> None:
    """The SMS names both alerts, says a reply acknowledges all, and ends with the reference."""
    text = compose_bundle_sms(BURST, reference="ABC123")
    assert "2 alerts" in text and "Downstream occlusion; Battery low" in text
    assert "Reply 1 to acknowledge all" in text and text.endswith("Ref ABC123")


def test_pagerduty_acknowledge_and_resolve_reuse_the_trigger_dedup_key() -> None:
    """Upstream sync events carry the action PagerDuty expects, the same dedup_key, no
    payload; a bundle trigger lists every alert's dedup key."""
    ack = pagerduty_event(
        BURST[0], PagePurpose.UPSTREAM_ACKNOWLEDGE, routing_key="rk", dedup_key="P-1:OCCLUSION"
    )
    assert ack == {"routing_key": "rk", "event_action": "acknowledge", "dedup_key": "P-1:OCCLUSION"}
    resolve = pagerduty_event(
        BURST[0], PagePurpose.UPSTREAM_RESOLVE, routing_key="rk", dedup_key="P-1:OCCLUSION"
    )
    assert resolve["event_action"] == "resolve" and "payload" not in resolve
    trigger = pagerduty_event(
        BURST[0], PagePurpose.ALERT, routing_key="rk", dedup_key="P-1:OCCLUSION", bundle=BURST
    )
    payload = trigger["payload"]
    assert isinstance(payload, dict)
    assert trigger["event_action"] == "trigger" and payload["severity"] == "critical"
    assert payload["custom_details"]["dedup_keys"] == [a.dedup_key for a in BURST]
