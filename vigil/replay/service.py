"""A replay run end to end: resolve what to read and which rules to pin, read, decide, compare.

Composition for ``vigil replay``: it opens the connections (a Kafka consumer without a group and
a PostgreSQL connection whose every transaction is read-only), drives the readers in ``sources``
into one or two ``Replay``s, and fetches the alerts recorded at the time for comparison. The only
write a replay makes is its own entry in the audit log, on a separate connection, after the run
(and not even that with ``audit=False``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

import asyncpg

from schemas.events import Alert
from schemas.kafka_topics import ALERTS_TOPIC, RULES_STATE_TOPIC, TELEMETRY_TOPIC
from vigil.audit import append
from vigil.audit.actions import AuditAction
from vigil.replay import config_store
from vigil.replay.compare import AlertDiffReport, diff_alerts
from vigil.replay.engine_port import (
    PinnedRules,
    default_rules,
    load_rules_file,
    pin,
    with_overrides,
)
from vigil.replay.progress import ProgressBar
from vigil.replay.runner import Replay
from vigil.replay.sources import (
    ArchiveOrder,
    Batch,
    PartitionRange,
    ReadStats,
    Selection,
    TruncatedStart,
    config_from_state_topic,
    count_archive,
    dedupe_alerts,
    find_truncated_starts,
    make_reader_consumer,
    patients_of_care_team,
    plan_partitions,
    read_archive,
    read_kafka,
    recorded_alerts_from_table,
    recorded_alerts_from_topic,
    registered_patients,
    topic_partitions,
    warmup_offsets,
)
from vigil.settings import KafkaSettings, PostgresSettings

Source = Literal["kafka", "archive"]


@dataclass(frozen=True, slots=True)
class RulesChoice:
    """How to pin a config: a JSON file, a stored version by hash, the version live at a time,
    or (all None) the engine's built-in defaults."""

    file: str | None = None
    version: str | None = None
    at: datetime | None = None
    # A config_version label the live rules service pinned (read from its state topic).
    live: str | None = None
    # For a candidate: the primary config with these default thresholds replaced (what-if).
    what_if: tuple[tuple[str, Any], ...] = ()

    @property
    def needs_database(self) -> bool:
        return self.version is not None or self.at is not None

    def describe(self) -> str:
        if self.what_if:
            return "what-if " + ", ".join(f"{k}={v}" for k, v in self.what_if)
        if self.file:
            return f"file {self.file}"
        if self.live:
            return f"live config {self.live}"
        if self.version:
            return f"version {self.version}"
        if self.at:
            return f"live at {self.at.isoformat()}"
        return "built-in defaults"


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    source: Source
    patient_ids: frozenset[str] | None = None
    device_ids: frozenset[str] | None = None
    care_team_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    offsets: tuple[PartitionRange, ...] = ()
    topic: str = TELEMETRY_TOPIC
    alerts_topic: str = ALERTS_TOPIC
    state_topic: str = RULES_STATE_TOPIC
    order: ArchiveOrder = "device"
    rules: RulesChoice = field(default_factory=RulesChoice)
    candidate: RulesChoice | None = None
    compare_recorded: Literal["table", "topic"] | None = None
    keep_timelines: bool = False
    audit: bool = True
    actor: str = "unknown"
    progress: bool | None = None
    # Move event time here at the end of the stream so timers due by then fire.
    advance_to: datetime | None = None
    # With a filter, read the other patients who shared an engine live, so they move event
    # time as they did (Kafka: the same partition; archive: patients keyed to it).
    context_time: bool = True
    # Archive: how many partitions the telemetry topic has (None: ask Kafka).
    partitions: int | None = None
    # A window that starts mid-stream (--since, or --offsets) is preceded by a warm-up that
    # rebuilds the rule state the live engine had at its start: from ``warmup_since`` (Kafka:
    # record time; archive: device time), by default from the start of the record.
    warmup: bool = True
    warmup_since: datetime | None = None

    def needs_database(self) -> bool:
        return (
            self.source == "archive"
            or self.care_team_id is not None
            or self.compare_recorded == "table"
            or self.rules.needs_database
            or (self.candidate is not None and self.candidate.needs_database)
            or self.audit
        )

    def subject(self) -> str:
        parts: list[str] = []
        if self.care_team_id:
            parts.append(f"care_team:{self.care_team_id}")
        if self.patient_ids:
            parts.append("patients:" + ",".join(sorted(self.patient_ids)))
        if self.device_ids:
            parts.append("devices:" + ",".join(sorted(self.device_ids)))
        return " ".join(parts) or "all"


