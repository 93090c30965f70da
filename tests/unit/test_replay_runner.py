"""Replay of in-memory streams: reproduces a live run exactly, and shows a threshold change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from schemas.events import Alert, Telemetry
from services.rules.domain.config import RulesConfig
from services.rules.domain.engine import RulesEngine
from vigil_tools.replay.compare import Outcome, diff_alerts
from vigil_tools.replay.engine_port import (
    ReplayEvent,
    default_rules,
    from_telemetry,
    pin,
    with_overrides,
)
from vigil_tools.replay.runner import Replay, replay_events
from vigil_tools.replay.sources import ARCHIVED, CONTEXT, AsRead, AsReadByDeviceTime, PartitionRun
from vigil_tools.replay.synthetic import FeverEpisode, course

START = datetime(2026, 3, 1, tzinfo=UTC)


def live_run(config: RulesConfig, events: list[Telemetry]) -> list[Alert]:
    """What the live service decides: one engine, events in arrival order, nothing else."""
    engine = RulesEngine(config)
    alerts: list[Alert] = []
    for event in events:
        alerts += engine.on_telemetry(event)
    return alerts


def test_multi_day_stream_replays_to_exactly_the_alerts_recorded_live() -> None:
    """Two patients, 10 days each, interleaved as Kafka would deliver them: the replay decides
    every alert the live run decided, field for field, and nothing else."""
    events = course("P-a", START, days=10) + course("P-b", START + timedelta(hours=7), days=10)
    events.sort(key=lambda e: e.ingest_time)
    recorded = live_run(RulesConfig(), events)
    assert any(a.rule_id == "fever" for a in recorded)

    replayed = replay_events(default_rules(), events)

    report = diff_alerts(recorded, replayed)
    assert report.identical, report.counts()
    assert report.counts()["same"] == len(recorded) == len(replayed)
    assert [a.model_dump() for a in replayed] == [a.model_dump() for a in recorded]


def test_replay_fed_in_batches_decides_the_same_as_one_pass() -> None:
    """Batch boundaries are invisible to the decisions (the readers hand over batches)."""
    events = course("P-c", START, days=4)
    whole = replay_events(default_rules(), events)
    replay = Replay(default_rules())
    for start in range(0, len(events), 97):
        replay.feed(
            [
                (from_telemetry(e), ("memory", None, start + n))
                for n, e in enumerate(events[start : start + 97])
            ]
        )
    assert [item.alert for item in replay.finish()] == whole
    assert replay.events == len(events)


def test_lowering_the_single_reading_threshold_shows_the_expected_diff() -> None:
    """A 38.1 °C fever sustained 100 min pages after 60 min under 38.3/38.0; with single_c at
    38.0 the first reading pages: same episode, one hour earlier, now a single-reading code.
    A day with only a 37.9 °C reading pages under neither."""
    fevers = (
        FeverEpisode(timedelta(days=1, hours=4), timedelta(minutes=100), 38.1),
        FeverEpisode(timedelta(days=2, hours=4), timedelta(minutes=100), 37.95),
    )
    events = course("P-d", START, days=3, fevers=fevers, pauses=())
    baseline = default_rules()
    candidate = with_overrides(baseline, {"fever_single_c": 38.0})
    assert candidate.content_hash != baseline.content_hash

    report = diff_alerts(
        replay_events(baseline, events),
        replay_events(candidate, events),
        compare_rule_version=False,
    )

    moved = [i for i in report.items if i.outcome is Outcome.TIMING]
    assert len(moved) == 1
    item = moved[0]
    assert item.left is not None and item.right is not None
    assert (item.left.code, item.right.code) == ("fever_sustained", "fever_single")
    assert item.right.device_time == START + timedelta(days=1, hours=4)
    assert item.delta == -timedelta(minutes=60)
    assert report.counts()["missing"] == report.counts()["extra"] == 0
    fever_starts = [
        i for i in report.items if i.any_alert.rule_id == "fever" and i.any_alert.phase == "start"
    ]
    assert len(fever_starts) == 1  # the 37.95 °C day pages under neither set


def test_raising_the_threshold_loses_an_alert_and_the_diff_says_missing() -> None:
    """A single 38.6 °C reading pages at 38.3; at single_c 38.8 (sustained not reached) it
    does not: the diff lists the start and its all-clear as missing from the candidate."""
    fevers = (FeverEpisode(timedelta(hours=10), timedelta(minutes=5), 38.6),)
    events = course("P-e", START, days=1, fevers=fevers, pauses=())
    baseline = default_rules()
    candidate = with_overrides(baseline, {"fever_single_c": 38.8})
    report = diff_alerts(
        replay_events(baseline, events),
        replay_events(candidate, events),
        compare_rule_version=False,
    )
    missing = [i for i in report.items if i.outcome is Outcome.MISSING]
    assert sorted(i.any_alert.phase.value for i in missing) == ["end", "start"]
    assert all(i.any_alert.rule_id == "fever" for i in missing)


def test_advance_to_fires_timers_due_by_then_and_marks_them_end_of_stream() -> None:
    """A pump that goes silent at the end of a stream alarms only when event time moves on:
    without ``advance_to`` no silence alert, with it one, decided at the end of the stream."""
    events = course("P-f", START, days=0.5, fevers=(), pauses=())
    plain = Replay(default_rules())
    plain.feed([(from_telemetry(e), ("memory", None, n)) for n, e in enumerate(events)])
    assert not [i for i in plain.finish() if i.alert.code == "device_silent"]

    advanced = Replay(default_rules())
    advanced.feed([(from_telemetry(e), ("memory", None, n)) for n, e in enumerate(events)])
    later = events[-1].device_time + timedelta(hours=1)
    silent = [i for i in advanced.finish(later) if i.alert.code == "device_silent"]
    assert silent and all(i.position[0] == "end" for i in silent)


def test_pinned_config_overrides_reach_the_engine_per_patient() -> None:
    """A patient override in the pinned config changes that patient's decisions only."""
    fevers = (FeverEpisode(timedelta(hours=5), timedelta(minutes=5), 38.1),)
    events = course("P-g", START, days=0.5, fevers=fevers, pauses=()) + course(
        "P-h", START, days=0.5, fevers=fevers, pauses=()
    )
    config = {
        "profiles": {
            "P-g": {
                "patient_id": "P-g",
                "override": {"version": 1, "overrides": {"fever_single_c": 38.0}},
            }
        }
    }
    alerts = replay_events(pin(config), sorted(events, key=lambda e: e.ingest_time))
    fever_starts = {a.patient_id for a in alerts if a.rule_id == "fever" and a.phase == "start"}
    assert fever_starts == {"P-g"}


