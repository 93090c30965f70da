"""The absence rules on the arrival clock: a home that goes quiet is reported whatever else is
or is not arriving on its partition, and a home whose data arrive late or from a buffer is not
called silent while they arrive.

The pipeline heartbeat (``Pulse``) stands for what moves time on a partition where no patient's
data arrive: ingest writes each heartbeat to every partition.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from schemas.device import PumpState
from schemas.events import Alert, AlertPhase
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import observe
from tests.support.rules import Home, Pulse, delivered_at, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
BEAT_S = 15.0  # the heartbeat publisher's default interval


def codes(alerts: list[Alert], patient_id: str) -> list[tuple[str, AlertPhase]]:
    return [(a.code, a.phase) for a in alerts if a.patient_id == patient_id]


def alone_then_quiet(home: Home, *, temp_c: float = 36.9) -> list:
    """One patient alone on the partition: a pump status and a reading at minute 0, then
    nothing from the home."""
    return [home.status(0), home.temp(0, temp_c)]


def test_a_home_alone_that_goes_quiet_is_reported_within_one_heartbeat_of_the_deadline() -> None:
    """The case no other home can rescue: nothing but heartbeats arrive. The pump's silence
    fires with the first heartbeat past its deadline (last arrival + 15 min), dated at the
    deadline; the delay after it is at most one interval plus the arrival lateness (5 s)."""
    home = Home("P-alone-1", T0)
    pulse = Pulse(T0)
    engine = RulesEngine()
    run_stream(engine, alone_then_quiet(home))
    fired: list[tuple[datetime, Alert]] = []
    for beat in pulse.every(BEAT_S, 0.25, 30):
        for alert in engine.on_telemetry(beat):
            if alert.code == "device_silent":
                fired.append((beat.ingest_time, alert))
    assert [a.device_id for _, a in fired] == [home.pump_id]
    seen_at, alert = fired[0]
    deadline = T0 + timedelta(minutes=15, seconds=1)
    assert alert.device_time == deadline
    assert timedelta(0) <= seen_at - deadline <= timedelta(seconds=BEAT_S + 5)


def test_without_any_record_nothing_moves_and_nothing_fires() -> None:
    """Negative control of the test above: the same quiet home with no heartbeats fires
    nothing, however long it is quiet (the pipeline's own silence is the self-watch's page)."""
    home = Home("P-alone-2", T0)
    engine = RulesEngine()
    assert run_stream(engine, alone_then_quiet(home)) == []
    assert engine.arrival_clock == T0 + timedelta(seconds=1) - timedelta(seconds=5)


def test_silence_edge_a_heartbeat_just_before_the_deadline_fires_nothing() -> None:
    """Edge: the clock (heartbeat ingest - 5 s) one second short of the deadline: quiet; at it:
    the silence."""
    home = Home("P-alone-3", T0)
    pulse = Pulse(T0)
    engine = RulesEngine()
    run_stream(engine, alone_then_quiet(home))
    deadline_plus_lateness = 15 + 6 / 60  # deadline 15:01, lateness 5 s
    before = engine.on_telemetry(pulse.beat(deadline_plus_lateness - 1 / 60))
    assert codes(before, "P-alone-3") == []
    at = engine.on_telemetry(pulse.beat(deadline_plus_lateness))
    assert codes(at, "P-alone-3") == [("device_silent", AlertPhase.START)]


def test_fever_unobserved_fires_on_heartbeats_alone() -> None:
    """A fever open, then the thermometer (and the whole home) silent: "no temperature for
    30 min" fires from heartbeats, dated at the last reading's arrival + 30 min."""
    home = Home("P-alone-4", T0)
    pulse = Pulse(T0)
    engine = RulesEngine()
    first = run_stream(engine, alone_then_quiet(home, temp_c=38.6))
    assert [a.code for a in first] == ["fever_single"]
    later = run_stream(engine, pulse.every(BEAT_S, 0.25, 40))
    unobserved = [a for a in later if a.code == "fever_unobserved"]
    assert len(unobserved) == 1
    assert unobserved[0].device_time == T0 + timedelta(minutes=30, seconds=1)


def test_the_interruption_clock_of_a_stopped_pump_that_went_quiet_fires_on_heartbeats() -> None:
    """A pump that reported "stopped" and then went quiet: the drug is not flowing and the
    restart limit is running. The interruption clock pages at 30 min from heartbeats alone."""
    home = Home("P-alone-5", T0)
    pulse = Pulse(T0)
    engine = RulesEngine()
    run_stream(engine, [home.status(0, state=PumpState.STOPPED), home.temp(0, 36.9)])
    later = run_stream(engine, pulse.every(BEAT_S, 0.25, 40))
    assert "infusion_interrupted" in [a.code for a in later]
    interrupted = next(a for a in later if a.code == "infusion_interrupted")
    assert interrupted.device_time == T0 + timedelta(minutes=30)


