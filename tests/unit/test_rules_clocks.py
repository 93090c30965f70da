"""InfusionClocks: the bag clock (a bag at risk of running dry: no new bag recorded and predicted
empty within the care team's lead time) and the interruption clock (page at 30 min, escalate
at 2 h, before the 4-hour restart limit)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.device import PumpAlarmCode, PumpEventKind, PumpState
from schemas.events import AlertPhase, AlertPriority
from services.rules.domain.config import RulesConfig, Thresholds
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
# The bag tests below check the clock's mechanics with a two-hour lead (a team that wants the
# page that early); the default lead is 30 min (test_routine_bag_change_pages_no_one).
LEAD_120 = RulesConfig(defaults=Thresholds(bag_change_lead_minutes=120))


def running_statuses(
    home: Home, until: int, *, rate: float = 10.0, start_ml: float = 240.0, every: int = 5
) -> list:
    """A pump running at ``rate`` from ``start_ml``, reporting every ``every`` minutes."""
    return [
        home.status(m, rate_ml_h=rate, remaining_ml=max(0.0, start_ml - rate * m / 60))
        for m in range(0, until + 1, every)
    ]


def test_bag_change_due_pages_two_hours_before_predicted_empty() -> None:
    """240 mL at 10 mL/h is empty at 24 h: 'bag change due' fires at 22 h, medium."""
    home = Home("P-bag-1", T0)
    alerts = run_stream(RulesEngine(LEAD_120), running_statuses(home, 22 * 60 + 5))
    due = [a for a in alerts if a.code == "bag_change_due"]
    assert len(due) == 1
    assert due[0].priority is AlertPriority.MEDIUM
    assert due[0].device_time == T0 + timedelta(hours=22)
    left = due[0].evidence[0]
    # Counted from the newest status (22:05 device time), which arrived before the timer fired:
    # 115 min left then, and its device time plus the minutes is the predicted empty time.
    assert left.name == "minutes_to_empty" and left.value == 115
    assert left.device_time == T0 + timedelta(hours=22, minutes=5)
    assert left.device_time + timedelta(minutes=left.value) == T0 + timedelta(hours=24)


def test_bag_change_title_carries_no_relative_or_clock_time() -> None:
    """The title is read long after the timer fired, in the care team's zone: it must carry
    neither a countdown nor a UTC clock time (the evidence carries both, anchored)."""
    home = Home("P-bag-title", T0)
    due = [
        a
        for a in run_stream(RulesEngine(LEAD_120), running_statuses(home, 22 * 60 + 5))
        if a.code == "bag_change_due"
    ]
    assert due[0].title == "Bag at risk of running dry: no new bag recorded"
    assert "min" not in due[0].title and "UTC" not in due[0].title


def test_bag_change_when_the_deadline_had_passed_before_the_data_arrived() -> None:
    """The first status already has only 10 min left (the lead is 120): the page's time left is
    the 10 min of that status, at its device time, not the 120-min lead counted from the
    deadline (which lies before the data)."""
    home = Home("P-bag-late", T0)
    # 10 mL/h with 10 min of drug left (1.67 mL), reporting every minute.
    events = [
        home.status(m, rate_ml_h=10.0, remaining_ml=10.0 * (10 - m) / 60) for m in (0, 1, 2, 3)
    ]
    due = [a for a in run_stream(RulesEngine(LEAD_120), events) if a.code == "bag_change_due"]
    assert len(due) == 1
    left = due[0].evidence[0]
    assert left.name == "minutes_to_empty"
    assert left.value <= 10.0
    assert left.value != 120
    # The time left plus its device time is the predicted empty time of the data, never later.
    assert left.device_time + timedelta(minutes=left.value) <= T0 + timedelta(minutes=10)


def test_bag_change_not_due_one_minute_before() -> None:
    """With the watermark one minute short of 22 h, no bag alert yet."""
    home = Home("P-bag-2", T0)
    events = running_statuses(home, 22 * 60, every=1)  # newest 22:00, watermark 21:59
    assert "bag_change_due" not in {a.code for a in run_stream(RulesEngine(LEAD_120), events)}


def test_bag_change_resolved_by_a_new_bag_and_the_clock_restarts() -> None:
    """A bag_changed event ends the alert; the new bag gets its own clock and dedup key."""
    home = Home("P-bag-3", T0)
    events = running_statuses(home, 22 * 60 + 5, every=5)
    engine = RulesEngine(LEAD_120)
    first = [a for a in run_stream(engine, events) if a.code == "bag_change_due"]
    ended = engine.on_telemetry(home.pump_event(22 * 60 + 10, PumpEventKind.BAG_CHANGED))
    assert [(a.code, a.phase) for a in ended] == [("bag_change_due", AlertPhase.END)]
    assert ended[0].dedup_key == first[0].dedup_key
    later = run_stream(
        engine,
        [home.status(22 * 60 + 15 + m, remaining_ml=240 - 10 * m / 60) for m in range(0, 1326, 5)],
    )
    again = [a for a in later if a.code == "bag_change_due"]
    assert len(again) == 1 and again[0].dedup_key != first[0].dedup_key


def test_stopped_pump_has_no_bag_prediction() -> None:
    """A stopped pump is not emptying its bag: no 'bag change due' from it."""
    home = Home("P-bag-4", T0)
    events = [home.status(m, state=PumpState.STOPPED, remaining_ml=10) for m in range(0, 60, 5)]
    assert "bag_change_due" not in {a.code for a in run_stream(RulesEngine(LEAD_120), events)}


def test_bag_prediction_from_stale_status_does_not_page() -> None:
    """A pump silent since 20 h: at 22 h its prediction is stale: device silent, no bag page."""
    home = Home("P-bag-5", T0)
    events = running_statuses(home, 20 * 60)
    other = Home("P-bag-5-clock", T0)  # another patient keeps the stream (watermark) moving
    events += [other.temp(m, 36.8) for m in range(20 * 60, 22 * 60 + 10, 5)]
    codes = [a.code for a in run_stream(RulesEngine(LEAD_120), events) if a.patient_id == "P-bag-5"]
    assert codes == ["device_silent"]


def stop_at(home: Home, minute: int, *, until: int) -> list:
    """Running until ``minute``, stopped from then on, statuses every 5 min until ``until``."""
    return [
        home.status(m, state=PumpState.RUNNING if m < minute else PumpState.STOPPED)
        for m in range(0, until + 1, 5)
    ]


def test_interruption_pages_at_30_min_and_escalates_at_2_h() -> None:
    """Stopped at minute 10: medium page at 40, high escalation at 130, same dedup key."""
    home = Home("P-int-1", T0)
    alerts = run_stream(RulesEngine(), stop_at(home, 10, until=200))
    clock = [a for a in alerts if a.code == "infusion_interrupted"]
    assert [(a.phase, a.priority) for a in clock] == [
        (AlertPhase.START, AlertPriority.MEDIUM),
        (AlertPhase.ESCALATE, AlertPriority.HIGH),
    ]
    assert clock[0].device_time == T0 + timedelta(minutes=40)
    assert clock[1].device_time == T0 + timedelta(minutes=130)
    assert clock[0].dedup_key == clock[1].dedup_key


def test_interruption_one_second_short_does_not_page() -> None:
    """Watermark at 29 min 59 s of stopped time: no page."""
    home = Home("P-int-2", T0)
    engine = RulesEngine(RulesConfig(allowed_lateness_s=0))
    events = [
        home.status(0, state=PumpState.STOPPED),
        home.status(29 + 59 / 60, state=PumpState.STOPPED),
    ]
    assert run_stream(engine, events) == []
    assert [a.code for a in engine.on_telemetry(home.status(30, state=PumpState.STOPPED))] == [
        "infusion_interrupted"
    ]


def test_restart_before_30_min_does_not_page_and_ends_a_paged_interruption() -> None:
    """Restarted after 20 min: nothing. Restarted after 45 min: an all clear for the page."""
    home = Home("P-int-3", T0)
    short = stop_at(home, 0, until=20) + [home.status(m) for m in range(25, 90, 5)]
    assert "infusion_interrupted" not in {a.code for a in run_stream(RulesEngine(), short)}
    home = Home("P-int-4", T0)
    long = stop_at(home, 0, until=45) + [home.status(m) for m in range(50, 90, 5)]
    clock = [a for a in run_stream(RulesEngine(), long) if a.code == "infusion_interrupted"]
    assert [a.phase for a in clock] == [AlertPhase.START, AlertPhase.END]


def test_brief_restarts_accumulate_stopped_time() -> None:
    """Stopped 20 min, running 5 min, stopped again: the second stop pages 10 min in (20+10)."""
    home = Home("P-int-5", T0)
    events = [
        home.status(0, state=PumpState.STOPPED),
        home.status(20),
        home.status(25, state=PumpState.STOPPED),
    ]
    events += [home.status(m, state=PumpState.STOPPED) for m in range(30, 50, 5)]
    clock = [a for a in run_stream(RulesEngine(), events) if a.code == "infusion_interrupted"]
    assert len(clock) == 1
    assert clock[0].device_time == T0 + timedelta(minutes=35)


def test_occlusion_starts_the_interruption_clock() -> None:
    """An occlusion stops the drug: the clock starts at the alarm even before a status says so."""
    home = Home("P-int-6", T0)
    events = [home.status(0), home.alarm(1, PumpAlarmCode.OCCLUSION_UPSTREAM)]
    events += [home.temp(m, 36.8) for m in range(5, 40, 5)]  # the stream moves on
    clock = [a for a in run_stream(RulesEngine(), events) if a.code == "infusion_interrupted"]
    assert clock and clock[0].device_time == T0 + timedelta(minutes=31)


def test_interruption_points_are_configurable() -> None:
    """A protocol paging at 15 min pages at 15."""
    config = RulesConfig(defaults=Thresholds(interruption_page_minutes=15))
    home = Home("P-int-7", T0)
    alerts = run_stream(RulesEngine(config), stop_at(home, 0, until=20))
    clock = [a for a in alerts if a.code == "infusion_interrupted"]
    assert clock[0].device_time == T0 + timedelta(minutes=15)


def test_out_of_order_old_status_does_not_restart_the_clock() -> None:
    """A 'running' status from before the stop, arriving late, does not end the interruption."""
    home = Home("P-int-8", T0)
    early = home.status(0)
    events = [home.status(5, state=PumpState.STOPPED)]
    events += [home.status(m, state=PumpState.STOPPED) for m in range(10, 45, 5)]
    events.insert(2, early)
    clock = [a for a in run_stream(RulesEngine(), events) if a.code == "infusion_interrupted"]
    assert [a.phase for a in clock] == [AlertPhase.START]


def test_routine_bag_change_pages_no_one_and_a_forgotten_one_pages_at_30_min() -> None:
    """Default lead 30 min. A bag changed on schedule, 40 min before the old one would run
    empty, pages no one (routine work is not an alarm). The same bag not changed pages "at
    risk of running dry" 30 min before empty. The edge: changed 31 min before empty, no
    page; the clock at 30 min before empty with no change, the page."""
    home = Home("P-bag-routine", T0)
    # 240 mL at 10 mL/h: empty at 24 h (1440 min).
    routine = running_statuses(home, 1400, every=1)
    routine.append(home.pump_event(1400, PumpEventKind.BAG_CHANGED))
    routine += [home.status(m, remaining_ml=250 - 10 * (m - 1400) / 60) for m in range(1401, 1500)]
    assert "bag_change_due" not in {a.code for a in run_stream(RulesEngine(), routine)}
    forgotten = Home("P-bag-forgotten", T0)
    alerts = run_stream(RulesEngine(), running_statuses(forgotten, 1420, every=1))
    due = [a for a in alerts if a.code == "bag_change_due"]
    assert len(due) == 1 and due[0].device_time == T0 + timedelta(minutes=1410)
    edge = Home("P-bag-edge", T0)
    just_in_time = running_statuses(edge, 1409, every=1)
    just_in_time.append(edge.pump_event(1409, PumpEventKind.BAG_CHANGED))
    just_in_time += [edge.status(m, remaining_ml=250.0) for m in range(1410, 1420)]
    assert "bag_change_due" not in {a.code for a in run_stream(RulesEngine(), just_in_time)}