@dataclass(slots=True)
class ReplayOutcome:
    request: ReplayRequest
    selection: Selection
    primary: Replay
    candidate: Replay | None
    stats: ReadStats
    recorded: list[Alert] | None
    recorded_diff: AlertDiffReport | None
    candidate_diff: AlertDiffReport | None
    elapsed_s: float
    audit_seq: int | None = None
    lanes: int | None = None
    # Kafka partitions whose warm-up (or, for a full replay, whose reading) had to start at a
    # beginning retention had moved: the state at the window start is not the live one.
    truncated: list[TruncatedStart] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.request.source,
            "selection": self.selection.describe(),
            "rules": self.request.rules.describe(),
            "candidate": self.request.candidate.describe() if self.request.candidate else None,
            "config_hash": self.primary.rules.content_hash,
            "candidate_config_hash": self.candidate.rules.content_hash if self.candidate else None,
            "events_read": self.stats.read,
            "events_replayed": self.primary.events,
            "events_rejected": self.stats.rejected,
            "alerts": len(self.primary.alerts),
            "open_at_window_start": len(self.primary.open_at_start()),
            "warmup_events_read": self.stats.warmup_read,
            "warmup_truncated": bool(self.truncated),
            "truncated_partitions": [t.describe() for t in self.truncated],
            "candidate_alerts": len(self.candidate.alerts) if self.candidate else None,
            "recorded_alerts": len(self.recorded) if self.recorded is not None else None,
            "recorded_diff": self.recorded_diff.counts() if self.recorded_diff else None,
            "candidate_diff": self.candidate_diff.counts() if self.candidate_diff else None,
            "first_device_time": _iso(self.primary.first_device_time),
            "last_device_time": _iso(self.primary.last_device_time),
            "elapsed_s": round(self.elapsed_s, 3),
            "events_per_s": round(self.primary.events / self.elapsed_s) if self.elapsed_s else None,
            "audit_seq": self.audit_seq,
            "engine_lanes": self.lanes,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def _pin(
    choice: RulesChoice, conn: Any, kafka: KafkaSettings, state_topic: str
) -> PinnedRules:
    if choice.file is not None:
        return load_rules_file(choice.file)
    if choice.live is not None:
        consumer = make_reader_consumer(kafka, "replay-config")
        await consumer.start()
        try:
            raw = await config_from_state_topic(
                consumer, kafka.bootstrap_servers, state_topic, choice.live
            )
        finally:
            await consumer.stop()
        return pin(raw)
    if choice.version is not None:
        return await config_store.load_config(conn, choice.version)
    if choice.at is not None:
        return await config_store.config_at(conn, choice.at)
    return default_rules()


async def _partition_count(kafka: KafkaSettings, topic: str) -> int:
    return len(await topic_partitions(kafka.bootstrap_servers, topic))


async def _lane_mates(
    conn: Any,
    patients: frozenset[str] | None,
    patient_lane: Callable[[str], int],
) -> frozenset[str]:
    """Registered patients sharing a partition with the selection (all, for a device filter,
    since a device's patient is only known from its rows)."""
    registry = await registered_patients(conn)
    if patients is None:
        return frozenset(registry)
    lanes = {patient_lane(p) for p in patients}
    return frozenset(p for p in registry if patient_lane(p) in lanes) - patients


async def read_only_connection(dsn: str) -> Any:
    """A connection on which every transaction is read-only unless it says otherwise."""
    return await asyncpg.connect(dsn, server_settings={"default_transaction_read_only": "on"})


