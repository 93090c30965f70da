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
from operator import attrgetter, itemgetter
from typing import Any

from pydantic import TypeAdapter

from schemas.events import Alert, AlertState, Telemetry
from vigil_tools.replay.engine_port import (
    CHANNEL_PUMP_STATUS,
    CHANNEL_TEMPERATURE,
    PinnedRules,
    ReplayEngine,
    ReplayEvent,
    from_telemetry,
)
from vigil_tools.replay.sources import (
    ARCHIVED,
    CONTEXT,
    WARMUP,
    WARMUP_CONTEXT,
    AsRead,
    AsReadByDeviceTime,
    Batch,
    Feed,
    PartitionRun,
    Position,
    archive_position,
)

# Sources of events the engine sees but whose own decisions are not the window's.
_NOT_REPORTED = frozenset({CONTEXT, WARMUP, WARMUP_CONTEXT})
_START: Position = ("start", None, 0)


def _placed(item: tuple[ReplayEvent, Position]) -> Position:
    """An item's position, made from the event for an archive row replayed as read."""
    event, position = item
    return archive_position(event) if position is ARCHIVED else position


_EVENT = itemgetter(0)
_SECONDS = attrgetter("t")
_PATIENT = attrgetter("patient_id")


@dataclass(frozen=True, slots=True)
class ReplayedAlert:
    """An alert the engine decided in replay, with where its deciding event is in the record."""

    alert: Alert
    position: Position
    config_hash: str


_ALERTS = TypeAdapter(list[Alert])
_Packed = tuple[bytes, list[Position], list[str]]


def _packed(items: list[ReplayedAlert]) -> _Packed:
    return (
        # Unset fields stay unset (left out, then defaulted), so each model comes back as it
        # left, down to which fields were set.
        _ALERTS.dump_json([i.alert for i in items], exclude_unset=True),
        [i.position for i in items],
        [i.config_hash for i in items],
    )


def _unpacked(packed: _Packed) -> list[ReplayedAlert]:
    alerts, positions, hashes = packed
    return list(map(ReplayedAlert, _ALERTS.validate_json(alerts), positions, hashes))


