"""End-to-end benchmark: fever and pump occlusion → page, while a background fleet streams.

What runs: the local stack; ingest, rules, notify and the heartbeat as separate processes
(``python -m vigil_tools.cli <service>``, as ``vigil run`` starts them), each on its defaults
except its ports, its consumer groups (new per run, starting at the topics' ends), rules' state
topic (new per run), the heartbeat's last sighting (forgotten: the pipeline starts as a fresh
deployment, so the time since an earlier run is not recorded as a pipeline outage whose summary
pages would land in the measured levels) and notify's providers: a real SMTP server and a
PagerDuty-shaped Events v2 server (``tests/support/notify``), both in a helper process of their
own that stamps the time it accepts each page. One care team whose escalation policy's first
tier pages two people at once: a nurse by e-mail and a pager by PagerDuty; no quiet hours;
every injected fever or occlusion is its patient's first alert, which notify pages at once (the
bundling window opens behind it).

1. Capacity: unless ``--capacity`` is given, the offered fleet load is stepped upward with the
   whole pipeline running (the search of ``bench/ingest.py --search``: ``--start-rate``, times
   ``--factor`` per ``--step-s`` step, one midpoint after the first failure); a step is sustained
   when every reading is stored and in Kafka, rules has consumed them, and the backlog (published
   and not yet both stored and consumed by rules) does not grow through it. The capacity is the
   highest sustained rate.
2. Levels: idle (no fleet), then the fleet at 50 % and 90 % of the capacity. At each level,
   after ``--warm-s`` of fleet, ``--events`` fevers and as many occlusions are published through
   MQTT, alternating, ``--gap-s`` apart, each for a patient of its own: a fever is one oral
   reading of 38.9 °C (the default fever rule pages one reading ≥ 38.3 °C, no confirming
   reading), an occlusion one pump event ``alarm_raised`` / ``occlusion_downstream``. Each is
   timed from its publish (its ``device_time``, stamped just before the PUBLISH is written) to
   the page accepted by the SMTP server (before its 250 reply) and by the
   PagerDuty-shaped server (before its 202 reply).
3. Per stage, from what the pipeline records: the reading's ``stored_at`` and its telemetry
   record's Kafka timestamp (ingest), the alert's record timestamp on the alerts topic (rules),
   ``alerts.received_at``, ``pages.created_at``, the first ``delivery_attempts`` row's
   ``started_at`` and ``at`` (notify), the provider's acceptance.

Figures: p50, p99 and max per level and channel, pages lost (an injection without its page on a
channel when the run ends; each level waits up to ``--page-timeout`` for its pages), the ratio
of each level's p99 to the idle one. Loopback only; bounded in count and time; prints progress
on stderr and ONE JSON line on stdout. No assertions on the figures.

    make bench-e2e                      # about 3 min
    python bench/e2e.py --quick         # smoke run, under 2 min
    python bench/e2e.py --capacity 3500 # skip the search
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.request import urlopen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import QosOnePublisher, paced, percentile, stack_environment, wait_until
from bench.ingest import (
    OffsetProbe,
    _stop,
    connect_publishers,
    drop_session,
    end_offsets,
    make_payload_factory,
    register,
    search_steps,
    wait_subscribed,
)
from schemas.kafka_topics import ALERTS_TOPIC, TELEMETRY_TOPIC
from schemas.topics import topic_for
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from vigil.db.migrate import apply_migrations
from vigil_tools.localrun import HEARTBEAT_DEVICE_ID, heartbeat_env, register_heartbeat

ROOT = Path(__file__).resolve().parents[1]
# Service ports: the task's range (the stack's own are set by VIGIL_STACK_*).
PORTS = {"ingest": 44101, "rules": 44102, "notify": 44103, "notify_api": 44104}
CHANNELS = ("email", "pagerduty")
PATIENT_RE = re.compile(rb"PE2E[0-9a-f]{6}-[fo]\d{4}")


def log(**fields: Any) -> None:
    print(json.dumps(fields, default=str), file=sys.stderr, flush=True)


# --- the providers' process -------------------------------------------------------------------


def serve_providers() -> int:
    """``bench/e2e.py --providers``: the SMTP server and the PagerDuty-shaped server in this
    process; one JSON line with their addresses, then one per page accepted (channel, epoch
    seconds, the patient ids it names)."""
    from tests.support.notify import PagerDutyLikeServer, SmtpSink

    lock = threading.Lock()

    def emit(channel: str, raw: bytes) -> None:
        at = time.time()
        patients = sorted({m.decode() for m in PATIENT_RE.findall(raw)})
        with lock:
            print(json.dumps({"channel": channel, "at": at, "patients": patients}), flush=True)

    class TimedSink(SmtpSink):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            emit("email", bytes(envelope.content))
            return "250 2.0.0 Ok: queued"

    def accept(event: dict[str, Any]) -> int:
        if event.get("event_action") == "trigger":
            emit("pagerduty", json.dumps(event).encode())
        return 202

    with TimedSink() as smtp, PagerDutyLikeServer() as pagerduty:
        pagerduty.respond = accept
        print(json.dumps({"smtp_port": smtp.port, "pagerduty_url": pagerduty.url}), flush=True)
        # Until the parent closes our stdin (or ends).
        sys.stdin.read()
    return 0


@dataclass
class Providers:
    process: subprocess.Popen[str]
    smtp_port: int
    pagerduty_url: str
    accepted: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls) -> Providers:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--providers"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        providers = cls(process, int(first["smtp_port"]), str(first["pagerduty_url"]))
        threading.Thread(target=providers._read, daemon=True).start()
        return providers

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.accepted.append(json.loads(line))

    def first(self) -> dict[tuple[str, str], float]:
        """(patient, channel) -> when the first page naming that patient was accepted."""
        out: dict[tuple[str, str], float] = {}
        for row in list(self.accepted):
            for patient in row["patients"]:
                key = (patient, row["channel"])
                out[key] = min(out.get(key, row["at"]), row["at"])
        return out

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- registry and services --------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    kind: str  # fever | occlusion
    patient: str
    device: str
    level: str = ""
    message_id: str = ""
    published: float = 0.0  # epoch seconds, the message's device_time


async def register_team(dsn: str, run: str, patients: list[tuple[str, str, str]]) -> None:
    """The paging care team (first tier: a nurse by e-mail and a pager by PagerDuty, at once)
    and the injection patients with their thermometer or pump."""
    team = f"team-e2e-{run}"
    since = datetime.now(UTC) - timedelta(days=1)
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "End-to-end benchmark", f"oncall-{run}@bench.test")
        targets = []
        for person, channel, address in (
            (f"{team}-nurse", "email", f"nurse-{run}@bench.test"),
            (f"{team}-pager", "webhook", f"rk-{run}"),
        ):
            await conn.execute(
                "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, $1, $2)",
                person,
                team,
            )
            await conn.execute(
                "INSERT INTO contact_methods (person_id, rank, channel, address) "
                "VALUES ($1, 0, $2, $3)",
                person,
                channel,
                address,
            )
            targets.append({"kind": "person", "ref": person})
        await conn.execute(
            "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, "
            "repeat_count) VALUES ($1, $2, 'e-mail and PagerDuty at once', $3::jsonb, 0)",
            f"policy-{team}",
            team,
            json.dumps([{"wait_s": 300, "targets": targets}]),
        )
        for patient, device, kind in patients:
            await upsert_patient(conn, patient, team)
            await upsert_device(conn, device, kind, "bench")
            await bind_device(conn, device, patient, since)
    finally:
        await conn.close()


async def start_groups_at_end(bootstrap: str, groups: dict[str, str]) -> None:
    """Commit each new consumer group's offsets at its topic's end, so the services read only
    what this run publishes (the topics keep earlier runs' records)."""
    for group, topic in groups.items():
        ends = await end_offsets(bootstrap, topic)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(list(ends))
            await consumer.commit(dict(ends))
        finally:
            await _stop(consumer)


def state_topic(run: str) -> str:
    return f"vigil.rules.state.e2e-{run}"


async def create_state_topic(bootstrap: str, run: str) -> None:
    """Rules' state topic, new per run: a run starts from no state, and a state another
    version of rules wrote is never read."""
    partitions = len(await end_offsets(bootstrap, TELEMETRY_TOPIC))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(state_topic(run), partitions, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()


async def delete_state_topic(bootstrap: str, run: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([state_topic(run)])
    finally:
        await admin.close()


async def forget_heartbeat(dsn: str) -> None:
    """Notify's record of the heartbeat from an earlier run: removed, so that notify starts
    watching it afresh. Kept, the time between two runs is a pipeline outage that notify
    records when the heartbeat resumes, and pages a summary of (about 70 pages, naming every
    patient registered), in the middle of the measured levels."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM pipeline_heartbeats WHERE source = $1", HEARTBEAT_DEVICE_ID)
    finally:
        await conn.close()


def service_env(env: dict[str, str], run: str, providers: Providers, root: Path) -> dict[str, str]:
    child = dict(os.environ)
    child.update(env)
    child.update(heartbeat_env(env))
    child.update(
        {
            "PYTHONPATH": str(root),
            "VIGIL_INGEST_MQTT_CLIENT_ID": f"e2e-{run}-ingest",
            "VIGIL_INGEST_METRICS_PORT": str(PORTS["ingest"]),
            "VIGIL_RULES_GROUP_ID": f"rules-e2e-{run}",
            "VIGIL_RULES_TRANSACTIONAL_ID": f"rules-e2e-{run}-0",
            "VIGIL_RULES_OPS_PORT": str(PORTS["rules"]),
            "VIGIL_RULES_STATE_TOPIC": state_topic(run),
            "VIGIL_NOTIFY_GROUP_ID": f"notify-e2e-{run}",
            "VIGIL_NOTIFY_OPS_PORT": str(PORTS["notify"]),
            "VIGIL_NOTIFY_API_PORT": str(PORTS["notify_api"]),
            "VIGIL_NOTIFY_SMTP_HOST": "127.0.0.1",
            "VIGIL_NOTIFY_SMTP_PORT": str(providers.smtp_port),
            "VIGIL_NOTIFY_PAGERDUTY_EVENTS_URL": providers.pagerduty_url,
        }
    )
    return child


def start_services(
    child: dict[str, str], log_dir: Path, root: Path
) -> dict[str, subprocess.Popen[bytes]]:
    processes = {}
    for name in ("ingest", "rules", "notify", "heartbeat"):
        with (log_dir / f"{name}.log").open("wb") as out:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "vigil_tools.cli", name],
                env=child,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
            )
    return processes


def ready(port: int) -> bool:
    try:
        with urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return int(answer.status) == 200
    except OSError:
        return False


async def wait_ready(processes: dict[str, subprocess.Popen[bytes]], log_dir: Path) -> None:
    await wait_subscribed(log_dir / "ingest.log")
    for name in ("ingest", "rules", "notify"):
        port = PORTS[name]

        async def up(port: int = port) -> bool:
            for service, process in processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{service} exited; see {log_dir}/{service}.log")
            return await asyncio.to_thread(ready, port)

        if not await wait_until(up, 90):
            raise RuntimeError(f"{name} not ready; see {log_dir}/{name}.log")


def stop_services(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# --- injections -------------------------------------------------------------------------------


def event_payload(injection: Injection, message_id: str, at: datetime) -> tuple[str, bytes]:
    stamp = at.isoformat(timespec="microseconds")
    if injection.kind == "fever":
        body: dict[str, Any] = {
            "schema": "vigil.device.temperature.v1",
            "value": 38.9,
            "unit": "C",
            "site": "oral",
        }
        channel = "temperature"
    else:
        body = {
            "schema": "vigil.device.pump_event.v1",
            "event": "alarm_raised",
            "alarm": "occlusion_downstream",
            "detail": "downstream occlusion; infusion stopped",
        }
        channel = "pump-event"
    body |= {
        "message_id": message_id,
        "device_id": injection.device,
        "seq": 1,
        "device_time": stamp,
    }
    return topic_for(injection.device, channel), orjson.dumps(body)


async def inject(
    publisher: QosOnePublisher, planned: list[Injection], level: str, gap_s: float
) -> list[Injection]:
    done = []
    t0 = time.monotonic()
    for i, injection in enumerate(planned):
        delay = t0 + i * gap_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        message_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        topic, payload = event_payload(injection, message_id, now)
        # No await before the write: publish() only waits when its window is full.
        await publisher.publish(topic, payload)
        done.append(
            Injection(
                injection.kind,
                injection.patient,
                injection.device,
                level,
                message_id,
                now.timestamp(),
            )
        )
    await publisher.drain()
    return done


def plan(run: str, count: int, levels: int) -> list[list[Injection]]:
    """Per level: ``count`` fevers and ``count`` occlusions, alternating, each its own patient."""
    out: list[list[Injection]] = []
    n = 0
    for _ in range(levels):
        level = []
        for i in range(2 * count):
            kind = "fever" if i % 2 == 0 else "occlusion"
            patient = f"PE2E{run}-{kind[0]}{n:04d}"
            prefix = "te2e" if kind == "fever" else "pe2e"
            level.append(Injection(kind, patient, f"{prefix}-{run}-{n:04d}"))
            n += 1
        out.append(level)
    return out


# --- the run ----------------------------------------------------------------------------------


class Pipeline:
    """What the bench reads while the services run: stored readings and rules' lag."""

    def __init__(self, env: dict[str, str], rules_group: str, fleet_patients: list[str]) -> None:
        self.dsn = env["VIGIL_PG_DSN"]
        self.bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
        self.rules_group = rules_group
        self.fleet_patients = fleet_patients
        self.telemetry = OffsetProbe(self.bootstrap, TELEMETRY_TOPIC)
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        self.conn: asyncpg.Connection | None = None
        self._committed_at: dict[datetime, int] = {}

    async def start(self) -> None:
        await self.telemetry.start()
        await self.admin.start()
        self.conn = await asyncpg.connect(self.dsn)

    async def stop(self) -> None:
        await self.telemetry.stop()
        await self.admin.close()
        if self.conn is not None:
            await self.conn.close()

    async def rules_lag(self) -> int:
        ends = await self.telemetry.consumer.end_offsets(self.telemetry.partitions)
        committed = await self.admin.list_consumer_group_offsets(self.rules_group)
        return sum(
            max(0, end - (committed[tp].offset if tp in committed else 0))
            for tp, end in ends.items()
        )

    async def stored(self, since: datetime) -> int:
        assert self.conn is not None
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM temperature_readings "
                "WHERE patient_id = ANY($1::text[]) AND device_time >= $2",
                self.fleet_patients,
                since,
            )
        )

    async def rules_committed(self) -> int:
        committed = await self.admin.list_consumer_group_offsets(self.rules_group)
        return sum(meta.offset for tp, meta in committed.items() if tp.topic == TELEMETRY_TOPIC)

    async def through(self, since: datetime) -> int:
        """What has come through since ``since``: the fewer of the fleet readings stored and
        the telemetry records rules has committed since then. The first call for a ``since``
        (the search step's start) waits until rules has caught up, then takes that as its
        base: a batch ingest appended to Kafka after storing it must not count for the next
        step. Rules' count includes heartbeats and transaction markers (a few records)."""
        if since not in self._committed_at:
            slack = len(self.telemetry.partitions)

            async def caught_up() -> bool:
                return await self.rules_lag() <= slack

            await wait_until(caught_up, 60)
            self._committed_at[since] = await self.rules_committed()
        rules = await self.rules_committed() - self._committed_at[since]
        return min(await self.stored(since), rules)


async def run_level(
    args: argparse.Namespace,
    name: str,
    rate: float,
    fleet: list[QosOnePublisher],
    make: Any,
    injector: QosOnePublisher,
    planned: list[Injection],
    providers: Providers,
    pipeline: Pipeline,
) -> tuple[list[Injection], dict[str, Any]]:
    seconds = args.warm_s + len(planned) * args.gap_s + 2.0
    since = datetime.now(UTC)
    load1 = os.getloadavg()[0]
    fleet_task = (
        asyncio.create_task(paced(fleet, make, rate, seconds, int(rate * seconds) + 1))
        if rate > 0
        else None
    )
    if fleet_task is not None:
        await asyncio.sleep(args.warm_s)
    injected = await inject(injector, planned, name, args.gap_s)
    fleet_figures: dict[str, Any] = {}
    if fleet_task is not None:
        sent, started, finished = await fleet_task
        fleet_figures = {
            "fleet_offered_per_s": round(rate),
            "fleet_published_per_s": round(sent / max(finished - started, 1e-9)),
        }

    async def paged() -> bool:
        first = providers.first()
        return all((i.patient, c) in first for i in injected for c in CHANNELS)

    await wait_until(paged, args.page_timeout)
    # The next level starts from a drained pipeline.
    base = await pipeline.stored(since)

    async def drained() -> bool:
        return await pipeline.rules_lag() <= len(pipeline.telemetry.partitions)

    caught_up = await wait_until(drained, args.drain_timeout)
    log(level=name, rate=round(rate), stored=base, rules_caught_up=caught_up, load1=load1)
    return injected, {"level": name, "load1": load1, "rules_caught_up": caught_up, **fleet_figures}


async def scan_committed(
    bootstrap: str, topic: str, start: dict[TopicPartition, int], keep: Any
) -> list[tuple[str, int]]:
    """(key, record timestamp ms) of the records ``keep`` selects, from ``start`` to the end.
    Ends on the consumer's position, not on the last record's offset: a transactional topic's
    last offset is a transaction marker, never returned as a record."""
    end = await end_offsets(bootstrap, topic)
    parts = [tp for tp in end if end[tp] > start.get(tp, 0)]
    found: list[tuple[str, int]] = []
    if not parts:
        return found
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start.get(tp, 0))
        deadline = time.monotonic() + 120
        remaining = set(parts)
        while remaining and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for record in records:
                    key = keep(record.value)
                    if key is not None:
                        found.append((key, record.timestamp))
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
    finally:
        await _stop(consumer)
    return found


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values, default=None)),
    }


