"""A replay that starts mid-stream: the warm-up rebuilds the rule state the live engine had at
the window start, so the window decides exactly what the whole stream decided there.

Each test replays the whole stream once (the reference: what the live engine decided), then
replays the window [T, end) after a warm-up over [start, T), and compares the alerts decided
in the window, position for position. Where it matters, the same window without a warm-up is
shown to decide differently, so the comparison can fail.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import AlertPhase, Telemetry
from services.rules.domain.pump import INTERRUPTION_RULE_ID
from vigil_tools.replay.engine_port import default_rules, from_telemetry
from vigil_tools.replay.runner import Replay, ReplayedAlert
from vigil_tools.replay.sources import WARMUP, Batch
from vigil_tools.replay.synthetic import FeverEpisode, PumpPause, course

START = datetime(2026, 3, 1, tzinfo=UTC)


def as_batch(events: list[Telemetry], window_start: datetime | None) -> Batch:
    """Memory positions; events before ``window_start`` marked warm-up, as the readers do."""
    batch: Batch = []
    for n, event in enumerate(events):
        warm = window_start is not None and event.message.device_time < window_start
        batch.append((from_telemetry(event), (WARMUP if warm else "memory", None, n)))
    return batch


def decided(items: list[ReplayedAlert]) -> list[tuple[str, str, int]]:
    return [(str(i.alert.alert_id), i.alert.phase.value, i.position[2]) for i in items]


def full_and_window(
    events: list[Telemetry], window_start: datetime
) -> tuple[list[ReplayedAlert], Replay]:
    """The whole stream's alerts decided at or after the window start, and the window replay."""
    full = Replay(default_rules())
    full.feed(as_batch(events, None))
    first = next(n for n, e in enumerate(events) if e.message.device_time >= window_start)
    in_window = [i for i in full.finish() if i.position[2] >= first]
    window = Replay(default_rules())
    window.feed(as_batch(events, window_start))
    window.finish()
    return in_window, window


def cold_window(events: list[Telemetry], window_start: datetime) -> list[ReplayedAlert]:
    """The window replayed from empty rule state (no warm-up), same positions."""
    first = next(n for n, e in enumerate(events) if e.message.device_time >= window_start)
    cold = Replay(default_rules())
    cold.feed(
        [(from_telemetry(e), ("memory", None, first + k)) for k, e in enumerate(events[first:])]
    )
    return cold.finish()


def test_a_sustained_fever_that_began_before_the_window_pages_as_in_the_full_replay() -> None:
    """38.1 °C from 10:00 pages as sustained at 11:00; a window from 10:30 decides the same
    alert at the same event. Without the warm-up the window has seen 30 minutes of fever at
    11:00 and does not page then: the test can tell the two apart."""
    fever = FeverEpisode(timedelta(hours=10), timedelta(minutes=100), 38.1)
    events = course("P-w1", START, days=1, fevers=(fever,), pauses=())
    window_start = START + timedelta(hours=10, minutes=30)

    expected, window = full_and_window(events, window_start)

    sustained = [i for i in expected if i.alert.code == "fever_sustained"]
    assert len(sustained) == 1
    assert sustained[0].alert.device_time == START + timedelta(hours=11)
    assert decided(window.alerts) == decided(expected)
    assert window.warmup_events == sum(1 for e in events if e.message.device_time < window_start)

    cold_sustained = [
        i for i in cold_window(events, window_start) if i.alert.code == "fever_sustained"
    ]
    assert [i.alert.device_time for i in cold_sustained] != [START + timedelta(hours=11)]


def test_an_interruption_clock_started_before_the_window_pages_at_the_same_point() -> None:
    """The pump stops at 09:00 for 50 minutes; the clock pages at 09:30. A window from 09:15
    pages at 09:30 too (the clock kept the 15 minutes before the window), with the same alert
    id and deciding event; empty state would start counting at 09:15."""
    pause = PumpPause(timedelta(hours=9), timedelta(minutes=50))
    events = course("P-w2", START, days=0.6, fevers=(), pauses=(pause,))
    window_start = START + timedelta(hours=9, minutes=15)

    expected, window = full_and_window(events, window_start)

    clock = [i for i in expected if i.alert.rule_id == INTERRUPTION_RULE_ID]
    assert clock[0].alert.device_time == START + timedelta(hours=9, minutes=30)
    assert decided(window.alerts) == decided(expected)
    assert decided(cold_window(events, window_start)) != decided(expected)


def test_an_alert_open_at_the_window_start_is_reported_as_open_and_not_paged_again() -> None:
    """A 38.6 °C fever that paged at 10:00 is still open at 10:30: the window reports it as
    open at its start and decides no second start for it; a fever that ended before the window
    is not reported as open."""
    fevers = (
        FeverEpisode(timedelta(hours=3), timedelta(minutes=20), 38.6),
        FeverEpisode(timedelta(hours=10), timedelta(minutes=90), 38.6),
    )
    events = course("P-w3", START, days=1, fevers=fevers, pauses=())
    window_start = START + timedelta(hours=10, minutes=30)

    expected, window = full_and_window(events, window_start)

    still_open = window.open_at_start()
    fever_open = [i for i in still_open if i.alert.rule_id == "fever"]
    assert len(fever_open) == 1
    assert fever_open[0].alert.device_time >= START + timedelta(hours=10)
    assert fever_open[0].position[0] == WARMUP
    starts_in_window = [
        i for i in window.alerts if i.alert.rule_id == "fever" and i.alert.phase is AlertPhase.START
    ]
    assert starts_in_window == []
    assert decided(window.alerts) == decided(expected)
    ends = [i for i in window.alerts if i.alert.rule_id == "fever"]
    assert [i.alert.phase for i in ends][-1] is AlertPhase.END
    assert ends[-1].alert.dedup_key == fever_open[0].alert.dedup_key
    cold_starts = [
        i
        for i in cold_window(events, window_start)
        if i.alert.rule_id == "fever" and i.alert.phase is AlertPhase.START
    ]
    assert cold_starts  # empty state would page the open fever again


def test_a_window_at_the_stream_start_has_no_warmup_and_nothing_open() -> None:
    """The edge: a window that starts at the first event is the full replay."""
    events = course("P-w4", START, days=1)
    expected, window = full_and_window(events, START)
    assert window.warmup_events == 0 and window.open_at_start() == []
    assert decided(window.alerts) == decided(expected)
