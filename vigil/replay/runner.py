"""Feeding a recorded stream through a pinned rules engine and keeping what it decided.

Pure and synchronous: batches of ``(ReplayEvent, Position)`` in, alerts with the position of the
event that decided them out. A replay that starts mid-stream is fed a warm-up first (events
before the window, marked by the readers): the engine decides on them exactly as the live one
did, so it enters the window with the live state (an open fever, a running interruption clock,
the last pump status), but the replay reports none of those decisions; it reports the alerts
still open at the window start separately (``open_at_start``). No I/O, no wall clock; the
readers in ``sources`` do the reading, so the same ``Replay`` serves the topic, the archive and
the unit tests' in-memory streams. Several replays (two rule versions, say) can be fed the same
batches, so a stream is read once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import Alert, AlertState, Telemetry
from vigil.replay.engine_port import (
    CHANNEL_PUMP_STATUS,
    CHANNEL_TEMPERATURE,
    PinnedRules,
    ReplayEngine,
    ReplayEvent,
    from_telemetry,
)
from vigil.replay.sources import CONTEXT, WARMUP, WARMUP_CONTEXT, Batch, Position

# Sources of events the engine sees but whose own decisions are not the window's.
_NOT_REPORTED = frozenset({CONTEXT, WARMUP, WARMUP_CONTEXT})


@dataclass(frozen=True, slots=True)
class ReplayedAlert:
    """An alert the engine decided in replay, with where its deciding event is in the record."""

    alert: Alert
    position: Position
    config_hash: str


@dataclass(slots=True)
class Timeline:
    """One patient's stream as a report draws it: temperatures, pump states, pump events."""

    temperatures: list[tuple[datetime, float]] = field(default_factory=list)
    pump_states: list[tuple[datetime, str]] = field(default_factory=list)
    pump_events: list[tuple[datetime, str, str | None]] = field(default_factory=list)

    def add(self, event: ReplayEvent) -> None:
        if event.channel == CHANNEL_TEMPERATURE:
            self.temperatures.append((event.device_time, event.temperature_c))
        elif event.channel == CHANNEL_PUMP_STATUS:
            self.pump_states.append((event.device_time, event.pump_state))
        else:
            self.pump_events.append((event.device_time, event.event, event.alarm or None))

    def sort(self) -> None:
        # Kafka order is arrival order; a plot is drawn in device time.
        self.temperatures.sort(key=lambda item: item[0])
        self.pump_states.sort(key=lambda item: item[0])
        self.pump_events.sort(key=lambda item: item[0])


