"""Simulated home courses: deterministic per seed, and the device behaviours they claim."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from schemas.device import PumpEvent, PumpEventKind, PumpStatus, TemperatureReading
from vigil_tools.simulator.course import (
    CourseSpec,
    EventKind,
    ThermometerKind,
    _Body,
    _Fever,
    _fever_truth,
    plan_course,
)

SPEC = CourseSpec(patients=4, days=3.0, seed=7, id_prefix="PT")


def _stream(spec: CourseSpec) -> list[tuple[str, bytes, str]]:
    return [
        (d.topic, d.payload(), d.deliver_at.isoformat()) for d in plan_course(spec).deliveries()
    ]


def test_same_seed_same_course_other_seed_another() -> None:
    first, again = plan_course(SPEC), plan_course(SPEC)
    assert [e.to_json() for e in first.ground_truth] == [e.to_json() for e in again.ground_truth]
    assert _stream(SPEC) == _stream(SPEC)
    other = CourseSpec(patients=4, days=3.0, seed=8, id_prefix="PT")
    assert _stream(other) != _stream(SPEC)


def test_spot_checks_follow_home_times_and_re_measure_during_a_fever() -> None:
    spec = CourseSpec(patients=6, days=6.0, seed=3, id_prefix="PT")
    course = plan_course(spec)
    zone = ZoneInfo(spec.zone)
    for home in course.homes:
        readings = [
            d.message
            for d in course.deliveries()
            if isinstance(d.message, TemperatureReading) and d.device_id == home.thermometer_id
        ]
        times = sorted(r.device_time for r in readings)
        fevers = [e for e in home.events if e.kind is EventKind.FEVER]
        if home.thermometer is ThermometerKind.PATCH:
            gaps = {b - a for a, b in itertools.pairwise(times)}
            assert gaps == {timedelta(minutes=5)}
            probe_off = [e for e in home.events if e.kind is EventKind.PROBE_OFF]
            off = [r for r in readings if r.value < 35.05]
            assert off and all(
                any(e.start <= r.device_time < e.end for e in probe_off) for r in off
            )
            assert all(33.0 <= r.value <= 35.0 for r in off)
            continue
        in_fever = [
            t for t in times if any(f.start <= t <= f.end + timedelta(hours=3) for f in fevers)
        ]
        routine = [t for t in times if t not in in_fever]
        # About four a day, all at waking hours (06:45-22:00 local).
        assert 3.0 * spec.days <= len(routine) <= 4.0 * spec.days
        for t in routine:
            local = t.astimezone(zone)
            assert 6 <= local.hour < 22, local
        # During each fever: noticed, then re-measured about hourly.
        for fever in fevers:
            during = [t for t in times if fever.start <= t <= fever.end]
            spacing = [b - a for a, b in itertools.pairwise(during)]
            assert during and all(g <= timedelta(minutes=75) for g in spacing)


def test_dropouts_buffer_with_original_times_ids_and_seqs() -> None:
    course = plan_course(SPEC)
    deliveries = list(course.deliveries())
    assert [d.deliver_at for d in deliveries] == sorted(d.deliver_at for d in deliveries)
    buffered = [d for d in deliveries if d.buffered]
    assert buffered
    dropouts = {h.patient_id: h.dropouts() for h in course.homes}
    for d in buffered:
        patient = d.device_id.split("-", 1)[1]
        (window,) = [w for w in dropouts[patient] if w.start <= d.message.device_time < w.end]
        # Forwarded when the link is back, carrying the time the device measured it.
        assert d.deliver_at == window.end > d.message.device_time
    # Per device: seqs count up without a gap in delivery order, ids are unique.
    per_device: dict[str, list[int]] = {}
    for d in deliveries:
        per_device.setdefault(d.device_id, []).append(d.message.seq)
    for seqs in per_device.values():
        assert seqs == list(range(1, len(seqs) + 1))
    assert len({d.message.message_id for d in deliveries}) == len(deliveries)


def test_pumps_report_every_minute_change_bags_and_show_their_events() -> None:
    course = plan_course(SPEC)
    deliveries = list(course.deliveries())
    for home in course.homes:
        statuses = [
            d.message
            for d in deliveries
            if d.device_id == home.pump_id and isinstance(d.message, PumpStatus)
        ]
        times = sorted(s.device_time for s in statuses)
        assert {b - a for a, b in itertools.pairwise(times)} == {timedelta(minutes=1)}
        events = Counter(
            d.message.event
            for d in deliveries
            if d.device_id == home.pump_id and isinstance(d.message, PumpEvent)
        )
        # A 24-hour bag: about one change a day, before it runs dry.
        assert SPEC.days - 1 <= events[PumpEventKind.BAG_CHANGED] <= SPEC.days + 1
        assert min(s.volume_remaining_ml for s in statuses) > 0
    truth = Counter(e.kind for e in course.ground_truth)
    assert truth[EventKind.OCCLUSION] and truth[EventKind.FEVER] and truth[EventKind.DROPOUT]
    for e in course.ground_truth:
        assert e.start < e.end and e.start.tzinfo is not None


def _body(baseline: float = 36.8) -> _Body:
    import random

    body = _Body(random.Random(0), ZoneInfo("Europe/Berlin"))
    body.baseline = baseline
    return body


def _local(day: int, hour: int) -> datetime:
    return datetime(2025, 1, day, hour, 0, tzinfo=ZoneInfo("Europe/Berlin"))


def test_a_fever_is_owed_only_when_the_core_meets_the_definition_beyond_the_margin() -> None:
    """The ground truth applies the documented definition to the core with the readings' error
    on the safe side: a plateau nominally 38.1 °C that the 04:00 low pulls to 37.95 °C is
    borderline (readings may show 37.9 or 38.0), the same plateau in the afternoon is a fever."""
    body = _body()
    night = _Fever(_local(7, 2), 38.1, timedelta(hours=4))
    body.fevers.append(night)
    truth = _fever_truth(body, night, "P-1", "thermo-P-1")
    assert truth is not None and truth.kind is EventKind.BORDERLINE_FEVER
    # Its span opens where a reading may first show 38.0 °C (core 37.9 °C).
    assert truth.start < _local(7, 3)
    afternoon = _Fever(_local(8, 13), 38.1, timedelta(hours=4))
    body.fevers.append(afternoon)
    truth = _fever_truth(body, afternoon, "P-1", "thermo-P-1")
    assert truth is not None and truth.kind is EventKind.FEVER
    assert "min at >= 38.1" in truth.detail


def test_single_and_sustained_edges_of_the_owed_fever() -> None:
    """Owed: the core at 38.4 °C at some minute, or at 38.1 °C for 60 minutes in a row; a peak
    within the margin of 38.3 °C that is brief is borderline; a bump that never nears 38.0 °C is
    no fever at all."""
    flat = _body()
    # Mid-morning the circadian swing is about -0.04 °C.
    single = _Fever(_local(9, 9), 38.5, timedelta(minutes=5), rise=timedelta(minutes=10))
    flat.fevers.append(single)
    owed = _fever_truth(flat, single, "P-1", "t")
    assert owed is not None and owed.kind is EventKind.FEVER
    brief = _Fever(_local(10, 9), 38.3, timedelta(minutes=20), rise=timedelta(minutes=10))
    flat.fevers.append(brief)
    edge = _fever_truth(flat, brief, "P-1", "t")
    assert edge is not None and edge.kind is EventKind.BORDERLINE_FEVER
    low = _Fever(_local(11, 9), 37.6, timedelta(hours=3))
    flat.fevers.append(low)
    assert _fever_truth(flat, low, "P-1", "t") is None


def test_every_fever_of_the_truth_says_its_shape_and_core() -> None:
    """A fever's detail explains its class: its shape and the core's peak and time at 38.1 °C."""
    course = plan_course(CourseSpec(patients=4, days=6.0, seed=1, id_prefix="PT"))
    fevers = [
        e for e in course.ground_truth if e.kind in (EventKind.FEVER, EventKind.BORDERLINE_FEVER)
    ]
    assert fevers
    for event in fevers:
        assert event.detail.split(":")[0] in ("single", "sustained")
        assert "core peak" in event.detail and "min at >= 38.1" in event.detail


def test_a_bag_change_held_up_by_another_pump_event_is_a_true_bag_at_risk() -> None:
    """Seed 1's home 7: a low battery is going on when its bag is due, the change waits, and the
    running bag goes under 30 min of drug (5 mL at 10 mL/h) with no change recorded. The truth
    records it from that status to the bag change; a bag changed on time is never at risk."""
    course = plan_course(CourseSpec(patients=7, days=6.0, seed=1, id_prefix="PT"))
    deliveries = list(course.deliveries())
    at_risk = [e for e in course.ground_truth if e.kind is EventKind.BAG_AT_RISK]
    assert [e.patient_id for e in at_risk] == ["PT-07"]
    for e in at_risk:
        pump = [d.message for d in deliveries if d.device_id == e.device_id]
        (first,) = [m for m in pump if isinstance(m, PumpStatus) and m.device_time == e.start]
        assert first.volume_remaining_ml <= 5.0 and first.state.value == "running"
        before = [m for m in pump if isinstance(m, PumpStatus) and m.device_time < e.start]
        assert before[-1].volume_remaining_ml > 5.0
        changed = [
            m.device_time
            for m in pump
            if isinstance(m, PumpEvent) and m.event is PumpEventKind.BAG_CHANGED
        ]
        assert e.end in changed
