"""Alarm-burden benchmark: simulated home courses through the whole pipeline, every page e-mail
classified against the ground truth.

What runs: a seeded course (``vigil_tools.simulator.course``: spot-check and patch thermometers,
pumps with routine bag changes, hub dropouts with buffered forwarding, probe-off readings,
fevers, occlusions, low batteries, pump stops) published over MQTT to the test stack's broker;
ingest, rules and notify in this process; the pipeline heartbeat; a local SMTP server keeping
every page e-mail's headers. Isolation on the shared test stack: a PostgreSQL schema of its own (the
services' ``search_path``; migrated, dropped at the end), Kafka topics of its own (suffixed with
the run id, deleted at the end), its own MQTT share group and consumer groups, run-scoped
patient and device ids. Loopback only.

Time compression (docs: README "Tests and benchmarks"): a run replays days of device time in
minutes, so every clock the decisions use runs on one **simulated clock** that moves in steps
(``--step-s``, 60 s of device time by default):

1. the clock is set to the step's end; every message the hubs deliver up to then (in delivery
   order: a dropout's buffer at its end, with original device times, ids and seqs) and one
   pipeline heartbeat stamped with that time are published;
2. the step ends only when ingest has admitted all of them: ingest stamps its ingest time from
   the simulated clock (its ``IngestPipeline`` clock), so every message's ingest time is the end
   of the step it was delivered in, however long the real pipeline took;
3. every ``--drain-every`` steps the loop waits until rules has committed all telemetry and
   notify has handled every alert, so notify (whose escalation clock is the simulated clock)
   never lags the devices by more than that many steps.

So the arrival clock of the absence rules (device silent, fever unobserved) runs on simulated
ingest times, exactly as it would live with deliveries at those times; the event-time rules run
on device time as always. Limits: ingest times have the step's resolution (a 15-min silence is
measured to within a step; hubs deliver on step boundaries, so 5 s arrival lateness and
sub-step ordering between homes are not exercised); a page's time is when notify composed it
on the simulated clock (up to ``--drain-every`` steps after the data that caused it); notify's
waits are simulated time too, so the care team's policy pages once per alert with no repeats
(as if every page were acknowledged), and the self-watch's heartbeat timeout is widened beyond
the drain interval. Where the services need a hook, the bench sets module attributes for this
process only: ingest's Kafka topic names and its pipeline class (for the clock), see the report
in docs/perf.

Prints progress to stderr and ONE JSON line of figures. Writes ``ground_truth.jsonl``,
``pages.jsonl`` and ``figures.json`` to ``--out`` (default ``.vigil-test/bench/alarm-burden``).
No assertions on the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.policy
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiomqtt
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiosmtpd.controller import Controller

from bench.alarm_burden_classify import Page, classify
from bench.common import stack_environment
from schemas.events import Alert
from schemas.topics import HEARTBEAT_CHANNEL, MQTT_SUBSCRIPTION, topic_for
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from vigil_tools.heartbeat import heartbeat_payload
from vigil_tools.simulator.course import Course, CourseSpec, ThermometerKind, plan_course

ROOT = Path(__file__).resolve().parent.parent
HEADERS = (
    "Date",
    "Message-ID",
    "Subject",
    "X-Vigil-Dedup-Key",
    "X-Vigil-Phase",
    "X-Vigil-Priority",
    "X-Vigil-All-Clear",
    "X-Vigil-Repeat",
)


def log(**fields: Any) -> None:
    print(json.dumps(fields, default=str), file=sys.stderr, flush=True)


class SimClock:
    """The run's clock: moved by the step loop only."""

    def __init__(self, start: datetime) -> None:
        self.at = start.astimezone(UTC)

    def now(self) -> datetime:
        return self.at


@dataclass
class Mailbox:
    """The SMTP server's handler: every page's headers, and the simulated time it arrived."""

    clock: SimClock
    pages: list[dict[str, str]] = field(default_factory=list)

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=email.policy.default)
        # Long headers arrive folded; unfolded, a dedup key is one token again.
        row = {
            name: " ".join(str(message[name]).split())
            for name in HEADERS
            if message[name] is not None
        }
        row["received_sim"] = self.clock.now().isoformat()
        row["to"] = ",".join(envelope.rcpt_tos)
        self.pages.append(row)
        return "250 OK"