def test_a_filtered_replay_moves_time_with_the_other_patients_events_as_live_did() -> None:
    """Live, another patient's readings move the one watermark, so a pump that goes quiet is
    alarmed as silent even if its own patient sends nothing more. Replaying only that patient
    with the others as context reproduces the alarm; without context it never fires."""
    quiet = course("P-q", START, days=0.25, fevers=(), pauses=())
    busy = course("P-r", START, days=1, fevers=(), pauses=())
    stream = sorted(quiet + busy, key=lambda e: e.ingest_time)
    live = [a for a in live_run(RulesConfig(), stream) if a.patient_id == "P-q"]
    assert any(a.code == "device_silent" for a in live)

    with_context = Replay(default_rules())
    with_context.feed(
        [
            (from_telemetry(e), ("kafka" if e.patient_id == "P-q" else "context", 0, n))
            for n, e in enumerate(stream)
        ]
    )
    replayed = [i.alert for i in with_context.finish()]
    assert diff_alerts(live, replayed).identical
    assert with_context.events == len(quiet)

    alone = replay_events(default_rules(), quiet)
    assert not any(a.code == "device_silent" for a in alone)


def test_each_kafka_partition_has_its_own_engine_as_live() -> None:
    """The rules service runs one engine per partition: a busy patient on another partition
    does not move the quiet patient's watermark, so no silence alarm; on the same partition
    (as context) it does."""
    quiet = course("P-q", START, days=0.25, fevers=(), pauses=())
    busy = course("P-r", START, days=1, fevers=(), pauses=())
    stream = sorted(quiet + busy, key=lambda e: e.ingest_time)

    def replay(busy_partition: int) -> list[Alert]:
        run = Replay(default_rules())
        run.feed(
            [
                (
                    from_telemetry(e),
                    ("kafka", 0, n) if e.patient_id == "P-q" else ("context", busy_partition, n),
                )
                for n, e in enumerate(stream)
            ]
        )
        return [i.alert for i in run.finish()]

    assert not any(a.code == "device_silent" for a in replay(busy_partition=1))
    assert any(a.code == "device_silent" for a in replay(busy_partition=0))


