"""The pure escalation engine, on-call rotations, acknowledgement tokens, channel failover and the
heartbeat verdict: every decision driven by an injected clock, no I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta

import pytest

from services.notify.domain.ack_token import (
    AckClaim,
    InvalidAckToken,
    sign_ack_token,
    verify_ack_token,
)
from services.notify.domain.channel_failover import (
    Delivered,
    GiveUp,
    NextChannel,
    RetryLater,
    after_attempt,
)
from services.notify.domain.escalation import (
    Acknowledge,
    EscalationStatus,
    NotifyFallback,
    NotifyRecipient,
    PolicySnapshot,
    Resolve,
    Snooze,
    StepSnapshot,
    Target,
    Tick,
    Transition,
    advance,
    opened,
    page_until_acknowledged,
    snapshot_from_json,
    snapshot_to_json,
)
from services.notify.domain.heartbeat import PipelineVerdict, pipeline_verdict
from services.notify.domain.routing import UNASSIGNED_CARE_TEAM, PagePurpose
from services.notify.domain.schedule import Override, Rotation, on_call_at
from services.notify.service_layer.escalation import (
    UNROUTABLE_POLICY_PREFIX,
    EscalationConfig,
    fallback_chain,
)

T0 = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)


def _policy(repeat: int = 1) -> PolicySnapshot:
    """primary on call -> wait 5 min -> secondary -> wait 5 min -> attending, repeated."""
    rotation = Rotation(
        schedule_id="nurses",
        timezone="Europe/London",
        start_date=date(2025, 2, 1),
        handoff_time=time(8, 0),
        shift_days=1,
        participants=("nurse-a", "nurse-b"),
    )
    return PolicySnapshot(
        policy_id="onc",
        steps=(
            StepSnapshot(targets=(Target("schedule", "nurses"),), wait_s=300),
            StepSnapshot(targets=(Target("person", "fellow"),), wait_s=300),
            StepSnapshot(targets=(Target("person", "attending"),), wait_s=600),
        ),
        repeat_count=repeat,
        schedules={"nurses": rotation},
    )


def _recipients(transition: Transition) -> list[str]:
    return [c.recipient for c in transition.commands if isinstance(c, NotifyRecipient)]


def test_each_step_fires_at_its_delay_and_not_a_moment_before() -> None:
    """Step 2 is due exactly 5 minutes after step 1; a tick one second early pages nobody."""
    policy = _policy()
    first = advance(policy, opened(T0), Tick(T0))
    assert len(_recipients(first)) == 1
    assert first.state.due_at == T0 + timedelta(minutes=5)

    early = advance(policy, first.state, Tick(T0 + timedelta(minutes=5) - timedelta(seconds=1)))
    assert early.commands == () and early.state == first.state

    second = advance(policy, first.state, Tick(T0 + timedelta(minutes=5)))
    assert _recipients(second) == ["person:fellow"]
    assert second.state.due_at == T0 + timedelta(minutes=10)


def test_chain_repeats_k_times_then_stops() -> None:
    """With repeat_count=1 the three steps run twice, then the chain is exhausted with no timer."""
    policy = _policy(repeat=1)
    state, now, fired = opened(T0), T0, []
    for _ in range(10):
        transition = advance(policy, state, Tick(now))
        fired += _recipients(transition)
        state = transition.state
        if state.due_at is None:
            break
        now = state.due_at
    assert len(fired) == 6
    assert fired[1::3] == ["person:fellow", "person:fellow"]
    assert state.status is EscalationStatus.EXHAUSTED


def test_acknowledge_stops_the_chain_and_no_later_tick_pages() -> None:
    """After an acknowledgement the timer is gone; ticks at any later time page nobody."""
    policy = _policy()
    first = advance(policy, opened(T0), Tick(T0))
    acked = advance(policy, first.state, Acknowledge(by="person:nurse-a", at=T0, via="sms"))
    assert acked.state.status is EscalationStatus.ACKNOWLEDGED
    assert acked.state.due_at is None
    for minutes in (5, 10, 60, 600):
        late = advance(policy, acked.state, Tick(T0 + timedelta(minutes=minutes)))
        assert late.commands == ()


def test_second_acknowledgement_keeps_the_first_acknowledger() -> None:
    """Two people acknowledge: the audit keeps who was first, the second is recorded as a repeat."""
    policy = _policy()
    state = advance(policy, opened(T0), Tick(T0)).state
    first = advance(policy, state, Acknowledge(by="person:a", at=T0, via="api"))
    second = advance(policy, first.state, Acknowledge(by="person:b", at=T0, via="link"))
    assert second.state.acknowledged_by == "person:a"
    assert [e.kind for e in second.timeline] == ["ack_repeated"]


def test_resolve_sends_all_clear_to_everyone_paged_even_after_ack() -> None:
    """The all-clear goes to each person paged so far; ack and clear are separate axes."""
    policy = _policy()
    state = advance(policy, opened(T0), Tick(T0)).state
    state = advance(policy, state, Tick(T0 + timedelta(minutes=5))).state
    state = advance(policy, state, Acknowledge(by="person:fellow", at=T0, via="api")).state
    resolved = advance(policy, state, Resolve(at=T0 + timedelta(minutes=20)))
    assert resolved.state.status is EscalationStatus.RESOLVED
    assert resolved.state.acknowledged_by == "person:fellow"
    assert all(isinstance(c, NotifyRecipient) for c in resolved.commands)
    assert {c.purpose for c in resolved.commands if isinstance(c, NotifyRecipient)} == {
        PagePurpose.ALL_CLEAR
    }
    assert sorted(_recipients(resolved)) == sorted(state.paged)
    assert len(resolved.commands) == 2


def test_snooze_holds_exactly_its_duration() -> None:
    """A 30-minute snooze: nothing one microsecond before its end, the first step right at it."""
    policy = _policy()
    state = advance(policy, opened(T0), Tick(T0)).state
    until = T0 + timedelta(minutes=30)
    snoozed = advance(policy, state, Snooze(until=until, at=T0, by="person:nurse-a")).state
    assert advance(policy, snoozed, Tick(T0 + timedelta(minutes=5))).commands == ()
    assert advance(policy, snoozed, Tick(until - timedelta(microseconds=1))).commands == ()
    again = advance(policy, snoozed, Tick(until))
    assert len(_recipients(again)) == 1
    assert again.state.step_index == 1


def test_each_snooze_starts_a_new_round_that_later_steps_keep() -> None:
    """The round number rises with every snooze and stays through the round's later steps, so
    the shell can key the repeated first step apart from the page already sent."""
    policy = _policy()
    state = advance(policy, opened(T0), Tick(T0)).state
    assert state.round_no == 0
    until = T0 + timedelta(minutes=30)
    snoozed = advance(policy, state, Snooze(until=until, at=T0, by="person:nurse-a")).state
    fired = advance(policy, snoozed, Tick(until)).state
    assert (snoozed.round_no, fired.round_no) == (1, 1)
    assert advance(policy, fired, Tick(fired.due_at or until)).state.round_no == 1
    twice = advance(policy, fired, Snooze(until=until + timedelta(hours=1), at=until, by="x"))
    assert twice.state.round_no == 2


def test_schedule_without_anyone_on_call_pages_the_fallback() -> None:
    """A rotation that has not started yet names nobody: the step pages the fallback instead."""
    rotation = Rotation(
        schedule_id="later",
        timezone="UTC",
        start_date=date(2030, 1, 1),
        handoff_time=time(8, 0),
        shift_days=7,
        participants=("x",),
    )
    policy = PolicySnapshot(
        policy_id="p",
        steps=(StepSnapshot(targets=(Target("schedule", "later"),), wait_s=60),),
        repeat_count=0,
        schedules={"later": rotation},
    )
    transition = advance(policy, opened(T0), Tick(T0))
    assert [type(c) for c in transition.commands] == [NotifyFallback]
    assert "fallback:" in transition.state.paged


def test_snapshot_round_trips_through_json() -> None:
    """The snapshot stored on the escalation row reads back as the same policy."""
    policy = _policy()
    policy.schedules["nurses"] = Rotation(
        schedule_id="nurses",
        timezone="Europe/London",
        start_date=date(2025, 2, 1),
        handoff_time=time(8, 0),
        shift_days=1,
        participants=("nurse-a", "nurse-b"),
        overrides=(Override("nurse-c", T0, T0 + timedelta(hours=2)),),
    )
    assert snapshot_from_json(snapshot_to_json(policy)) == policy


# -- rotations ----------------------------------------------------------------------------------


def _daily(tz: str = "Europe/London") -> Rotation:
    return Rotation(
        schedule_id="s",
        timezone=tz,
        start_date=date(2025, 3, 1),
        handoff_time=time(8, 0),
        shift_days=1,
        participants=("a", "b", "c"),
    )


def test_handoff_happens_at_local_wall_clock_time() -> None:
    """At 07:59 London the previous shift is on; at 08:00 the next person takes over."""
    rotation = _daily()
    assert on_call_at(rotation, datetime(2025, 3, 2, 7, 59, tzinfo=UTC)) == "a"
    assert on_call_at(rotation, datetime(2025, 3, 2, 8, 0, tzinfo=UTC)) == "b"


def test_handoff_stays_at_local_eight_across_daylight_saving() -> None:
    """After the clocks go forward (30 March 2025) the 08:00 London hand-off is 07:00 UTC."""
    rotation = _daily()
    assert on_call_at(rotation, datetime(2025, 3, 31, 6, 59, tzinfo=UTC)) == on_call_at(
        rotation, datetime(2025, 3, 30, 12, 0, tzinfo=UTC)
    )
    before, after = (
        on_call_at(rotation, datetime(2025, 3, 31, 6, 59, tzinfo=UTC)),
        on_call_at(rotation, datetime(2025, 3, 31, 7, 0, tzinfo=UTC)),
    )
    assert before != after


def test_override_wins_inside_its_window_only() -> None:
    """An override covers [start, end): the rotation is back at its end."""
    start = datetime(2025, 3, 1, 20, 0, tzinfo=UTC)
    base = _daily()
    rotation = Rotation(
        schedule_id=base.schedule_id,
        timezone=base.timezone,
        start_date=base.start_date,
        handoff_time=base.handoff_time,
        shift_days=base.shift_days,
        participants=base.participants,
        overrides=(Override("cover", start, start + timedelta(hours=4)),),
    )
    assert on_call_at(rotation, start - timedelta(seconds=1)) == "a"
    assert on_call_at(rotation, start) == "cover"
    assert on_call_at(rotation, start + timedelta(hours=4)) == "a"


def test_unknown_time_zone_is_refused() -> None:
    """A typo in a time zone fails when the schedule is defined, not at 3 a.m."""
    with pytest.raises(Exception, match="Mars"):
        _daily("Mars/Olympus")


# -- acknowledgement tokens ---------------------------------------------------------------------


def test_ack_token_verifies_and_refuses_tampering_and_expiry() -> None:
    """A signed token is accepted before expiry, refused after it, and refused when altered."""
    claim = AckClaim(uuid.uuid4(), "person:a", T0 + timedelta(hours=1))
    token = sign_ack_token(claim, b"k" * 32)
    assert verify_ack_token(token, b"k" * 32, now=T0) == claim
    with pytest.raises(InvalidAckToken, match="expired"):
        verify_ack_token(token, b"k" * 32, now=T0 + timedelta(hours=1))
    with pytest.raises(InvalidAckToken, match="signature"):
        verify_ack_token(token, b"other-secret" * 3, now=T0)
    body, mac = token.split(".")
    with pytest.raises(InvalidAckToken):
        verify_ack_token(body[:-2] + "AA." + mac, b"k" * 32, now=T0)


# -- channel failover ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accepted", "permanent", "tries", "has_next", "expected"),
    [
        (True, False, 1, True, Delivered),
        (False, False, 1, True, RetryLater),
        (False, False, 2, True, RetryLater),
        (False, False, 3, True, NextChannel),
        (False, True, 1, True, NextChannel),
        (False, True, 1, False, GiveUp),
        (False, False, 3, False, GiveUp),
    ],
)
def test_failover_after_an_attempt(
    accepted: bool, permanent: bool, tries: int, has_next: bool, expected: type
) -> None:
    """Retry a transient failure up to max_tries (3), then move on; a permanent one moves now."""
    verdict = after_attempt(
        accepted=accepted,
        permanent=permanent,
        tries=tries,
        max_tries=3,
        has_next_channel=has_next,
        base_s=2,
        cap_s=60,
    )
    assert isinstance(verdict, expected)


# -- heartbeat ----------------------------------------------------------------------------------


def test_heartbeat_verdict_edges() -> None:
    """Silent only strictly past the timeout; paged once; recovered when a heartbeat returns."""
    seen = T0
    at_edge = pipeline_verdict(
        last_seen_at=seen, silent_since=None, now=T0 + timedelta(seconds=60), timeout_s=60
    )
    past = pipeline_verdict(
        last_seen_at=seen, silent_since=None, now=T0 + timedelta(seconds=61), timeout_s=60
    )
    again = pipeline_verdict(
        last_seen_at=seen, silent_since=seen, now=T0 + timedelta(seconds=90), timeout_s=60
    )
    back = pipeline_verdict(
        last_seen_at=T0 + timedelta(seconds=95),
        silent_since=seen,
        now=T0 + timedelta(seconds=96),
        timeout_s=60,
    )
    assert (at_edge, past, again, back) == (
        PipelineVerdict.HEALTHY,
        PipelineVerdict.WENT_SILENT,
        PipelineVerdict.STILL_SILENT,
        PipelineVerdict.RECOVERED,
    )


# -- the fallback chain of an alert no policy covers --------------------------------------------


def _fired_at(policy: PolicySnapshot) -> list[tuple[datetime, list[str]]]:
    """Every tick that paged, with whom, following the chain's own timer with nobody acking."""
    state, now, fired = opened(T0), T0, []
    for _ in range(20):
        transition = advance(policy, state, Tick(now))
        if _recipients(transition):
            fired.append((now, _recipients(transition)))
        state = transition.state
        if state.due_at is None:
            break
        now = state.due_at
    assert state.status is EscalationStatus.EXHAUSTED
    return fired