@dataclass(frozen=True)
class Topics:
    telemetry: str
    alerts: str
    state: str
    deadletter: str


class IdleWatchingConsumer:
    """notify's alert consumer, wrapped so the bench knows when every fetched alert is handled:
    ``consume_alerts`` handles what ``getmany`` returned before it asks again."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.idle = False

    async def getmany(self, *, timeout_ms: int) -> dict[Any, list[Any]]:
        self.idle = True
        try:
            batches: dict[Any, list[Any]] = await self.consumer.getmany(timeout_ms=timeout_ms)
            return batches
        finally:
            self.idle = False

    async def commit(self, offsets: dict[Any, int]) -> None:
        await self.consumer.commit(offsets)


class NoDeadLetters:
    def __init__(self) -> None:
        self.count = 0

    async def publish_dead_letter(self, letter: object) -> None:
        self.count += 1


class CountingHandler:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.alerts = 0

    async def handle_alert(self, alert: Alert) -> object:
        self.alerts += 1
        return await self.inner.handle_alert(alert)


# --- the private schema ---------------------------------------------------------------------


def schema_dsn(base_dsn: str, schema: str) -> str:
    """``base_dsn`` with every connection's ``search_path`` set to ``schema`` (asyncpg passes
    unknown DSN parameters on as server settings): the migrations then build the whole schema
    there, and every service of the run reads and writes only it."""
    parts = urlsplit(base_dsn)
    query = "&".join(q for q in (parts.query, f"search_path={schema}") if q)
    return urlunsplit(parts._replace(query=query))


async def create_schema(base_dsn: str, schema: str) -> str:
    conn = await asyncpg.connect(base_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    return schema_dsn(base_dsn, schema)


async def drop_schema(base_dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(base_dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def register(dsn: str, course: Course, run: str) -> tuple[str, str, str]:
    """The care team (its zone, one person paged by e-mail once per alert), the patients and
    their devices, and the technical team with the heartbeat device."""
    team, tech = f"team-ab-{run}", f"team-ab-tech-{run}"
    oncall = f"oncall-{run}@bench.test"
    beat = f"heartbeat-ab-{run}"
    since = course.spec.start - timedelta(days=1)
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "Alarm-burden team", oncall)
        await upsert_care_team(conn, tech, "Technical on-call", f"tech-{run}@bench.test")
        await conn.execute(
            "UPDATE care_teams SET timezone = $2 WHERE care_team_id = $1", team, course.spec.zone
        )
        person = f"{team}-nurse"
        await conn.execute(
            "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, 'night nurse', $2)",
            person,
            team,
        )
        await conn.execute(
            "INSERT INTO contact_methods (person_id, rank, channel, address) "
            "VALUES ($1, 0, 'email', $2)",
            person,
            oncall,
        )
        steps = [{"wait_s": 300, "targets": [{"kind": "person", "ref": person}]}]
        await conn.execute(
            "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, "
            "repeat_count) VALUES ($1, $2, 'one page per alert', $3::jsonb, 0)",
            f"policy-{team}",
            team,
            json.dumps(steps),
        )
        for number, home in enumerate(course.homes, start=1):
            await upsert_patient(conn, home.patient_id, team, weight_kg=15.0 + 3 * number)
            # Registered as it reports: a spot-check thermometer as such (docs/rules.md).
            reporting = (
                "spot_check" if home.thermometer is ThermometerKind.SPOT_CHECK else "continuous"
            )
            await upsert_device(
                conn, home.thermometer_id, "thermometer", home.thermometer.value, reporting
            )
            await upsert_device(conn, home.pump_id, "pump", "bench pump")
            await bind_device(conn, home.thermometer_id, home.patient_id, since)
            await bind_device(conn, home.pump_id, home.patient_id, since)
        await upsert_patient(conn, f"pipeline-{tech}", tech)
        await upsert_device(conn, beat, "thermometer", "vigil-heartbeat")
        await bind_device(conn, beat, f"pipeline-{tech}", since)
    finally:
        await conn.close()
    return team, tech, beat


# --- Kafka and MQTT -------------------------------------------------------------------------


async def create_topics(bootstrap: str, topics: Topics, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        day = 24 * 3600 * 1000
        await admin.create_topics(
            [
                NewTopic(topics.telemetry, partitions, 1, topic_configs={"retention.ms": str(day)}),
                NewTopic(topics.alerts, partitions, 1, topic_configs={"retention.ms": str(day)}),
                NewTopic(topics.deadletter, 1, 1, topic_configs={"retention.ms": str(day)}),
                NewTopic(topics.state, partitions, 1, topic_configs={"cleanup.policy": "compact"}),
            ]
        )
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, topics: Topics) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(
            [topics.telemetry, topics.alerts, topics.state, topics.deadletter]
        )
    finally:
        await admin.close()


async def mqtt_session(env: dict[str, str], client_id: str, topic: str | None) -> None:
    """Open ingest's persistent session (with its subscription), or end it (``topic`` None)."""
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_INGEST_MQTT_USERNAME"],
        password=env["VIGIL_INGEST_MQTT_PASSWORD"],
        identifier=client_id,
        clean_session=topic is None,
    ) as client:
        if topic is not None:
            await client.subscribe(topic, qos=1)