async def run_replay(
    request: ReplayRequest,
    *,
    kafka: KafkaSettings | None = None,
    postgres: PostgresSettings | None = None,
) -> ReplayOutcome:
    async with AsyncExitStack() as stack:
        conn: Any = None
        if request.needs_database():
            dsn = (postgres or PostgresSettings()).dsn
            conn = await read_only_connection(dsn)
            stack.push_async_callback(conn.close)
        kafka = kafka or KafkaSettings()
        primary_rules = await _pin(request.rules, conn, kafka, request.state_topic)
        candidate_rules: PinnedRules | None = None
        if request.candidate is not None and request.candidate.what_if:
            candidate_rules = with_overrides(primary_rules, dict(request.candidate.what_if))
        elif request.candidate is not None:
            candidate_rules = await _pin(request.candidate, conn, kafka, request.state_topic)

        patients = request.patient_ids
        if request.care_team_id is not None:
            team = await patients_of_care_team(conn, request.care_team_id)
            patients = team | (patients or frozenset())
        selection = Selection(
            patient_ids=patients,
            device_ids=request.device_ids,
            since=request.since,
            until=request.until,
        )
        patient_lane, context_patients, lanes = None, None, None
        if request.source == "archive":
            lanes = request.partitions or await _partition_count(kafka, request.topic)
            patient_lane = PinnedRules.partitioner(lanes)
            filtered = patients is not None or request.device_ids is not None
            if filtered and request.context_time:
                context_patients = await _lane_mates(conn, patients, patient_lane)
        primary = Replay(
            primary_rules, keep_timelines=request.keep_timelines, patient_lane=patient_lane
        )
        candidate = Replay(candidate_rules, patient_lane=patient_lane) if candidate_rules else None
        stats = ReadStats()
        started = time.perf_counter()

        batches: AsyncIterator[Batch]
        consumer = None
        truncated: list[TruncatedStart] = []
        if request.source == "kafka":
            consumer = make_reader_consumer(kafka, "replay")
            await consumer.start()
            stack.push_async_callback(consumer.stop)
            plan = await plan_partitions(
                consumer,
                request.topic,
                bootstrap_servers=kafka.bootstrap_servers,
                since=request.since,
                until=request.until,
                offsets=request.offsets or None,
            )
            lanes = len(plan)
            mid_stream = request.since is not None or bool(request.offsets)
            warm = (
                await warmup_offsets(consumer, plan, request.warmup_since)
                if request.warmup and mid_stream
                else None
            )
            if request.warmup:
                # Said in the summary and the report, never silently: a warm-up that cannot
                # reach back far enough gives the window another starting state than live.
                truncated = await find_truncated_starts(consumer, plan, warm, request.warmup_since)
            # The bar counts the warm-up too: it is read, and it takes time.
            total: int | None = sum(end - start for start, end in plan.values()) + sum(
                plan[tp][0] - offset for tp, offset in (warm or {}).items()
            )
            # Device time filters what is replayed; Kafka's range was by record time.
            batches = read_kafka(
                consumer,
                plan,
                Selection(patients, request.device_ids),
                stats,
                context=request.context_time,
                warmup_from=warm,
            )
        else:
            warm_archive = request.warmup and request.since is not None
            counted = replace(selection, since=request.warmup_since) if warm_archive else selection
            total = await count_archive(conn, counted) if request.progress else None
            batches = read_archive(
                conn,
                selection,
                stats,
                order=request.order,
                context_patients=context_patients,
                warmup=warm_archive,
                warmup_since=request.warmup_since,
            )
        progress = ProgressBar(total, enabled=request.progress)
        read_before = 0
        async for batch in batches:
            primary.feed(batch)
            if candidate is not None:
                candidate.feed(batch)
            progress.advance(stats.read + stats.warmup_read - read_before)
            read_before = stats.read + stats.warmup_read
        progress.close()
        primary.finish(request.advance_to)
        if candidate is not None:
            candidate.finish(request.advance_to)

        recorded: list[Alert] | None = None
        if request.compare_recorded is not None:
            span = Selection(
                patient_ids=patients,
                device_ids=request.device_ids,
                since=window_lower_bound(primary),
                until=request.until if request.source == "archive" else None,
            )
            if request.compare_recorded == "table":
                recorded = await recorded_alerts_from_table(conn, span)
            else:
                alerts_consumer = make_reader_consumer(kafka, "replay-alerts")
                await alerts_consumer.start()
                stack.push_async_callback(alerts_consumer.stop)
                recorded = await recorded_alerts_from_topic(
                    alerts_consumer,
                    request.alerts_topic,
                    span,
                    bootstrap_servers=kafka.bootstrap_servers,
                    since=request.since,
                    until=None,
                )
            recorded = in_window(dedupe_alerts(recorded), primary)
        replayed = [item.alert for item in primary.alerts]
        recorded_diff = (
            diff_alerts(recorded, replayed, left_label="recorded", right_label="replayed")
            if recorded is not None
            else None
        )
        candidate_diff = (
            diff_alerts(
                replayed,
                [item.alert for item in candidate.alerts],
                left_label=f"config {primary_rules.content_hash[:12]}",
                right_label=f"config {candidate.rules.content_hash[:12]}",
                compare_rule_version=False,
            )
            if candidate is not None
            else None
        )
        outcome = ReplayOutcome(
            request=request,
            selection=selection,
            primary=primary,
            candidate=candidate,
            stats=stats,
            recorded=recorded,
            recorded_diff=recorded_diff,
            candidate_diff=candidate_diff,
            elapsed_s=time.perf_counter() - started,
            lanes=lanes,
            truncated=truncated,
        )
        if request.audit:
            outcome.audit_seq = await _audit(request, outcome, (postgres or PostgresSettings()).dsn)
        return outcome


def window_lower_bound(replay: Replay) -> datetime | None:
    """The earliest device time a replay's window speaks for: its first replayed event, or
    the earliest alert it decided (a timer's alert carries its deadline, which can lie just
    before the event that fired it)."""
    first = replay.first_device_time
    if first is None:
        return None
    return min([first, *(item.alert.device_time for item in replay.alerts)])


def in_window(recorded: list[Alert], replay: Replay) -> list[Alert]:
    """The recorded alerts a replay's window can be compared with: from its lower bound on,
    minus what it decided during warm-up (the live service published those before the
    window). No upper bound: a timer's deadline can lie after the last replayed event."""
    lower = window_lower_bound(replay)
    if lower is None:
        return []
    before = {item.alert.alert_id for item in replay.warmup_alerts}
    return [a for a in recorded if a.device_time >= lower and a.alert_id not in before]


async def _audit(request: ReplayRequest, outcome: ReplayOutcome, dsn: str) -> int:
    """The replay's one write: who replayed what, under which config, and what came out."""
    conn = await asyncpg.connect(dsn)
    try:
        summary = outcome.summary()
        summary.pop("audit_seq", None)
        entry = await append(
            conn,
            request.actor,
            AuditAction.REPLAY_RUN,
            request.subject(),
            {
                **summary,
                "offsets": [
                    {"partition": r.partition, "start": r.start, "end": r.end}
                    for r in request.offsets
                ],
                "compare_recorded": request.compare_recorded,
            },
        )
        return entry.seq
    finally:
        await conn.close()
