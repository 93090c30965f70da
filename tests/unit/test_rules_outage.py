"""After a pipeline outage: one truthful account, not a page storm.

Once heartbeats flow on a partition, a jump of its arrival clock by more than ``outage_gap_s``
(60 s) means nothing was delivered: the pipeline was not watching. Timers that fell due inside
the outage wait ``resume_grace_s`` (120 s) after it for the data queued meanwhile; a device
whose queued data arrive is not paged at all (no start and all clear a second apart), and a
silence that began before the outage and outlasted it is paged once the grace ends.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.device import PumpState
from schemas.events import Alert, AlertPhase, Telemetry
from services.rules.domain.config import RulesConfig
from services.rules.domain.engine import RulesEngine
from tests.support.rules import Home, Pulse, delivered_at, run_stream

T0 = datetime(2026, 11, 21, 1, 0, tzinfo=UTC)
BEAT_S = 15.0
DOWN_FROM, DOWN_TO = 10, 70  # minutes: nothing delivered in between


def at_minutes(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


def pipeline(
    devices: list[Telemetry], *, queued: list[Telemetry] = (), until: float = 80
) -> list[Telemetry]:
    """Heartbeats and device records as delivered: nothing between DOWN_FROM and DOWN_TO;
    ``queued`` (taken during the outage) reach ingest just after it, behind one heartbeat."""
    pulse = Pulse(T0)
    beats = pulse.every(BEAT_S, 0, DOWN_FROM - 0.5) + pulse.every(BEAT_S, DOWN_TO, until)
    live = [
        e
        for e in devices
        if not DOWN_FROM <= e.ingest_time.timestamp() / 60 - T0.timestamp() / 60 < DOWN_TO
    ]
    late = [
        delivered_at(e, at_minutes(DOWN_TO) + timedelta(milliseconds=100 * (i + 1)))
        for i, e in enumerate(queued)
    ]
    return sorted([*beats, *live, *late], key=lambda e: e.ingest_time)


def codes(alerts: list[Alert], patient_id: str) -> list[tuple[str, AlertPhase]]:
    return [(a.code, a.phase) for a in alerts if a.patient_id == patient_id]


def test_devices_that_kept_publishing_into_the_queue_are_not_paged() -> None:
    """A pump reporting every minute through an hour's outage: its queued statuses arrive after
    the first heartbeat; no silence is paged, no start/all-clear pair. Positive control: an
    engine that does not recognise the outage pages the pair the issue saw."""
    home = Home("P-out-1", T0)
    sent = [home.status(m) for m in range(0, 80)]
    queued = [e for e in sent if DOWN_FROM <= (e.device_time - T0).total_seconds() / 60 < DOWN_TO]
    stream = pipeline([e for e in sent if e not in queued], queued=queued)
    assert codes(run_stream(RulesEngine(), stream), "P-out-1") == []
    eager = RulesEngine(RulesConfig(outage_gap_s=1e9))
    assert codes(run_stream(eager, stream), "P-out-1") == [
        ("device_silent", AlertPhase.START),
        ("device_silent", AlertPhase.END),
    ]


def test_a_silence_that_began_before_the_outage_and_outlasted_it_is_paged_after_the_grace() -> None:
    """A pump last heard at minute 5, quiet through the outage and after it: paged once the
    grace ends (2 min after the first arrival), dated at its own deadline (last arrival +
    15 min), not at the recovery."""
    home = Home("P-out-2", T0)
    engine = RulesEngine()
    fired: list[tuple[datetime, Alert]] = []
    for event in pipeline([home.status(m) for m in range(0, 6)], until=80):
        for alert in engine.on_telemetry(event):
            if alert.patient_id == "P-out-2":
                fired.append((event.ingest_time, alert))
    assert [(a.code, a.phase) for _, a in fired] == [("device_silent", AlertPhase.START)]
    seen_at, alert = fired[0]
    assert alert.device_time == at_minutes(5) + timedelta(seconds=1) + timedelta(minutes=15)
    grace_end = at_minutes(DOWN_TO) + timedelta(minutes=2)
    assert grace_end <= seen_at <= grace_end + timedelta(seconds=BEAT_S + 5)
    assert engine.take_outages() and engine.take_outages() == []


def test_an_interruption_whose_restart_was_queued_is_not_paged() -> None:
    """A pump stopped at minute 8 and restarted at minute 20 (inside the outage, queued): the
    30-minute interruption clock fell due inside the outage and waits; the restart arrives in
    the grace, so nothing is paged. Positive control: without the queued restart it pages."""
    home = Home("P-out-3", T0)
    before = [home.status(m) for m in range(0, 8)] + [home.status(8, state=PumpState.STOPPED)]
    during = [home.status(m, state=PumpState.STOPPED) for m in (9,)] + [
        home.status(m) for m in range(20, DOWN_TO)
    ]
    restarted = pipeline(
        before + during, queued=[e for e in during if e.device_time >= at_minutes(DOWN_FROM)]
    )
    assert "infusion_interrupted" not in [
        c for c, _ in codes(run_stream(RulesEngine(), restarted), "P-out-3")
    ]
    home2 = Home("P-out-3", T0)
    stopped = [home2.status(m) for m in range(0, 8)] + [home2.status(8, state=PumpState.STOPPED)]
    stopped += [home2.status(9, state=PumpState.STOPPED)]
    alerts = run_stream(RulesEngine(), pipeline(stopped))
    assert "infusion_interrupted" in [c for c, _ in codes(alerts, "P-out-3")]


def test_a_sparse_stream_without_heartbeats_is_never_taken_for_an_outage() -> None:
    """Before the first heartbeat there is nothing to compare with: a quiet stretch between two
    records is not an outage, and the silence fires as soon as the clock passes it."""
    home = Home("P-out-4", T0)
    other = Home("P-out-5", T0)
    engine = RulesEngine()
    alerts = run_stream(engine, [home.status(0), other.status(0), other.status(60)])
    assert codes(alerts, "P-out-4") == [("device_silent", AlertPhase.START)]
    assert engine.take_outages() == []


def test_heartbeats_sent_far_apart_are_not_taken_for_outages() -> None:
    """A publisher beating every 5 min (above the 60 s outage gap): the outage threshold
    follows the heartbeats' own spacing, so a quiet pump is paged within one beat of its
    deadline, not held again at every beat."""
    home = Home("P-out-6", T0)
    engine = RulesEngine()
    fired: list[datetime] = []
    events = sorted([home.status(0), *Pulse(T0).every(300, 0, 40)], key=lambda e: e.ingest_time)
    for event in events:
        if any(a.code == "device_silent" for a in engine.on_telemetry(event)):
            fired.append(event.ingest_time)
    deadline = T0 + timedelta(minutes=15, seconds=1)
    assert len(fired) == 1 and deadline <= fired[0] <= deadline + timedelta(minutes=5, seconds=5)
    assert engine.take_outages() == []


def test_a_timer_is_held_once_however_many_outages_follow() -> None:
    """Two outages in a row: a silence held by the first fires when that grace ends, even if
    the second outage begins before it (a hold is never renewed)."""
    home = Home("P-out-7", T0)
    pulse = Pulse(T0)
    engine = RulesEngine()
    run_stream(engine, [home.status(0), *pulse.every(15, 0, 5)])
    # Nothing from 5 to 30 min, one heartbeat at 30, nothing again until 60.
    first = run_stream(engine, [pulse.beat(30)])
    assert [a.code for a in first if a.code == "device_silent"] == []
    second = run_stream(engine, [pulse.beat(60)])
    assert [a.code for a in second if a.code == "device_silent"] == ["device_silent"]


def test_a_config_swap_during_the_grace_does_not_undo_the_hold() -> None:
    """Found end to end: a new config arriving during the grace re-armed the held silence at
    its earlier deadline, and it fired at once, though the pump resumed 30 s later (inside the
    grace). The hold stays; nothing is paged."""
    home = Home("P-out-8", T0)
    before = [home.status(m) for m in range(0, DOWN_FROM)]
    resumed = [home.status(DOWN_TO + 0.5 + m) for m in range(0, 9)]
    engine = RulesEngine()
    alerts: list[Alert] = []
    swapped = False
    for event in pipeline(before + resumed):
        alerts += engine.on_telemetry(event)
        if not swapped and event.ingest_time >= at_minutes(DOWN_TO):
            engine.reconfigure(RulesConfig(config_version="swapped"))
            swapped = True
    assert swapped and codes(alerts, "P-out-8") == []
