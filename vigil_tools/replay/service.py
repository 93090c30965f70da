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
from vigil.settings import KafkaSettings, PostgresSettings
from vigil_tools.replay import config_store
from vigil_tools.replay.compare import AlertDiffReport, diff_alerts
from vigil_tools.replay.engine_port import (
    ConfigError,
    PinnedRules,
    default_rules,
    load_rules_file,
    pin,
    with_overrides,
)
from vigil_tools.replay.parallel import (
    Job,
    can_fork,
    default_workers,
    run_jobs,
    split_lanes,
    tuned_collector,
)
from vigil_tools.replay.progress import ProgressBar
from vigil_tools.replay.runner import Replay
from vigil_tools.replay.sources import (
    ArchiveOrder,
    Feed,
    PartitionRange,
    ReadStats,
    Selection,
    TruncatedStart,
    archive_patients,
    archive_reading,
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
    # Worker processes sharing the lanes (``parallel``): None picks one per core for a stream
    # long enough to gain from it; 1 reads in this process.
    workers: int | None = None
    # Archive: read the days sealed for every selected patient as sealed days (``seal``);
    # False reads every row from the readings tables (the same events, in the same order).
    sealed: bool = True

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
    # Processes that shared the reading and deciding (1: this one alone).
    workers: int = 1

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
            "events_from_sealed_days": self.stats.sealed,
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
            "workers": self.workers,
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def _pin_live(raw: dict[str, Any], label: str, conn: Any, dsn: str) -> PinnedRules:
    """The config a state-topic record names: whole in the record when it has no patient
    profiles, else loaded from PostgreSQL by the content hash the record names (on ``conn``,
    or a read-only connection of its own); either way checked against that hash."""
    if "content_hash" not in raw:
        return pin(raw)  # written whole, before the config was stored in pieces
    digest = str(raw["content_hash"])
    if int(raw.get("profiles", 0)) == 0:
        rules = pin({**raw["config"], "config_version": label})
    else:
        own = None if conn is not None else await read_only_connection(dsn)
        try:
            rules = await config_store.load_config(conn if own is None else own, digest)
        finally:
            if own is not None:
                await own.close()
    if rules.content_hash != digest or rules.label != label:
        raise ConfigError(f"the state topic's config {label} does not load as {digest}")
    return rules


async def _pin(
    choice: RulesChoice, conn: Any, kafka: KafkaSettings, state_topic: str, dsn: str
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
        return await _pin_live(raw, choice.live, conn, dsn)
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


#: Below this many records a Kafka replay stays in one process (unless told otherwise): a
#: worker's own consumer takes longer to start than the records take to replay.
PARALLEL_MIN_EVENTS = 50_000


@dataclass(slots=True)
class _Share:
    """What one reading of some lanes decided: sent back by a worker process."""

    primary: Replay
    candidate: Replay | None
    stats: ReadStats


class _Feeder:
    """Builds the jobs that read some lanes and feed them through the pinned configs; the same
    job runs in this process or in a worker."""

    def __init__(
        self,
        request: ReplayRequest,
        primary: PinnedRules,
        candidate: PinnedRules | None,
        patient_lane: Callable[[str], int] | None,
    ) -> None:
        self.request = request
        self.primary = primary
        self.candidate = candidate
        self.patient_lane = patient_lane

    async def feed(
        self, batches: AsyncIterator[Feed], stats: ReadStats, progress: Callable[[int], None]
    ) -> _Share:
        request = self.request
        primary = Replay(
            self.primary, keep_timelines=request.keep_timelines, patient_lane=self.patient_lane
        )
        candidate = (
            Replay(self.candidate, patient_lane=self.patient_lane) if self.candidate else None
        )
        read_before = 0
        async for batch in batches:
            primary.feed(batch)
            if candidate is not None:
                candidate.feed(batch)
            read = stats.read + stats.warmup_read
            progress(read - read_before)
            read_before = read
        primary.finish(request.advance_to)
        if candidate is not None:
            candidate.finish(request.advance_to)
        return _Share(primary, candidate, stats)

    def kafka_job(
        self,
        kafka: KafkaSettings,
        consumer: Any,
        plan: dict[Any, tuple[int, int]],
        warm: dict[Any, int] | None,
        selection: Selection,
    ) -> Job[_Share]:
        """Read ``plan`` with ``consumer``, or (None) with a consumer of the job's own."""

        async def job(progress: Callable[[int], None]) -> _Share:
            own = consumer is None
            reader = make_reader_consumer(kafka, "replay-worker") if own else consumer
            if own:
                await reader.start()
            try:
                stats = ReadStats()
                batches = read_kafka(
                    reader,
                    plan,
                    selection,
                    stats,
                    context=self.request.context_time,
                    warmup_from=warm or None,
                )
                return await self.feed(batches, stats, progress)
            finally:
                if own:
                    await reader.stop()

        return job

    def archive_job(
        self,
        dsn: str,
        conn: Any,
        selection: Selection,
        context_patients: frozenset[str] | None,
        warmup: bool,
        snapshot: str | None,
    ) -> Job[_Share]:
        """Read ``selection`` on ``conn``, or (None) on a connection of the job's own that
        reads ``snapshot``."""
        request = self.request

        async def job(progress: Callable[[int], None]) -> _Share:
            reader = conn if conn is not None else await read_only_connection(dsn)
            try:
                stats = ReadStats()
                batches = read_archive(
                    reader,
                    selection,
                    stats,
                    order=request.order,
                    context_patients=context_patients,
                    warmup=warmup,
                    warmup_since=request.warmup_since,
                    snapshot=snapshot,
                    sealed=request.sealed,
                )
                return await self.feed(batches, stats, progress)
            finally:
                if conn is None:
                    # The worker's own connection, its read-only transaction already ended:
                    # dropped at once (a graceful close waits ~10 ms for the server, and the
                    # last worker's result waits for it).
                    reader.terminate()

        return job


async def _archive_shares(
    conn: Any,
    selection: Selection,
    context_patients: frozenset[str] | None,
    patient_lane: Callable[[str], int],
    wanted: int,
) -> list[tuple[Selection, frozenset[str] | None]]:
    """The archive split by lane into at most ``wanted`` shares: each share's selection (its
    own patients) and context patients. Lanes with no selected patient are not read: their
    engines would decide nothing reported. Every patient is known first (the selection's, or
    every patient with rows), in the caller's snapshot."""
    selected = selection.patient_ids
    if selected is None:
        selected = context_patients if context_patients else await archive_patients(conn)
    by_lane: dict[int, set[str]] = {}
    for patient in selected:
        by_lane.setdefault(patient_lane(patient), set()).add(patient)
    shares = split_lanes({lane: len(p) for lane, p in by_lane.items()}, wanted)
    out: list[tuple[Selection, frozenset[str] | None]] = []
    for lanes in shares:
        patients = frozenset().union(*(by_lane[lane] for lane in lanes))
        if context_patients is None:
            # Every row of these patients is replayed.
            out.append((replace(selection, patient_ids=patients), None))
        elif selection.patient_ids is None:
            # A device filter over everyone: the lanes' patients are read as context and the
            # device's rows picked from them, as in one process.
            out.append((selection, patients))
        else:
            context = frozenset(p for p in context_patients if patient_lane(p) in lanes)
            out.append((replace(selection, patient_ids=patients), context))
    return out


async def run_replay(
    request: ReplayRequest,
    *,
    kafka: KafkaSettings | None = None,
    postgres: PostgresSettings | None = None,
) -> ReplayOutcome:
    async with AsyncExitStack() as stack:
        conn: Any = None
        dsn = (postgres or PostgresSettings()).dsn
        if request.needs_database():
            conn = await read_only_connection(dsn)
            stack.push_async_callback(conn.close)
        kafka = kafka or KafkaSettings()
        primary_rules = await _pin(request.rules, conn, kafka, request.state_topic, dsn)
        candidate_rules: PinnedRules | None = None
        if request.candidate is not None and request.candidate.what_if:
            candidate_rules = with_overrides(primary_rules, dict(request.candidate.what_if))
        elif request.candidate is not None:
            candidate_rules = await _pin(request.candidate, conn, kafka, request.state_topic, dsn)

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
        feeder = _Feeder(request, primary_rules, candidate_rules, patient_lane)
        wanted = request.workers if request.workers is not None else default_workers()
        started = time.perf_counter()
        jobs: list[Job[_Share]] = []
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
            sizes = {
                tp: end - start + (start - (warm or {}).get(tp, start))
                for tp, (start, end) in plan.items()
            }
            total: int | None = sum(sizes.values())
            if request.workers is None and (total or 0) < PARALLEL_MIN_EVENTS:
                wanted = 1
            # Device time filters what is replayed; Kafka's range was by record time.
            reading = Selection(patients, request.device_ids)
            shares = split_lanes(sizes, wanted) if wanted > 1 and can_fork() else []
            if len(shares) > 1:
                warm_from = warm or {}
                # The first share is read here, by this process's own consumer.
                jobs = [
                    feeder.kafka_job(
                        kafka,
                        consumer if n == 0 else None,
                        {tp: plan[tp] for tp in share},
                        {tp: warm_from[tp] for tp in share if tp in warm_from},
                        reading,
                    )
                    for n, share in enumerate(shares)
                ]
            else:
                jobs = [feeder.kafka_job(kafka, consumer, plan, warm, reading)]
        else:
            warm_archive = request.warmup and request.since is not None
            assert patient_lane is not None
            snapshot: str | None = None
            shares_of: list[tuple[Selection, frozenset[str] | None]] = []

            async def export_snapshot() -> str:
                # One instant for every worker: this transaction exports its snapshot and
                # stays open until they have all read.
                transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                await transaction.start()
                stack.push_async_callback(transaction.rollback)
                return str(await conn.fetchval("SELECT pg_export_snapshot()"))

            if wanted > 1 and can_fork():
                if selection.patient_ids is None and not context_patients:
                    # The patients to split are listed from the archive, in that instant.
                    snapshot = await export_snapshot()
                shares_of = await _archive_shares(
                    conn, selection, context_patients, patient_lane, wanted
                )
                if len(shares_of) > 1 and snapshot is None:
                    snapshot = await export_snapshot()
            # The bar counts every row read: warm-up and context rows too.
            counted = archive_reading(
                selection, context_patients, warm_archive, request.warmup_since
            )
            total = await count_archive(conn, counted) if request.progress else None
            if len(shares_of) > 1:
                # The first share is read here, in the very transaction that exported the
                # snapshot (the same instant); the others by workers that import it.
                jobs = [
                    feeder.archive_job(
                        dsn,
                        conn if n == 0 else None,
                        share,
                        context,
                        warm_archive,
                        None if n == 0 else snapshot,
                    )
                    for n, (share, context) in enumerate(shares_of)
                ]
            else:
                jobs = [
                    feeder.archive_job(dsn, conn, selection, context_patients, warm_archive, None)
                ]
        progress = ProgressBar(total, enabled=request.progress)
        with tuned_collector():
            if len(jobs) > 1:
                # One share in this process, the others in forked workers.
                shares_done = await run_jobs(jobs[1:], progress.advance, here=jobs[0])
            else:
                shares_done = [await jobs[0](progress.advance)]
        progress.close()
        primary = Replay(
            primary_rules, keep_timelines=request.keep_timelines, patient_lane=patient_lane
        )
        candidate = Replay(candidate_rules, patient_lane=patient_lane) if candidate_rules else None
        stats = ReadStats()
        for share in shares_done:
            primary.absorb(share.primary)
            if candidate is not None and share.candidate is not None:
                candidate.absorb(share.candidate)
            stats.absorb(share.stats)
        primary.order_alerts()
        if candidate is not None:
            candidate.order_alerts()

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
            workers=len(jobs),
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