def test_the_bag_clock_fires_on_heartbeats_alone() -> None:
    """A bag at risk in 10 min (40 min left at 10 mL/h, lead 30 min) with nothing else
    arriving: "bag change due" fires from heartbeats at its deadline."""
    home = Home("P-alone-6", T0)
    pulse = Pulse(T0)
    engine = RulesEngine()
    run_stream(engine, [home.status(0, remaining_ml=40 * 10 / 60)])
    later = run_stream(engine, pulse.every(BEAT_S, 0.25, 14))
    assert [a.code for a in later if a.patient_id == "P-alone-6"] == ["bag_change_due"]


def test_a_restart_in_the_middle_of_the_silence_fires_the_same_alert() -> None:
    """Rules killed during the silence: an engine restored from the snapshot taken then, fed
    the rest of the heartbeats, fires the same alert (same id, same content) as the engine
    that ran through."""
    home = Home("P-alone-7", T0)
    pulse = Pulse(T0)
    beats = pulse.every(BEAT_S, 0.25, 20)
    through = RulesEngine()
    run_stream(through, alone_then_quiet(home))
    half = len(beats) // 2
    run_stream(through, beats[:half])
    state = orjson.loads(orjson.dumps(through.snapshot()))
    rest_through = run_stream(through, beats[half:])
    restored = RulesEngine()
    restored.restore(state)
    rest_restored = run_stream(restored, beats[half:])
    silent = [a for a in rest_through if a.code == "device_silent"]
    assert silent, "the silence fires after the restart point"
    assert rest_restored == rest_through


def test_a_home_whose_data_always_arrive_late_is_not_silent() -> None:
    """A hub that forwards every status 20 min after the pump took it, steadily, while another
    home is live on the partition: data keep arriving, so the pump is not silent (under the
    event-time watermark it was, every time the live home moved it past 15 min)."""
    slow = Home("P-late-1", T0)
    live = Home("P-live-1", T0)
    events = []
    for m in range(0, 120):
        events.append(live.status(m))
        if m >= 20:
            taken = slow.status(m - 20)
            events.append(delivered_at(taken, T0 + timedelta(minutes=m, seconds=2)))
    events.sort(key=lambda e: e.ingest_time)
    alerts = run_stream(RulesEngine(), events)
    assert codes(alerts, "P-late-1") == []
    # Positive control: the live home's pump, quiet after minute 119, is reported.
    tail = run_stream(RulesEngine(), events + Pulse(T0).every(BEAT_S, 120, 140))
    assert ("device_silent", AlertPhase.START) in codes(tail, "P-live-1")


def test_a_buffer_forwarded_after_a_dropout_ends_the_silence_once_and_never_reopens_it() -> None:
    """A hub offline from minute 10 to 40 while another home is live: the pump's silence is
    paged once (nothing reached us for 15 min), and when the hub forwards its 30 buffered
    statuses (old device times) the silence ends once, with an all clear dated no earlier
    than the alert, and no new silence opens while they arrive."""
    home = Home("P-buffer-1", T0)
    live = Home("P-live-2", T0)
    events = [live.status(m) for m in range(0, 90)]
    events += [home.status(m) for m in range(0, 10)]
    back = T0 + timedelta(minutes=40)
    events += [
        delivered_at(home.status(m), back + timedelta(seconds=(m - 10) / 10)) for m in range(10, 40)
    ]
    events += [home.status(m) for m in range(40, 90)]
    events.sort(key=lambda e: e.ingest_time)
    alerts = [a for a in run_stream(RulesEngine(), events) if a.patient_id == "P-buffer-1"]
    assert [(a.code, a.phase) for a in alerts] == [
        ("device_silent", AlertPhase.START),
        ("device_silent", AlertPhase.END),
    ]
    start, end = alerts
    assert start.device_time == T0 + timedelta(minutes=9, seconds=1) + timedelta(minutes=15)
    assert end.device_time >= start.device_time
    assert end.dedup_key == start.dedup_key


def test_skewed_and_unskewed_context_move_the_replay_clock_as_live() -> None:
    """``on_context`` (a replay's event of a patient it does not replay) moves the clocks as
    the event's arrival would: the same silence fires at the same point."""
    home = Home("P-ctx-1", T0)
    other = Home("P-ctx-2", T0)
    live = RulesEngine()
    replay = RulesEngine()
    run_stream(live, [home.status(0)])
    run_stream(replay, [home.status(0)])
    context = [other.status(m) for m in range(0, 20)]
    live_alerts = [a for a in run_stream(live, context) if a.patient_id == "P-ctx-1"]
    replay_alerts = [a for e in context for a in replay.on_context(observe(e))]
    assert live_alerts == replay_alerts and [a.code for a in live_alerts] == ["device_silent"]
