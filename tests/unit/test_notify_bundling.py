"""Burst bundling decisions and the messages a bundle and an upstream sync become (pure)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, AlertState, Page
from services.notify.domain.bundling import (
    PendingBundle,
    Placement,
    bundle_priority,
    is_bundled,
    is_due,
    place,
)
from services.notify.domain.message import (
    compose_bundle_email,
    compose_bundle_sms,
    pagerduty_event,
)
from services.notify.domain.routing import PagePurpose

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
WAIT = 5.0


def _pending(*members: str) -> PendingBundle:
    return PendingBundle(opened_at=T0, due_at=T0 + timedelta(seconds=WAIT), members=members)


def test_first_alert_of_a_patient_starts_a_bundle_due_one_window_later() -> None:
    """No pending bundle: the alert opens one, due exactly group_wait after it arrived."""
    decision = place(None, dedup_key="P:A", at=T0, group_wait_s=WAIT)
    assert decision.placement is Placement.START
    assert decision.due_at == T0 + timedelta(seconds=WAIT)


def test_alert_inside_the_window_joins_without_moving_the_due_time() -> None:
    """A later alert within the window joins; the due time stays the first alert's, so no
    alert (a HIGH one included) waits longer than the window."""
    decision = place(
        _pending("P:A"), dedup_key="P:B", at=T0 + timedelta(seconds=4.999), group_wait_s=WAIT
    )
    assert decision.placement is Placement.JOIN
    assert decision.due_at == T0 + timedelta(seconds=WAIT)


def test_alert_exactly_at_the_window_edge_starts_its_own_bundle() -> None:
    """The window is half-open: at opened_at + group_wait the bundle is being paged, so the
    alert arriving then is not folded into it."""
    edge = T0 + timedelta(seconds=WAIT)
    decision = place(_pending("P:A"), dedup_key="P:B", at=edge, group_wait_s=WAIT)
    assert decision.placement is Placement.START
    assert decision.due_at == edge + timedelta(seconds=WAIT)


def test_redelivered_alert_is_recognised_as_already_in_the_bundle() -> None:
    """The same dedup key again (a Kafka redelivery) is neither a new member nor a new bundle."""
    decision = place(_pending("P:A"), dedup_key="P:A", at=T0, group_wait_s=WAIT)
    assert decision.placement is Placement.ALREADY


def test_bundle_is_due_at_its_due_time_not_before() -> None:
    """Due at exactly due_at; a millisecond earlier it still waits."""
    bundle = _pending("P:A")
    assert not is_due(bundle, T0 + timedelta(seconds=WAIT - 0.001))
    assert is_due(bundle, T0 + timedelta(seconds=WAIT))


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
    return Alert(
        alert_id=uuid.uuid4(),
        dedup_key=f"P-1:{code}",
        patient_id="P-1",
        device_id="pump-1",
        kind=AlertKind.TECHNICAL,
        code=code,
        priority=priority,
        phase=AlertPhase.START,
        state=AlertState.ACTIVE,
        title=title,
        device_time=T0,
        ingest_time=T0,
        evidence=(),
        rule_id="pump.alarm",
        rule_version="1",
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
