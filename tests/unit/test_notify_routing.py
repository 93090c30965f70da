"""Routing (pure): who is paged for an engine command, on which channel, where the all clear
goes (only where a page reached the person, or may have; PagerDuty's is the upstream resolve),
and where a page goes once its channel failed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.notify.domain.routing import (
    EMAIL,
    PAGERDUTY,
    SMS,
    ContactMethod,
    Deliver,
    PagePurpose,
    Recipient,
    RecipientKind,
    ResolveUpstream,
    SentPage,
    ToFallback,
    after_failure,
    last_paged_at,
    reached,
    route,
)

AT = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
ANNA = Recipient.parse("person:anna")
TEAM_FALLBACK = Recipient.fallback_of("ward-7")
PD_FIRST = (
    ContactMethod(0, PAGERDUTY, "pd-routing-key"),
    ContactMethod(1, EMAIL, "anna@ward7.example"),
)
SMS_FIRST = (ContactMethod(0, SMS, "+15550100"), ContactMethod(1, EMAIL, "anna@ward7.example"))


def _page(
    recipient: Recipient,
    rank: int,
    channel: str,
    address: str,
    status: str,
    *,
    key: str = "esc:e1:alert:0:0:person:anna#0",
    at: datetime = AT,
) -> SentPage:
    return SentPage(recipient, rank, channel, address, key, status, at)


def test_recipient_refs_round_trip() -> None:
    assert Recipient(RecipientKind.PERSON, "anna") == ANNA and ANNA.ref == "person:anna"
    address = Recipient.parse("email:desk@ward7.example")
    assert address.kind is RecipientKind.ADDRESS and address.id == "desk@ward7.example"
    assert Recipient.parse("fallback:").ref == "fallback:"
    assert TEAM_FALLBACK.ref == "fallback:ward-7"
    with pytest.raises(ValueError):
        Recipient.parse("pager:anna")


def test_page_goes_to_the_first_contact_method_the_rest_are_its_failover() -> None:
    assert route(ANNA, PagePurpose.ALERT, SMS_FIRST) == (
        Deliver(ANNA, 0, SMS, "+15550100", has_next_channel=True),
    )
    assert route(ANNA, PagePurpose.ESCALATION, SMS_FIRST[1:]) == (
        Deliver(ANNA, 1, EMAIL, "anna@ward7.example", has_next_channel=False),
    )
    # A PagerDuty first method is paged like any other channel (its trigger opens an incident).
    assert route(ANNA, PagePurpose.ALERT, PD_FIRST) == (
        Deliver(ANNA, 0, PAGERDUTY, "pd-routing-key", has_next_channel=True),
    )


def test_an_address_the_policy_names_is_emailed() -> None:
    desk = Recipient.parse("email:desk@ward7.example")
    assert route(desk, PagePurpose.ALERT, ()) == (Deliver(desk, 0, EMAIL, "desk@ward7.example"),)


def test_fallback_email_when_nobody_can_be_paged() -> None:
    assert route(ANNA, PagePurpose.ALERT, ()) == (ToFallback("person anna has no contact method"),)
    assert route(Recipient.parse("email:"), PagePurpose.ALERT, ()) == (
        ToFallback("escalation step names a schedule that no longer exists"),
    )
    # The fallback address paged before gets its all clear there again.
    assert route(Recipient.parse("fallback:"), PagePurpose.ALL_CLEAR, ()) == (
        ToFallback("paged through the fallback address before"),
    )


def test_all_clear_goes_where_the_page_reached_the_person() -> None:
    sent = [_page(ANNA, 0, SMS, "+15550100", "delivered")]
    assert route(ANNA, PagePurpose.ALL_CLEAR, SMS_FIRST, sent) == (
        Deliver(ANNA, 0, SMS, "+15550100"),
    )


def test_all_clear_failed_on_one_channel_accepted_on_another() -> None:
    """The PagerDuty trigger was refused and the failover e-mail was accepted: the all clear goes
    by e-mail only (no resolve for an incident never opened, no page to the refused channel)."""
    sent = [
        _page(ANNA, 0, PAGERDUTY, "pd-routing-key", "failed"),
        _page(ANNA, 1, EMAIL, "anna@ward7.example", "sent"),
    ]
    assert route(ANNA, PagePurpose.ALL_CLEAR, PD_FIRST, sent) == (
        Deliver(ANNA, 1, EMAIL, "anna@ward7.example"),
    )
    # An SMS that failed over to e-mail: the all clear is no second SMS.
    sms_failed = [
        _page(ANNA, 0, SMS, "+15550100", "failed"),
        _page(ANNA, 1, EMAIL, "anna@ward7.example", "sent"),
    ]
    assert route(ANNA, PagePurpose.ALL_CLEAR, SMS_FIRST, sms_failed) == (
        Deliver(ANNA, 1, EMAIL, "anna@ward7.example"),
    )


def test_all_clear_through_pagerduty_is_the_upstream_resolve() -> None:
    sent = [_page(ANNA, 0, PAGERDUTY, "pd-routing-key", "sent")]
    assert route(ANNA, PagePurpose.ALL_CLEAR, PD_FIRST, sent) == (
        ResolveUpstream(ANNA, "pd-routing-key"),
    )
    # Nothing reached yet and PagerDuty is the first method: still no page of its own.
    assert route(ANNA, PagePurpose.ALL_CLEAR, PD_FIRST, ()) == (
        ResolveUpstream(ANNA, "pd-routing-key"),
    )


def test_all_clear_on_every_channel_that_may_have_reached_the_person() -> None:
    """A retry accepted on SMS, a failover e-mail still in flight and one left unknown by a stop
    each get one (a duplicate rather than a miss); one per channel and address."""
    sent = [
        _page(ANNA, 0, SMS, "+15550100", "sent"),
        _page(ANNA, 0, SMS, "+15550100", "delivered", key="esc:e1:alert:1:0:person:anna#0"),
        _page(ANNA, 1, EMAIL, "anna@ward7.example", "sending"),
        _page(ANNA, 2, EMAIL, "anna@home.example", "unknown"),
        _page(ANNA, 3, EMAIL, "anna@old.example", "queued"),
    ]
    assert route(ANNA, PagePurpose.ALL_CLEAR, SMS_FIRST, sent) == (
        Deliver(ANNA, 0, SMS, "+15550100"),
        Deliver(ANNA, 1, EMAIL, "anna@ward7.example"),
        Deliver(ANNA, 2, EMAIL, "anna@home.example"),
    )


def test_all_clear_nothing_reached_falls_back_to_the_first_method() -> None:
    sent = [_page(ANNA, 0, SMS, "+15550100", "failed")]
    assert route(ANNA, PagePurpose.ALL_CLEAR, SMS_FIRST, sent) == (
        Deliver(ANNA, 0, SMS, "+15550100", has_next_channel=True),
    )


def test_all_clear_to_the_fallback_address_paged_for_the_person() -> None:
    """Every channel of the person failed and the team's fallback address was paged for them:
    it gets their all clear too, keyed ``:undeliverable`` like that page; another person's
    fallback page does not count."""
    for_anna = _page(
        TEAM_FALLBACK,
        0,
        EMAIL,
        "oncall@ward7.example",
        "sent",
        key="esc:e1:alert:0:0:person:anna:undeliverable#0",
    )
    for_ben = _page(
        TEAM_FALLBACK,
        0,
        EMAIL,
        "oncall@ward7.example",
        "sent",
        key="esc:e1:alert:0:0:person:ben:undeliverable#0",
    )
    assert route(ANNA, PagePurpose.ALL_CLEAR, SMS_FIRST, [for_anna]) == (
        Deliver(
            TEAM_FALLBACK,
            0,
            EMAIL,
            "oncall@ward7.example",
            key_suffix=":undeliverable",
            route_detail="every channel of person:anna failed",
        ),
    )
    assert reached(ANNA, [for_ben]) == ()


def test_last_paged_counts_the_receipt_and_the_fallback_pages() -> None:
    later = AT + timedelta(minutes=5)
    receipt = SentPage(ANNA, 0, SMS, "+15550100", "k#0", "delivered", AT, later)
    failed = _page(ANNA, 1, EMAIL, "anna@ward7.example", "failed", at=AT + timedelta(hours=1))
    assert last_paged_at(ANNA, [receipt, failed]) == later
    assert last_paged_at(ANNA, [failed]) is None
    fallback_page = _page(TEAM_FALLBACK, 0, EMAIL, "oncall@ward7.example", "sent", key="x#0")
    assert last_paged_at(Recipient.parse("fallback:"), [fallback_page]) == AT
    assert last_paged_at(ANNA, [fallback_page]) is None


def test_after_failure_next_channel_then_the_fallback_address() -> None:
    assert after_failure(ANNA, 0, SMS_FIRST, next_channel=True) == Deliver(
        ANNA, 1, EMAIL, "anna@ward7.example", has_next_channel=False
    )
    assert after_failure(ANNA, 1, SMS_FIRST, next_channel=True) == ToFallback(
        "every channel of person:anna failed"
    )
    # Retries exhausted with no next channel allowed: straight to the fallback address.
    assert after_failure(ANNA, 0, SMS_FIRST, next_channel=False) == ToFallback(
        "every channel of person:anna failed"
    )
    # The fallback address itself failing has nowhere left to go.
    assert after_failure(TEAM_FALLBACK, 0, (), next_channel=False) is None