@dataclass(slots=True)
class Timeline:
    """One patient's stream as a report draws it: temperatures, pump states, pump events."""

    temperatures: list[tuple[datetime, float]] = field(default_factory=list)
    pump_states: list[tuple[datetime, str]] = field(default_factory=list)
    pump_events: list[tuple[datetime, str, str | None]] = field(default_factory=list)

    def add(self, event: ReplayEvent) -> None:
        """Draw ``event``; the engine has already refused one without the fields of its kind,
        so the checks below never skip a replayed event."""
        channel = event.channel
        if channel == CHANNEL_TEMPERATURE:
            if event.temperature_c is not None:
                self.temperatures.append((event.device_time, event.temperature_c))
        elif channel == CHANNEL_PUMP_STATUS:
            if event.pump_state is not None:
                self.pump_states.append((event.device_time, event.pump_state))
        elif event.event is not None:
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
        # Each patient's engine entry point, for events replayed as read (``_feed_as_read``).
        self._routes: dict[str, Callable[[ReplayEvent], list[Alert]]] = {}
        self._last: dict[Any, tuple[ReplayEvent, Position]] = {}
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

    def _lane_of_patient(self, patient_id: str) -> Any:
        lane = self._lanes.get(patient_id)
        if lane is None:
            patient_lane = self._patient_lane
            # An archive event's lane without a partitioner is the one lane of ``ARCHIVED``.
            lane = self._lanes[patient_id] = (
                patient_lane(patient_id)
                if patient_lane is not None
                else self.rules.lane_of(ARCHIVED)
            )
        return lane

    def feed(self, batch: Feed) -> None:
        """Replay a batch. A ``CONTEXT`` item is an event of the stream that is not replayed
        (another patient's, on the same partition) but moves event time as it did live;
        ``WARMUP`` and ``WARMUP_CONTEXT`` items are the same before the window: the engine
        sees them, the replay reports nothing they decide. An ``AsRead`` batch is archive
        events all replayed as read, as if each were paired with ``ARCHIVED``; a
        ``PartitionRun`` is Kafka records of one partition, each paired with its offset."""
        if isinstance(batch, AsRead):
            self._feed_as_read(batch)
            return
        if isinstance(batch, PartitionRun):
            self._feed_run(batch)
            return
        content_hash = self.rules.content_hash
        lane_of = self.rules.lane_of
        patient_lane = self._patient_lane
        lanes = self._lanes
        engines = self._engines
        alerts = self.alerts
        warm = self.warmup_alerts
        replayed: Batch = []
        # The last replayed event of each lane: what a timer fired by a context event is
        # attributed to (the lane's sequence is the same however the lanes are read).
        lasts = self._last
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
                lasts[lane] = item
                replayed.append(item)
                decided = engine.on_event(event)
                if decided:
                    placed = _placed(item)
                    alerts.extend(ReplayedAlert(a, placed, content_hash) for a in decided)
            elif source == CONTEXT:
                decided = engine.advance_from(event)
                if decided:
                    last = lasts.get(lane)
                    placed = _START if last is None else _placed(last)
                    alerts.extend(ReplayedAlert(a, placed, content_hash) for a in decided)
            elif source == WARMUP:
                self.warmup_events += 1
                decided = engine.on_event(event)
                if decided:
                    warm.extend(ReplayedAlert(a, position, content_hash) for a in decided)
            else:  # WARMUP_CONTEXT
                decided = engine.advance_from(event)
                if decided:
                    warm.extend(ReplayedAlert(a, position, content_hash) for a in decided)
        self._note_replayed(list(map(_EVENT, replayed)))

    def _feed_as_read(self, events: AsRead) -> None:
        """``feed`` for events replayed as read: the same decisions, with the per-event work cut
        to the engine call (the archive replay's hot loop)."""
        content_hash = self.rules.content_hash
        routes = self._routes
        alerts = self.alerts
        for event in events:
            on_event = routes.get(event.patient_id)
            if on_event is None:
                lane = self._lane_of_patient(event.patient_id)
                on_event = routes[event.patient_id] = self._engine(lane).on_event
            decided = on_event(event)
            if decided:
                placed = archive_position(event)
                alerts.extend(ReplayedAlert(a, placed, content_hash) for a in decided)
        if not events:
            return
        # Each lane's last event, as ``feed`` keeps it (a later context event's timers are
        # attributed to it): the batch's lanes are found in a C loop, their last events by
        # walking back from the end, which meets every lane of a stream in time order soon.
        lanes = self._lanes
        left = {lanes[patient_id] for patient_id in set(map(_PATIENT, events))}
        for event in reversed(events):
            lane = lanes[event.patient_id]
            if lane in left:
                self._last[lane] = (event, ARCHIVED)
                left.remove(lane)
                if not left:
                    break
        self._note_replayed(events)

    def _feed_run(self, run: PartitionRun) -> None:
        """``feed`` for one partition's records replayed as read: one engine for the run, and a
        position made only for a record that decides something."""
        partition = run.partition
        if self._patient_lane is not None:
            # Lanes by patient (not a Kafka replay's layout): the general path decides.
            self.feed(
                [(e, ("kafka", partition, o)) for e, o in zip(run.events, run.offsets, strict=True)]
            )
            return
        if not run.events:
            return
        lane = self.rules.lane_of(("kafka", partition, run.offsets[0]))
        on_event = self._engine(lane).on_event
        content_hash = self.rules.content_hash
        alerts = self.alerts
        for event, offset in zip(run.events, run.offsets, strict=True):
            decided = on_event(event)
            if decided:
                placed = ("kafka", partition, offset)
                alerts.extend(ReplayedAlert(a, placed, content_hash) for a in decided)
        self._last[lane] = (run.events[-1], ("kafka", partition, run.offsets[-1]))
        self._note_replayed(run.events)

    def _note_replayed(self, events: list[ReplayEvent]) -> None:
        """Count the replayed events of a batch, their span, and (if kept) their timelines."""
        self.events += len(events)
        if events:
            self._note_span(events)
        if self._keep_timelines:
            timelines = self.timelines
            for event in events:
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

    def absorb(self, other: Replay) -> None:
        """Take in what another replay of the same config decided over other lanes (a worker
        process's share of the stream, see ``parallel``). Lanes hold disjoint patients, so
        alerts and timelines only add up; call ``order_alerts`` once all are in."""
        self.alerts.extend(other.alerts)
        self.warmup_alerts.extend(other.warmup_alerts)
        self.warmup_events += other.warmup_events
        self.events += other.events
        self.timelines.update(other.timelines)
        for moment in (other.first_device_time, other.last_device_time):
            if moment is not None:
                self._note_moment(moment)

    def order_alerts(self) -> None:
        """Put the alerts in one order that does not depend on how the lanes were read (one
        process or several, which partition a fetch returned first): by device time, then
        patient. The sort is stable and a patient lives on one lane, so one patient's alerts
        at one device time keep the order the engine decided them in. Alerts of the stream's
        end name the whole stream's event count."""
        events = self.events
        self.alerts = [
            ReplayedAlert(i.alert, ("end", None, events), i.config_hash)
            if i.position[0] == "end"
            else i
            for i in self.alerts
        ]
        self.alerts.sort(key=lambda i: (i.alert.device_time, i.alert.patient_id))
        # Warm-up decisions stay in decision order within a patient: ``open_at_start`` takes
        # each episode's newest phase by that order.
        self.warmup_alerts.sort(key=lambda i: i.alert.patient_id)

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process sends back: the decisions, not the engines (their state is
        spent once the stream is finished) nor the lane function (a closure). The alerts
        travel as their JSON (the form every alert takes between the services), which pydantic
        writes and reads in one call each: several times faster than pickling the models,
        and the last worker's result is on the replay's critical path."""
        state = dict(self.__dict__)
        state["_engines"] = {}
        state["_routes"] = {}
        state["_last"] = {}
        state["_patient_lane"] = None
        state["alerts"] = _packed(self.alerts)
        state["warmup_alerts"] = _packed(self.warmup_alerts)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["alerts"] = _unpacked(state["alerts"])
        state["warmup_alerts"] = _unpacked(state["warmup_alerts"])
        self.__dict__.update(state)

    def _note_moment(self, moment: datetime) -> None:
        if self.first_device_time is None or moment < self.first_device_time:
            self.first_device_time = moment
        if self.last_device_time is None or moment > self.last_device_time:
            self.last_device_time = moment

    def _note_span(self, events: list[ReplayEvent]) -> None:
        # By the epoch seconds (an archived event makes its datetime only when asked), in C
        # loops: this runs over every replayed event, unless the batch is in device-time order.
        if isinstance(events, AsReadByDeviceTime):
            earliest, latest = events[0], events[-1]
        else:
            seconds = list(map(_SECONDS, events))
            earliest = events[seconds.index(min(seconds))]
            latest = events[seconds.index(max(seconds))]
        if self.first_device_time is None or earliest.t < self.first_device_time.timestamp():
            self.first_device_time = earliest.device_time
        if self.last_device_time is None or latest.t > self.last_device_time.timestamp():
            self.last_device_time = latest.device_time

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