class Drain:
    """Waits until rules has committed every telemetry record and notify has handled every
    alert committed so far."""

    def __init__(self, bootstrap: str, topics: Topics, rules_group: str) -> None:
        self.bootstrap, self.topics, self.rules_group = bootstrap, topics, rules_group
        self.probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.telemetry: list[TopicPartition] = []
        self.alerts: list[TopicPartition] = []

    async def start(self, partitions: int) -> None:
        await self.probe.start()
        await self.admin.start()
        self.telemetry = [TopicPartition(self.topics.telemetry, p) for p in range(partitions)]
        self.alerts = [TopicPartition(self.topics.alerts, p) for p in range(partitions)]

    async def stop(self) -> None:
        await self.probe.stop()
        await self.admin.close()

    async def wait(self, notify: IdleWatchingConsumer, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        ends = await self.probe.end_offsets(self.telemetry)
        while True:
            committed = await self.admin.list_consumer_group_offsets(self.rules_group)
            if all(
                ends[tp] == 0 or (tp in committed and committed[tp].offset >= ends[tp])
                for tp in self.telemetry
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError("rules did not catch up")
            await asyncio.sleep(0.005)
        alert_ends = await self.probe.end_offsets(self.alerts)
        while True:
            consumer = notify.consumer
            assigned = consumer.assignment()
            if notify.idle and assigned:
                behind = 0
                for tp in self.alerts:
                    if alert_ends[tp] and (
                        tp not in assigned or await consumer.position(tp) < alert_ends[tp]
                    ):
                        behind += 1
                if not behind:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("notify did not catch up")
            await asyncio.sleep(0.005)


# --- the run --------------------------------------------------------------------------------


async def run_course(args: argparse.Namespace) -> dict[str, Any]:
    import services.ingest.app as ingest_app
    import services.ingest.bootstrap as ingest_wiring
    from services.ingest.settings import IngestSettings
    from services.notify.app import consume_alerts
    from services.notify.bootstrap import build_escalation, open_pool
    from services.notify.settings import NotifySettings
    from services.rules.app import run as run_rules
    from services.rules.settings import RulesSettings
    from vigil.db.migrate import apply_migrations
    from vigil.kafka import make_consumer
    from vigil_tools.stack.topics import DEFAULT_PARTITIONS

    env = stack_environment()
    run = uuid.uuid4().hex[:8]
    spec = CourseSpec(
        patients=args.patients, days=args.days, seed=args.seed, id_prefix=f"PAB{run[:6]}"
    )
    course = plan_course(spec)
    out = Path(args.out) / run
    out.mkdir(parents=True, exist_ok=True)
    with (out / "ground_truth.jsonl").open("w") as f:
        for event in course.ground_truth:
            f.write(json.dumps(event.to_json()) + "\n")
    log(
        run=run,
        course=f"{spec.patients} patients x {spec.days} days",
        seed=spec.seed,
        messages=course.message_count(),
        out=str(out),
    )

    clock = SimClock(spec.start)
    schema = f"bench_ab_{run}"
    dsn = await create_schema(env["VIGIL_PG_DSN"], schema)
    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    topics = Topics(
        *(
            f"{name}.ab-{run}"
            for name in (
                "vigil.telemetry.v1",
                "vigil.alerts.v1",
                "vigil.rules.state.v1",
                "vigil.deadletter.v1",
            )
        )
    )
    partitions = DEFAULT_PARTITIONS
    saved_env = os.environ.get("VIGIL_PG_DSN")
    # The hooks ingest lacks (topic names, its pipeline's clock), set for this process only.
    hooked = ("TELEMETRY_TOPIC", "DEADLETTER_TOPIC", "IngestPipeline")
    saved_ingest = {name: getattr(ingest_wiring, name) for name in hooked}
    mailbox = Mailbox(clock)
    controller: Controller | None = None
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    closers: list[Any] = []
    ingest_id = f"ingest-ab-{run}"
    figures: dict[str, Any] = {}
    try:
        await apply_migrations(dsn)
        _team, tech, beat = await register(dsn, course, run)
        await create_topics(bootstrap, topics, partitions)
        os.environ["VIGIL_PG_DSN"] = dsn

        # Ingest on the simulated clock, writing to this run's topics.
        mine = {h.thermometer_id for h in course.homes} | {h.pump_id for h in course.homes}
        mine.add(beat)
        admitted = [0]

        class SimPipeline(ingest_wiring.IngestPipeline):
            def __init__(self, *a: Any, **k: Any) -> None:
                k["clock"] = clock.now
                super().__init__(*a, **k)

            async def admit(self, messages: Sequence[tuple[str, bytes]]) -> Any:
                result = await super().admit(messages)
                admitted[0] += sum(1 for topic, _ in messages if topic.split("/")[3] in mine)
                return result

        setattr(ingest_wiring, "TELEMETRY_TOPIC", topics.telemetry)  # noqa: B010
        setattr(ingest_wiring, "DEADLETTER_TOPIC", topics.deadletter)  # noqa: B010
        setattr(ingest_wiring, "IngestPipeline", SimPipeline)  # noqa: B010
        ingest_settings = IngestSettings(
            mqtt_client_id=ingest_id,
            mqtt_share_group=ingest_id,
            metrics_port=0,
            batch_linger_ms=1,
        )
        await mqtt_session(env, ingest_id, f"$share/{ingest_id}/{MQTT_SUBSCRIPTION}")

        rules_group = f"rules-ab-{run}"
        rules_settings = RulesSettings(
            group_id=rules_group,
            transactional_id=rules_group,
            telemetry_topic=topics.telemetry,
            alerts_topic=topics.alerts,
            state_topic=topics.state,
            deadletter_topic=topics.deadletter,
            ops_port=0,
        )

        smtp_port = _free_port()
        controller = Controller(mailbox, hostname="127.0.0.1", port=smtp_port)
        controller.start()
        notify_settings = NotifySettings(
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            group_id=f"notify-ab-{run}",
            technical_care_team_id=tech,
            escalation_tick_s=0.05,
            # Simulated seconds: wider than the drain interval, which is how far notify's clock
            # may run ahead of the heartbeats it has handled.
            heartbeat_timeout_s=max(120.0, 4 * args.step_s * args.drain_every),
            ops_port=0,
        )
        pool = await open_pool(notify_settings)
        closers.append(pool)
        escalation, http_clients = build_escalation(notify_settings, pool, clock=clock.now)
        # A send takes milliseconds of real time, which can be a step of simulated time: with
        # the 60 s lease the ticker would claim a page again while its first send is being
        # recorded. A crash-recovery lease is not what this bench measures.
        escalation._config = dataclasses.replace(escalation._config, send_lease_s=86_400.0)
        closers.extend(http_clients)
        alert_consumer = make_consumer(
            notify_settings.kafka,
            topics.alerts,
            group_id=notify_settings.group_id,
            client_id=f"notify-ab-{run}",
        )
        await alert_consumer.start()
        closers.append(alert_consumer)
        watched = IdleWatchingConsumer(alert_consumer)
        handler = CountingHandler(escalation)

        tasks = [
            asyncio.create_task(ingest_app.run(ingest_settings, stop), name="ingest"),
            asyncio.create_task(run_rules(rules_settings, stop), name="rules"),
            asyncio.create_task(
                consume_alerts(watched, handler, NoDeadLetters(), stop, clock=clock.now),
                name="notify-alerts",
            ),
            asyncio.create_task(escalation.run(stop, interval_s=0.05), name="notify-ticker"),
        ]
        drain = Drain(bootstrap, topics, rules_group)
        await drain.start(partitions)
        closers.append(drain)
        await asyncio.sleep(3)
        for task in tasks:
            if task.done():
                task.result()

        figures = await _steps(args, env, course, clock, beat, admitted, drain, watched, tasks)
        figures["alerts_handled"] = handler.alerts
    finally:
        stop.set()
        if tasks:
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            for task, result in zip(tasks, results, strict=True):
                if isinstance(result, BaseException):
                    log(service=task.get_name(), failed=repr(result))
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                if isinstance(closer, AIOKafkaConsumer | Drain):
                    await closer.stop()
                elif hasattr(closer, "aclose"):
                    await closer.aclose()
                else:
                    await closer.close()
        if controller is not None:
            controller.stop()
        for name, value in saved_ingest.items():
            setattr(ingest_wiring, name, value)
        if saved_env is None:
            os.environ.pop("VIGIL_PG_DSN", None)
        else:
            os.environ["VIGIL_PG_DSN"] = saved_env
        with contextlib.suppress(Exception):
            await mqtt_session(env, ingest_id, None)
        if not args.keep:
            with contextlib.suppress(Exception):
                await delete_topics(bootstrap, topics)
            with contextlib.suppress(Exception):
                await drop_schema(env["VIGIL_PG_DSN"], schema)

    with (out / "pages.jsonl").open("w") as f:
        for row in mailbox.pages:
            f.write(json.dumps(row) + "\n")
    # A page sent again (same Message-ID) is folded by mail clients: counted once.
    unique = {row.get("Message-ID") or str(i): row for i, row in enumerate(mailbox.pages)}
    pages = [Page.from_headers(row) for row in unique.values()]
    figures["emails_received"] = len(mailbox.pages)
    figures["emails_resent_same_message_id"] = len(mailbox.pages) - len(unique)
    result = {
        "bench": "alarm_burden",
        "seed": spec.seed,
        "patients": spec.patients,
        "days": spec.days,
        "zone": spec.zone,
        "step_s": args.step_s,
        **figures,
        **classify(
            course.ground_truth,
            pages,
            patients=[h.patient_id for h in course.homes],
            days=spec.days,
            zone=spec.zone,
        ),
        "artifacts": str(out),
    }
    (out / "figures.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


async def _steps(
    args: argparse.Namespace,
    env: dict[str, str],
    course: Course,
    clock: SimClock,
    beat: str,
    admitted: list[int],
    drain: Drain,
    notify: IdleWatchingConsumer,
    services: list[asyncio.Task[Any]],
) -> dict[str, Any]:
    spec = course.spec
    step = timedelta(seconds=args.step_s)
    deliveries = course.deliveries()
    pending = next(deliveries, None)
    published = buffered = 0
    beat_seq = 1
    topic_beat = topic_for(beat, HEARTBEAT_CHANNEL)
    began = time.monotonic()
    t = spec.start
    # A little past the course's end, so the last deliveries' pages and all clears go out.
    end = spec.end + timedelta(minutes=args.tail_minutes)
    steps = 0
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_SIM_MQTT_USERNAME"],
        password=env["VIGIL_SIM_MQTT_PASSWORD"],
        identifier=f"sim-ab-{uuid.uuid4().hex[:8]}",
        max_inflight_messages=500,
    ) as client:
        client.pending_calls_threshold = 10_000
        while t < end:
            t = t + step
            clock.at = t.astimezone(UTC)
            batch: list[tuple[str, bytes]] = []
            while pending is not None and pending.deliver_at <= t:
                batch.append((pending.topic, pending.payload()))
                buffered += pending.buffered
                pending = next(deliveries, None)
            batch.append((topic_beat, heartbeat_payload(beat, beat_seq, clock.now())))
            beat_seq += 1
            await asyncio.gather(
                *(client.publish(topic, payload, qos=1) for topic, payload in batch)
            )
            published += len(batch)
            deadline = time.monotonic() + 30
            while admitted[0] < published:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ingest admitted {admitted[0]} of {published}")
                await asyncio.sleep(0.001)
            steps += 1
            if steps % args.drain_every == 0:
                await drain.wait(notify, within_s=60)
                for task in services:
                    if task.done():
                        task.result()
            if steps % 1440 == 0:
                log(
                    simulated=clock.now().isoformat(),
                    published=published,
                    pages=None,
                    wall_s=round(time.monotonic() - began, 1),
                )
            if time.monotonic() - began > args.max_wall_s:
                raise TimeoutError(f"stopped after {args.max_wall_s} s at {clock.now()}")
        await drain.wait(notify, within_s=60)
        # Bundle follow-ups due within the grouping window of the last alerts: the ticker sends
        # them once the clock has passed it (no device reports any more, so no rule decides).
        clock.at += timedelta(seconds=30)
        await asyncio.sleep(1.0)
    wall = time.monotonic() - began
    return {
        "messages": published - steps,
        "buffered_messages": buffered,
        "heartbeats": steps,
        "wall_s": round(wall, 1),
        "simulated_per_wall": round((end - spec.start).total_seconds() / max(wall, 1e-9), 1),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def reclassify(run_dir: Path) -> dict[str, Any]:
    """A finished run's pages classified again against its course's ground truth as this
    version of the simulator and the classifier define it: the course is planned again from the
    run's seed, size and patient ids (the same seed gives the same messages). Writes nothing."""
    figures = json.loads((run_dir / "figures.json").read_text())
    first = json.loads((run_dir / "ground_truth.jsonl").read_text().splitlines()[0])
    spec = CourseSpec(
        patients=int(figures["patients"]),
        days=float(figures["days"]),
        seed=int(figures["seed"]),
        id_prefix=str(first["patient_id"]).rsplit("-", 1)[0],
    )
    course = plan_course(spec)
    rows = [json.loads(line) for line in (run_dir / "pages.jsonl").read_text().splitlines()]
    unique = {row.get("Message-ID") or str(i): row for i, row in enumerate(rows)}
    return {
        "reclassified": str(run_dir),
        "seed": spec.seed,
        **classify(
            course.ground_truth,
            [Page.from_headers(row) for row in unique.values()],
            patients=[h.patient_id for h in course.homes],
            days=spec.days,
            zone=spec.zone,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--days", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--step-s", type=float, default=60.0, help="simulated seconds per step")
    parser.add_argument("--drain-every", type=int, default=5, help="steps between drains")
    parser.add_argument("--tail-minutes", type=float, default=0.0)
    parser.add_argument("--max-wall-s", type=float, default=900.0)
    parser.add_argument("--out", default=str(ROOT / ".vigil-test" / "bench" / "alarm-burden"))
    parser.add_argument("--keep", action="store_true", help="keep the database and topics")
    parser.add_argument(
        "--reclassify",
        metavar="RUN_DIR",
        help="classify a finished run's pages again (no stack, no run); prints one JSON line",
    )
    args = parser.parse_args(argv)
    if args.reclassify:
        print(json.dumps(reclassify(Path(args.reclassify))))
        return 0
    figures = asyncio.run(asyncio.wait_for(run_course(args), args.max_wall_s + 180))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