async def stage_times(
    env: dict[str, str],
    injections: list[Injection],
    telemetry_start: dict[TopicPartition, int],
    alerts_start: dict[TopicPartition, int],
) -> dict[str, dict[str, float]]:
    """Per injected message id: epoch seconds of each stage the pipeline records."""
    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    by_id = {i.message_id: i for i in injections}
    by_patient = {i.patient: i for i in injections}
    out: dict[str, dict[str, float]] = {i.message_id: {} for i in injections}

    mark = injections[0].device.split("-")[1].encode() if injections else b"-"

    def keep_telemetry(value: bytes) -> str | None:
        if mark not in value:
            return None
        message_id = str(orjson.loads(value)["message"]["message_id"])
        return message_id if message_id in by_id else None

    def keep_alert(value: bytes) -> str | None:
        if b"PE2E" not in value:
            return None
        doc = orjson.loads(value)
        injection = by_patient.get(str(doc.get("patient_id")))
        if injection is None or doc.get("phase") != "start":
            return None
        return injection.message_id

    for key, stage, start, topic in (
        (keep_telemetry, "telemetry_kafka", telemetry_start, TELEMETRY_TOPIC),
        (keep_alert, "alert_kafka", alerts_start, ALERTS_TOPIC),
    ):
        found = await scan_committed(bootstrap, topic, start, key)
        for message_id, timestamp in found:
            times = out[message_id]
            times[stage] = min(times.get(stage, timestamp / 1000), timestamp / 1000)

    conn = await asyncpg.connect(env["VIGIL_PG_DSN"])
    try:
        ids = [uuid.UUID(m) for m in by_id]
        for table in ("temperature_readings", "pump_events"):
            for row in await conn.fetch(
                f"SELECT message_id, stored_at FROM {table} WHERE message_id = ANY($1::uuid[])",
                ids,
            ):
                out[str(row["message_id"])]["stored"] = row["stored_at"].timestamp()
        patients = list(by_patient)
        for row in await conn.fetch(
            "SELECT patient_id, min(received_at) AS at FROM alerts "
            "WHERE patient_id = ANY($1::text[]) AND phase = 'start' GROUP BY patient_id",
            patients,
        ):
            out[by_patient[row["patient_id"]].message_id]["notify_alert_row"] = row[
                "at"
            ].timestamp()
        for row in await conn.fetch(
            """
            SELECT p.patient_id, p.channel, min(p.created_at) AS created,
                   min(d.started_at) AS attempt_started, min(d.at) AS attempt_recorded
            FROM pages p LEFT JOIN delivery_attempts d
                ON d.page_id = p.page_id AND d.attempt = 1
            WHERE p.patient_id = ANY($1::text[])
            GROUP BY p.patient_id, p.channel
            """,
            patients,
        ):
            channel = "pagerduty" if row["channel"] == "webhook" else str(row["channel"])
            times = out[by_patient[row["patient_id"]].message_id]
            for column in ("created", "attempt_started", "attempt_recorded"):
                if row[column] is not None:
                    times[f"{channel}_page_{column}"] = row[column].timestamp()
    finally:
        await conn.close()
    return out