def test_default_shape_pages_every_five_minutes_four_times() -> None:
    """``page_until_acknowledged`` (a team's default policy and the fallback chain): the address
    at 0, 5, 10 and 15 minutes, then exhausted with no fifth page."""
    fired = _fired_at(page_until_acknowledged("default:CT-1", "oncall@h.test"))
    assert fired == [(T0 + timedelta(minutes=m), ["email:oncall@h.test"]) for m in (0, 5, 10, 15)]


def test_fallback_chain_pages_the_configured_address_under_the_unassigned_team() -> None:
    """An unregistered patient's alert is filed under ``unassigned`` and pages the configured
    fallback address; a team without policy or address keeps its own id. Wait and repeats
    come from the configuration."""
    config = EscalationConfig(
        sender_address="vigil@localhost",
        public_base_url="http://notify.test",
        ack_secret=b"x" * 32,
        fallback_email="night-desk@h.test",
        fallback_wait_s=120,
        fallback_repeats=1,
    )
    team, policy = fallback_chain(None, config)
    assert team == UNASSIGNED_CARE_TEAM
    assert policy.policy_id == f"{UNROUTABLE_POLICY_PREFIX}{UNASSIGNED_CARE_TEAM}"
    assert _fired_at(policy) == [
        (T0, ["email:night-desk@h.test"]),
        (T0 + timedelta(minutes=2), ["email:night-desk@h.test"]),
    ]
    assert fallback_chain("CT-9", config)[0] == "CT-9"
