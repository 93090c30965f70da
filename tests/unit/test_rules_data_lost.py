"""The data-lost rule: a gap in a device's seq still open 30 min (arrival clock) after it was
seen is a technical alarm naming the range; a gap filled in time (a hub forwarding its buffer)
is not; a counter that restarted is counted, not alarmed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import AlertKind, AlertPhase, AlertPriority, Telemetry
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import observe
from tests.support.rules import Home, Pulse, delivered_at, run_stream

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)


def statuses(home: Home, minutes: range) -> list[Telemetry]:
    return [home.status(m) for m in minutes]


def renumbered(event: Telemetry, seq: int) -> Telemetry:
    message = event.message.model_copy(update={"seq": seq})
    return event.model_copy(update={"message": message})


def lost(alerts: list, patient_id: str) -> list:
    return [a for a in alerts if a.code == "data_lost" and a.patient_id == patient_id]


def test_a_gap_still_open_after_30_min_is_raised_with_its_range() -> None:
    """Statuses 1-10 arrive, 11-13 never do, 14 on arrive: 30 min after the gap was seen (at
    the arrival of 14) one technical alert names seq 11-13 and 3 messages."""
    home = Home("P-lost-1", T0)
    sent = statuses(home, range(0, 60))
    kept = [e for e in sent if e.message.seq not in (11, 12, 13)]
    alerts = run_stream(RulesEngine(), kept)
    (alert,) = lost(alerts, "P-lost-1")
    assert (alert.kind, alert.priority, alert.phase) == (
        AlertKind.TECHNICAL,
        AlertPriority.MEDIUM,
        AlertPhase.START,
    )
    assert "seq 11-13" in alert.title and "3 messages" in alert.title
    seen = kept[10].ingest_time  # seq 14 revealed the gap
    assert alert.device_time == seen + timedelta(minutes=30)
    assert alert.evidence[0].value == 3.0


def test_the_edge_one_second_before_the_wait_ends_nothing_at_it_the_alert() -> None:
    """Edge, with heartbeats only after the gap: the clock 1 s short of seen + 30 min (after
    the 5 s arrival lateness): nothing; at it: the alert."""
    home = Home("P-lost-2", T0)
    first, _skipped, third = statuses(home, range(0, 3))
    engine = RulesEngine()
    run_stream(engine, [first, third])
    seen = third.ingest_time
    pulse = Pulse(seen)
    assert lost(run_stream(engine, [pulse.beat(30 + 4 / 60)]), "P-lost-2") == []
    (alert,) = lost(run_stream(engine, [pulse.beat(30 + 5 / 60)]), "P-lost-2")
    assert alert.device_time == seen + timedelta(minutes=30)


def test_a_gap_filled_by_a_buffer_in_time_raises_nothing() -> None:
    """A hub sends the newest status first and its buffer 20 min later: the gap closes inside
    the wait, so nothing is raised. Positive control: the same stream without the buffer does
    raise it."""
    home = Home("P-lost-3", T0)
    sent = statuses(home, range(0, 90))
    buffered = [e for e in sent if 20 <= e.message.seq <= 29]
    late = T0 + timedelta(minutes=50)
    stream = [e for e in sent if not 20 <= e.message.seq <= 29]
    stream += [delivered_at(e, late + timedelta(seconds=i)) for i, e in enumerate(buffered)]
    stream.sort(key=lambda e: e.ingest_time)
    assert lost(run_stream(RulesEngine(), stream), "P-lost-3") == []
    without = [e for e in sent if not 20 <= e.message.seq <= 29]
    assert len(lost(run_stream(RulesEngine(), without), "P-lost-3")) == 1


def test_a_partly_filled_gap_names_only_what_is_still_missing() -> None:
    """Of a 5-message gap, two arrive late: the alert names the three still missing."""
    home = Home("P-lost-4", T0)
    sent = statuses(home, range(0, 60))
    missing = {11, 12, 13, 14, 15}
    refilled = {12, 14}
    stream = [e for e in sent if e.message.seq not in missing]
    stream += [
        delivered_at(e, T0 + timedelta(minutes=25)) for e in sent if e.message.seq in refilled
    ]
    stream.sort(key=lambda e: e.ingest_time)
    (alert,) = lost(run_stream(RulesEngine(), stream), "P-lost-4")
    assert "3 messages" in alert.title and "seq 11, 13, 15" in alert.title


def test_a_counter_that_restarted_is_counted_not_alarmed() -> None:
    """A jump of more than 10,000 (a device that started its counter from the clock after a
    reboot) raises nothing and is counted; a jump of 10,000 is a loss."""
    home = Home("P-lost-5", T0)
    a, b, c = statuses(home, range(0, 3))
    engine = RulesEngine()
    run_stream(engine, [a, renumbered(b, 1 + 10_001 + 1)])
    run_stream(engine, Pulse(T0).every(60, 1, 40))
    assert engine.seq_restarts == 1 and engine.take_seq_gaps() == []
    other = RulesEngine()
    alerts = run_stream(other, [a, renumbered(c, 1 + 10_000 + 1)])
    alerts += run_stream(other, Pulse(T0).every(60, 1, 40))
    assert len(lost(alerts, "P-lost-5")) == 1
    assert other.take_seq_gaps() == [("P-lost-5", home.pump_id, 10_000)]


def test_gaps_are_per_device_and_a_restart_mid_wait_fires_the_same_alert() -> None:
    """The thermometer and the pump number their messages separately (no gap between them);
    an engine restored from a snapshot taken inside the wait fires the same alert."""
    home = Home("P-lost-6", T0)
    stream = []
    for m in range(0, 40):
        stream.append(home.status(m))
        if m % 10 == 0:
            stream.append(home.temp(m, 36.8))
    stream = [e for e in stream if not (e.device_id == home.pump_id and e.message.seq == 5)]
    through = RulesEngine()
    half = len(stream) // 2
    run_stream(through, stream[:half])
    snapshot = through.snapshot()
    rest = run_stream(through, stream[half:])
    restored = RulesEngine()
    restored.restore(snapshot)
    assert run_stream(restored, stream[half:]) == rest
    (alert,) = lost(rest, "P-lost-6")
    assert alert.device_id == home.pump_id and "seq 5" in alert.title


def test_an_observation_without_a_seq_decides_no_gap() -> None:
    """An archived row carries no seq (None): the rule stays out of archive replays."""
    home = Home("P-lost-7", T0)
    events = [observe(e) for e in statuses(home, range(0, 60)) if e.message.seq != 3]
    for obs in events:
        obs.seq = None
    engine = RulesEngine()
    assert [a for obs in events for a in engine.on_observation(obs) if a.code == "data_lost"] == []