STAGES = (
    "stored",
    "telemetry_kafka",
    "alert_kafka",
    "notify_alert_row",
    *(
        f"{c}_{s}"
        for c in CHANNELS
        for s in ("page_created", "page_attempt_started", "accepted", "page_attempt_recorded")
    ),
)


def level_figures(
    injections: list[Injection],
    accepted: dict[tuple[str, str], float],
    stages: dict[str, dict[str, float]],
) -> dict[str, Any]:
    figures: dict[str, Any] = {"injected": len(injections)}
    lost = 0
    both: list[float] = []
    for channel in CHANNELS:
        latencies = []
        by_kind: dict[str, list[float]] = {"fever": [], "occlusion": []}
        for i in injections:
            at = accepted.get((i.patient, channel))
            if at is None:
                continue
            latencies.append(at - i.published)
            by_kind[i.kind].append(at - i.published)
            stages[i.message_id][f"{channel}_accepted"] = at
        figures[channel] = summary(latencies) | {
            "lost": len(injections) - len(latencies),
            "p99_ms_by_kind": {k: ms(percentile(v, 99)) for k, v in by_kind.items()},
        }
    for i in injections:
        ats = [accepted.get((i.patient, c)) for c in CHANNELS]
        if any(a is None for a in ats):
            lost += 1
        else:
            both.append(max(a for a in ats if a is not None) - i.published)
    figures["both_channels"] = summary(both)
    figures["injections_not_paged_on_both"] = lost
    figures["stages_ms_from_publish"] = {
        stage: {
            "p50": ms(percentile(v, 50)),
            "p99": ms(percentile(v, 99)),
        }
        for stage in STAGES
        if (
            v := [
                stages[i.message_id][stage] - i.published
                for i in injections
                if stage in stages[i.message_id]
            ]
        )
    }
    return figures


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    env = stack_environment()
    dsn, bootstrap = env["VIGIL_PG_DSN"], env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    await apply_migrations(dsn)
    run = uuid.uuid4().hex[:6]
    log_dir = Path(os.environ.get("VIGIL_STACK_DATA_DIR", ".vigil-test")) / "bench" / f"e2e-{run}"
    log_dir.mkdir(parents=True, exist_ok=True)
    shares = (0.0, 0.5, 0.9)
    names = ("idle", "load_50", "load_90")
    planned = plan(run, args.events, len(shares) + 1)  # the first: the discarded warm-up
    warm_plan = planned[0][:4]
    await register_team(
        dsn,
        run,
        [
            (i.patient, i.device, "thermometer" if i.kind == "fever" else "pump")
            for level in planned
            for i in level
        ],
    )
    devices = await register(dsn, run, "fleet", args.devices)
    await register_heartbeat(dsn)
    await forget_heartbeat(dsn)
    rules_group, notify_group = f"rules-e2e-{run}", f"notify-e2e-{run}"
    await start_groups_at_end(bootstrap, {rules_group: TELEMETRY_TOPIC, notify_group: ALERTS_TOPIC})
    await create_state_topic(bootstrap, run)
    telemetry_start = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    alerts_start = await end_offsets(bootstrap, ALERTS_TOPIC)

    providers = Providers.start()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    pipeline = Pipeline(env, rules_group, [f"P-{d}" for d in devices])
    results: dict[str, Any] = {
        "bench": "e2e",
        "run": run,
        "devices": args.devices,
        "events_per_kind_per_level": args.events,
        "gap_s": args.gap_s,
        "load1_before": os.getloadavg()[0],
        "cores": os.cpu_count(),
    }
    injected: dict[str, list[Injection]] = {}
    levels: list[dict[str, Any]] = []
    root = Path(args.services_root)
    try:
        processes = start_services(service_env(env, run, providers, root), log_dir, root)
        await wait_ready(processes, log_dir)
        await pipeline.start()
        fleet = await connect_publishers(env, f"e2e-{run}-fleet", args)
        injector = QosOnePublisher(
            "127.0.0.1",
            int(env["VIGIL_MQTT_PORT"]),
            f"e2e-{run}-inject",
            env["VIGIL_SIM_MQTT_USERNAME"],
            env["VIGIL_SIM_MQTT_PASSWORD"],
            window=100,
        )
        await injector.connect()
        make = make_payload_factory(devices)
        # Warm-up, discarded: first pages pay for cold connections and first calls.
        warm, _ = await run_level(
            args, "warm_up", 0, fleet, make, injector, warm_plan, providers, pipeline
        )
        if args.capacity:
            results["capacity"] = {"given_readings_per_s": args.capacity}
            capacity = float(args.capacity)
        else:
            searched = await search_steps(
                args, fleet, make, pipeline.through, pipeline.telemetry, "capacity"
            )
            results["capacity"] = searched
            capacity = float(searched["capacity_readings_per_s"] or 0)
            if not capacity:
                raise RuntimeError("no sustained step in the capacity search")
        for share, name, level_plan in zip(shares, names, planned[1:], strict=True):
            done, figures = await run_level(
                args, name, share * capacity, fleet, make, injector, level_plan, providers, pipeline
            )
            injected[name] = done
            levels.append(figures | {"share_of_capacity": share})
        for publisher in [*fleet, injector]:
            await publisher.close()
    finally:
        await pipeline.stop()
        stop_services(processes)
        with contextlib.suppress(Exception):
            await drop_session(env, f"e2e-{run}-ingest")
        with contextlib.suppress(Exception):
            await delete_state_topic(bootstrap, run)
        providers.stop()
    every = [i for done in injected.values() for i in done] + warm
    stages = await stage_times(env, every, telemetry_start, alerts_start)
    accepted = providers.first()
    idle: dict[str, Any] | None = None
    for figures in levels:
        name = figures["level"]
        figures |= level_figures(injected[name], accepted, stages)
        if name == "idle":
            idle = figures
        elif idle is not None:
            figures["p99_ratio_to_idle"] = {
                c: round(figures[c]["p99_ms"] / idle[c]["p99_ms"], 2)
                if figures[c]["p99_ms"] and idle[c]["p99_ms"]
                else None
                for c in (*CHANNELS, "both_channels")
            }
        target = {"load_50": 250.0, "load_90": 1000.0}.get(name)
        if target is not None:
            p99 = figures["both_channels"]["p99_ms"]
            figures["target_p99_ms"] = target
            figures["target_met"] = (
                p99 is not None and p99 <= target and figures["injections_not_paged_on_both"] == 0
            )
    results["levels"] = levels
    results["pages_lost"] = sum(f["injections_not_paged_on_both"] for f in levels)
    results["load1_after"] = os.getloadavg()[0]
    results["logs"] = str(log_dir)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--providers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 2 min")
    parser.add_argument("--capacity", type=float, default=0, help="readings/s; skips the search")
    parser.add_argument("--events", type=int, default=20, help="fevers (and occlusions) a level")
    parser.add_argument("--gap-s", type=float, default=0.5, help="between two injections")
    parser.add_argument("--warm-s", type=float, default=5.0, help="fleet before the first one")
    parser.add_argument("--devices", type=int, default=200, help="fleet thermometers")
    parser.add_argument("--connections", type=int, default=2, help="fleet MQTT connections")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--page-timeout", type=float, default=30.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--start-rate", type=float, default=2000.0)
    parser.add_argument("--factor", type=float, default=1.25)
    parser.add_argument("--step-s", type=float, default=10.0)
    parser.add_argument("--refine", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=14)
    parser.add_argument("--max-wall-s", type=float, default=900.0)
    parser.add_argument(
        "--services-root",
        default=str(ROOT),
        help="the source tree the services run from (default: this one), e.g. a `git archive` "
        "export of the commit to measure",
    )
    args = parser.parse_args(argv)
    if args.providers:
        return serve_providers()
    args.services_root = str(Path(args.services_root).absolute())
    if args.quick:
        args.events, args.step_s, args.warm_s = min(args.events, 8), 5.0, 3.0
        args.refine, args.max_steps = 0, min(args.max_steps, 7)
    # A SIGTERM (timeout, Ctrl-C's sibling) stops the services too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    figures = asyncio.run(asyncio.wait_for(main_async(args), args.max_wall_s))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