def test_archive_events_replayed_as_read_decide_as_pairs_marked_archived() -> None:
    """The archive reader's common case hands over ``AsRead`` batches (no position per event):
    the same alerts at the same positions, the same counts, span and timelines, and the same
    last event per lane, to which a later context event's timer alerts are attributed."""
    lanes = {"P-a": 0, "P-b": 1, "P-q": 0, "P-r": 0}
    fevers = (FeverEpisode(timedelta(days=1, hours=4), timedelta(minutes=100), 38.6),)
    events = sorted(
        course("P-a", START, days=2, fevers=fevers)
        + course("P-b", START + timedelta(hours=3), days=2)
        + course("P-q", START, days=0.25, fevers=(), pauses=()),
        key=lambda e: (e.device_time, e.ingest_time),
    )
    # Later events of another patient on P-q's lane, read as context: they move the lane's
    # time past P-q's silence limit.
    context = [
        (from_telemetry(e), (CONTEXT, None, None))
        for e in course("P-r", START + timedelta(days=2), days=0.5, fevers=(), pauses=())
    ]

    def run(batch: type[AsRead] | None) -> Replay:
        replay = Replay(default_rules(), keep_timelines=True, patient_lane=lanes.__getitem__)
        for start in range(0, len(events), 500):
            part = [from_telemetry(e) for e in events[start : start + 500]]
            replay.feed(batch(part) if batch is not None else [(e, ARCHIVED) for e in part])
        replay.feed(context)
        replay.finish()
        return replay

    pairs = run(None)
    assert any(i.alert.rule_id == "fever" for i in pairs.alerts)
    silent = [i for i in pairs.alerts if i.alert.code == "device_silent"]
    assert silent and all(i.position[0] == "pg" for i in silent)
    # The events are in device-time order, so both kinds of batch hold.
    for as_read in (run(AsRead), run(AsReadByDeviceTime)):
        assert [(i.alert, i.position) for i in as_read.alerts] == [
            (i.alert, i.position) for i in pairs.alerts
        ]
        assert as_read.events == pairs.events == len(events)
        assert (as_read.first_device_time, as_read.last_device_time) == (
            pairs.first_device_time,
            pairs.last_device_time,
        )
        assert as_read.timelines == pairs.timelines


def test_a_batch_not_in_device_time_order_is_spanned_by_its_times() -> None:
    """Only a batch in device-time order is spanned by its ends: one in another order (here
    the latest first) is spanned by its earliest and latest device time."""
    events = [from_telemetry(e) for e in course("P-s", START, days=0.5, fevers=(), pauses=())]
    replay = Replay(default_rules())
    replay.feed(AsRead(events[::-1]))
    assert (replay.first_device_time, replay.last_device_time) == (
        events[0].device_time,
        events[-1].device_time,
    )


def test_kafka_records_replayed_as_read_decide_as_pairs_at_their_offsets() -> None:
    """The Kafka reader's common case hands over one ``PartitionRun`` per partition and fetch
    (no position per record): the same alerts at the same (partition, offset) positions, the
    same counts, span and timelines as the records paired with their positions, and the same
    last event per lane for a later context event's timers; also in a replay laid out by
    patient, which takes the general path."""
    fevers = (FeverEpisode(timedelta(days=1, hours=4), timedelta(minutes=100), 38.6),)
    partition_of = {"P-a": 0, "P-b": 1, "P-q": 0, "P-r": 0}
    events = sorted(
        course("P-a", START, days=2, fevers=fevers)
        + course("P-b", START + timedelta(hours=3), days=2)
        + course("P-q", START, days=0.25, fevers=(), pauses=()),
        key=lambda e: e.ingest_time,
    )
    offsets = {0: 0, 1: 0}
    placed: list[tuple[ReplayEvent, int, int]] = []
    for e in events:
        partition = partition_of[e.patient_id]
        placed.append((from_telemetry(e), partition, offsets[partition]))
        offsets[partition] += 1
    context = [
        (from_telemetry(e), (CONTEXT, 0, 10_000 + n))
        for n, e in enumerate(course("P-r", START + timedelta(days=2), days=0.5, pauses=()))
    ]

    def run(as_runs: bool, by_patient: bool) -> Replay:
        replay = Replay(
            default_rules(),
            keep_timelines=True,
            patient_lane=partition_of.__getitem__ if by_patient else None,
        )
        for start in range(0, len(placed), 700):
            part = placed[start : start + 700]
            if not as_runs:
                replay.feed([(e, ("kafka", p, o)) for e, p, o in part])
                continue
            for partition in (0, 1):
                mine = [(e, o) for e, p, o in part if p == partition]
                replay.feed(PartitionRun(partition, [e for e, _ in mine], [o for _, o in mine]))
        replay.feed(context)
        replay.finish()
        return replay

    for by_patient in (False, True):
        pairs, runs = run(False, by_patient), run(True, by_patient)
        assert any(i.alert.rule_id == "fever" for i in pairs.alerts)
        silent = [i for i in pairs.alerts if i.alert.code == "device_silent"]
        assert silent and all(i.position[0] == "kafka" for i in silent)
        assert sorted(((i.alert, i.position) for i in runs.alerts), key=str) == sorted(
            ((i.alert, i.position) for i in pairs.alerts), key=str
        )
        assert runs.events == pairs.events == len(events)
        assert (runs.first_device_time, runs.last_device_time) == (
            pairs.first_device_time,
            pairs.last_device_time,
        )
        assert runs.timelines == pairs.timelines
