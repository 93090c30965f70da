"""The rules' timer wheel: schedule, cancel, pop on two clocks, order of equal deadlines."""

from __future__ import annotations

from services.rules.domain.timers import ARRIVAL, CLINICAL, Timer, TimerWheel

NEG = float("-inf")


def taken(wheel: TimerWheel, heard: float, watermark: float = NEG) -> list[Timer]:
    now = max(heard, watermark)
    out = []
    while (timer := wheel.pop(heard, now)) is not None:
        out.append(timer)
    return out


def file(wheel: TimerWheel, lane: int, timer: Timer) -> None:
    wheel.schedule(lane, *timer)


def test_a_timer_is_due_at_its_deadline_and_not_a_moment_before() -> None:
    wheel = TimerWheel()
    file(wheel, ARRIVAL, Timer(100.0, "silent", "P", "thermo"))
    assert not wheel.due(99.9, NEG)
    assert taken(wheel, 99.9) == []
    assert wheel.due(100.0, NEG)
    assert taken(wheel, 100.0) == [Timer(100.0, "silent", "P", "thermo")]
    assert len(wheel) == 0 and taken(wheel, 1e9) == []


def test_arrival_timers_run_on_the_arrival_clock_and_clinical_on_the_later_clock() -> None:
    """The watermark alone does not make an absence due; it does make a pump clock due."""
    wheel = TimerWheel()
    file(wheel, ARRIVAL, Timer(100.0, "silent", "P", "pump"))
    file(wheel, CLINICAL, Timer(100.0, "bag", "P", "pump"))
    assert taken(wheel, heard=50.0, watermark=150.0) == [Timer(100.0, "bag", "P", "pump")]
    assert not wheel.due(50.0, 150.0)
    assert taken(wheel, heard=100.0, watermark=NEG) == [Timer(100.0, "silent", "P", "pump")]


def test_pop_takes_in_deadline_order_then_kind_patient_device_across_lanes() -> None:
    wheel = TimerWheel()
    timers = [
        (ARRIVAL, Timer(30.0, "silent", "P-2", "b")),
        (CLINICAL, Timer(20.0, "interruption", "P-1", "pump")),
        (ARRIVAL, Timer(20.0, "silent", "P-1", "thermo")),
        (CLINICAL, Timer(20.0, "bag", "P-2", "pump")),
        (ARRIVAL, Timer(20.0, "lost", "P-1", "thermo")),
        (ARRIVAL, Timer(20.0, "silent", "P-1", "a")),
        (CLINICAL, Timer(10.0, "interruption", "P-9", "pump")),
    ]
    for lane, timer in timers:
        file(wheel, lane, timer)
    assert taken(wheel, 40.0, 40.0) == sorted(t for _, t in timers)


def test_a_cancelled_timer_never_fires_and_one_scheduled_again_does() -> None:
    wheel = TimerWheel()
    first = Timer(10.0, "bag", "P", "pump")
    later = Timer(20.0, "bag", "P", "pump")
    file(wheel, CLINICAL, first)
    file(wheel, CLINICAL, later)
    wheel.cancel(first)
    assert taken(wheel, 15.0, 15.0) == []
    assert taken(wheel, 25.0, 25.0) == [later]
    file(wheel, ARRIVAL, first)
    wheel.cancel(first)
    file(wheel, ARRIVAL, first)
    assert taken(wheel, 15.0) == [first]


def test_a_timer_scheduled_between_pops_fires_in_the_same_pass_when_due() -> None:
    """A consumer that re-arms at a later deadline already passed sees it in order."""
    wheel = TimerWheel()
    file(wheel, ARRIVAL, Timer(10.0, "silent", "P", "a"))
    file(wheel, ARRIVAL, Timer(30.0, "silent", "P", "c"))
    seen = []
    while (timer := wheel.pop(40.0, 40.0)) is not None:
        seen.append(timer)
        if timer.device_id == "a":
            file(wheel, ARRIVAL, Timer(20.0, "silent", "P", "b"))
            file(wheel, ARRIVAL, Timer(50.0, "silent", "P", "d"))
    assert [t.device_id for t in seen] == ["a", "b", "c"]
    assert len(wheel) == 1


def test_extend_files_many_at_once_in_the_same_order() -> None:
    wheel = TimerWheel()
    wheel.extend(ARRIVAL, [Timer(3.0, "silent", "P", "x"), Timer(1.0, "lost", "P", "x")])
    wheel.extend(CLINICAL, [Timer(2.0, "bag", "P", "pump")])
    assert [t.deadline for t in taken(wheel, 5.0, 5.0)] == [1.0, 2.0, 3.0]
    file(wheel, ARRIVAL, Timer(1.0, "silent", "P", "x"))
    wheel.clear()
    assert len(wheel) == 0 and not wheel.due(1e9, 1e9)