class Replay:
    """One pinned rules config replaying one stream; fed batch by batch.

    The engines are laid out as the live service lays them out (``PinnedRules.lane_of``): the
    rules service runs one engine per telemetry partition, each with its own watermark, so a
    Kafka replay does too, and an archive replay places each patient on the partition its
    telemetry was keyed to (``patient_lane``).
    """

    def __init__(
        self,
        rules: PinnedRules,
        *,
        keep_timelines: bool = False,
        patient_lane: Callable[[str], Any] | None = None,
    ) -> None:
        """``patient_lane``: for a source without partitions (the archive), the partition each
        patient's telemetry went to, so each engine sees the patients the live one saw."""
        self.rules = rules
        self._patient_lane = patient_lane
        self._lanes: dict[str, Any] = {}
        self._engines: dict[Any, ReplayEngine] = {}
        self._keep_timelines = keep_timelines
        self.alerts: list[ReplayedAlert] = []
        # Decided during warm-up (before the window): not reported, but they say what was
        # open when the window started.
        self.warmup_alerts: list[ReplayedAlert] = []
        self.warmup_events = 0
        self.timelines: dict[str, Timeline] = {}
        self.events = 0
        self.first_device_time: datetime | None = None
        self.last_device_time: datetime | None = None

    def _engine(self, lane: Any) -> ReplayEngine:
        engine = self._engines.get(lane)
        if engine is None:
            engine = self._engines[lane] = self.rules.new_engine()
        return engine

    def feed(self, batch: Batch) -> None:
        """Replay a batch. A ``CONTEXT`` item is an event of the stream that is not replayed
        (another patient's, on the same partition) but moves event time as it did live;
        ``WARMUP`` and ``WARMUP_CONTEXT`` items are the same before the window: the engine
        sees them, the replay reports nothing they decide."""
        content_hash = self.rules.content_hash
        lane_of = self.rules.lane_of
        patient_lane = self._patient_lane
        lanes = self._lanes
        engines = self._engines
        alerts = self.alerts
        warm = self.warmup_alerts
        replayed: Batch = []
        last: Position = ("start", None, 0)
        for item in batch:
            event, position = item
            if patient_lane is None:
                lane = lane_of(position)
            else:
                # Hashing a key costs more than the rule does: once per patient.
                lane = lanes.get(event.patient_id)
                if lane is None:
                    lane = lanes[event.patient_id] = patient_lane(event.patient_id)
            engine = engines.get(lane) or self._engine(lane)
            source = position[0]
            if source not in _NOT_REPORTED:  # the common case first
                last = position
                replayed.append(item)
                decided = engine.on_event(event)
                if decided:
                    alerts.extend(ReplayedAlert(a, position, content_hash) for a in decided)
            elif source == CONTEXT:
                decided = engine.advance_from(event)
                if decided:
                    alerts.extend(ReplayedAlert(a, last, content_hash) for a in decided)
            elif source == WARMUP:
                self.warmup_events += 1
                decided = engine.on_event(event)
                if decided:
                    warm.extend(ReplayedAlert(a, position, content_hash) for a in decided)
            else:  # WARMUP_CONTEXT
                decided = engine.advance_from(event)
                if decided:
                    warm.extend(ReplayedAlert(a, position, content_hash) for a in decided)
        self.events += len(replayed)
        if replayed:
            self._note_span(replayed)
        if self._keep_timelines:
            timelines = self.timelines
            for event, _ in replayed:
                timeline = timelines.get(event.patient_id)
                if timeline is None:
                    timeline = timelines[event.patient_id] = Timeline()
                timeline.add(event)

    def open_at_start(self) -> list[ReplayedAlert]:
        """The alerts open when the window started: of each episode (dedup key) decided during
        warm-up, its newest phase, when that phase leaves the alert active (not an all-clear,
        not an informational pass-through). Empty without a warm-up."""
        newest: dict[str, ReplayedAlert] = {}
        for item in self.warmup_alerts:
            newest[item.alert.dedup_key] = item
        still_open = [i for i in newest.values() if i.alert.state is not AlertState.INACTIVE]
        return sorted(still_open, key=lambda i: (i.alert.device_time, i.alert.dedup_key))

    def _note_span(self, batch: Batch) -> None:
        low = min(event.device_time for event, _ in batch)
        high = max(event.device_time for event, _ in batch)
        if self.first_device_time is None or low < self.first_device_time:
            self.first_device_time = low
        if self.last_device_time is None or high > self.last_device_time:
            self.last_device_time = high

    def finish(self, advance_to: datetime | None = None) -> list[ReplayedAlert]:
        """End the stream. With ``advance_to``, first move event time there so the timers due
        by then fire (the live engine fires them only when later events arrive)."""
        if advance_to is not None:
            end: Position = ("end", None, self.events)
            for engine in self._engines.values():
                fired = engine.on_time(advance_to)
                self.alerts.extend(ReplayedAlert(a, end, self.rules.content_hash) for a in fired)
        for timeline in self.timelines.values():
            timeline.sort()
        return self.alerts


def replay_events(rules: PinnedRules, events: Iterable[Telemetry]) -> list[Alert]:
    """Replay an in-memory stream in the given order; the alerts in decision order."""
    replay = Replay(rules)
    replay.feed([(from_telemetry(event), ("memory", None, n)) for n, event in enumerate(events)])
    return [item.alert for item in replay.finish()]
