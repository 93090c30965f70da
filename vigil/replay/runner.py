"""Feeding a recorded stream through a pinned rules engine and keeping what it decided.

Pure and synchronous: batches of ``(Telemetry, Position)`` in, alerts with the position of the
event that decided them out. No I/O, no wall clock; the readers in ``sources`` do the reading, so
the same ``Replay`` serves the topic, the archive and the unit tests' in-memory streams. Several
replays (two rule versions, say) can be fed the same batches, so a stream is read once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from schemas.device import PumpEvent, PumpStatus
from schemas.events import Alert, Telemetry
from vigil.replay.engine_port import PinnedRules
from vigil.replay.sources import Batch, Position


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

    def add(self, event: Telemetry) -> None:
        message = event.message
        if event.temperature_c is not None:
            self.temperatures.append((message.device_time, event.temperature_c))
        elif isinstance(message, PumpStatus):
            self.pump_states.append((message.device_time, message.state.value))
        elif isinstance(message, PumpEvent):
            alarm = message.alarm.value if message.alarm is not None else None
            self.pump_events.append((message.device_time, message.event.value, alarm))

    def sort(self) -> None:
        # Kafka order is arrival order; a plot is drawn in device time.
        self.temperatures.sort(key=lambda item: item[0])
        self.pump_states.sort(key=lambda item: item[0])
        self.pump_events.sort(key=lambda item: item[0])


class Replay:
    """One pinned rules config replaying one stream; fed batch by batch."""

    def __init__(self, rules: PinnedRules, *, keep_timelines: bool = False) -> None:
        self.rules = rules
        self._engine = rules.new_engine()
        self._keep_timelines = keep_timelines
        self.alerts: list[ReplayedAlert] = []
        self.timelines: dict[str, Timeline] = {}
        self.events = 0
        self.first_device_time: datetime | None = None
        self.last_device_time: datetime | None = None

    def feed(self, batch: Batch) -> None:
        """Replay a batch. An item without a position is context: an event of the stream that
        is not replayed (another patient's) but moves event time as it did live."""
        on_telemetry = self._engine.on_telemetry
        content_hash = self.rules.content_hash
        context = False
        last: Position = ("start", None, 0)
        for event, position in batch:
            if position is None:
                context = True
                decided = self._engine.advance_from(event)
                if decided:
                    self.alerts.extend(ReplayedAlert(a, last, content_hash) for a in decided)
                continue
            last = position
            decided = on_telemetry(event)
            if decided:
                self.alerts.extend(ReplayedAlert(a, position, content_hash) for a in decided)
        if context:
            batch = [(event, position) for event, position in batch if position is not None]
        self.events += len(batch)
        if batch:
            self._note_span(batch)
        if self._keep_timelines:
            timelines = self.timelines
            for event, _ in batch:
                timeline = timelines.get(event.patient_id)
                if timeline is None:
                    timeline = timelines[event.patient_id] = Timeline()
                timeline.add(event)

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
            fired = self._engine.on_time(advance_to)
            end: Position = ("end", None, self.events)
            self.alerts.extend(ReplayedAlert(a, end, self.rules.content_hash) for a in fired)
        for timeline in self.timelines.values():
            timeline.sort()
        return self.alerts


def replay_events(rules: PinnedRules, events: Iterable[Telemetry]) -> list[Alert]:
    """Replay an in-memory stream in the given order; the alerts in decision order."""
    replay = Replay(rules)
    replay.feed([(event, ("memory", None, n)) for n, event in enumerate(events)])
    return [item.alert for item in replay.finish()]
