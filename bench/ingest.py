"""Ingest benchmark: simulated devices → Mosquitto → ingest → Kafka and PostgreSQL, on this machine.

For each ingest configuration (1 process, then N processes sharing the subscription) it publishes
a paced stream of temperature readings for a fixed time, waits until every published message is
in PostgreSQL, then reads the telemetry topic back and checks published = in Kafka = in the DB.
Latency: MQTT publish (the ``device_time`` the load generator stamps, once per chunk of
readings: ``make_payload_factory``) → Kafka record timestamp
(set by ingest's producer when the record is sent; acks=all follows within the batch) and → the
row's ``stored_at`` (start of ingest's write transaction). Then a bare baseline on the same
machine: ``mosquitto_sub`` piped into Kafka's console producer (no validation, no storage, no
ack-after-durable), and the ratio. Prints one JSON line at the end.

``--search``: capacity instead of one offered load. The offered load rises step by step
(``--start-rate``, times ``--factor`` each ``--step-s`` step, then ``--refine`` midpoints between
the last sustained and the first failed step) until a step loses a message (not stored within
``--drain-timeout``, or short in Kafka) or its backlog grows through the step (published and not
yet in Kafka, for Vigil and the bridge alike, sampled every 0.5 s; the last quarter's mean above
the second quarter's by more than 0.5 s of the offered load), or the publisher cannot keep the
pace. Each step starts with the previous one drained. The figure is the highest sustained
zero-loss rate, for Vigil (1 ingest process unless ``--procs``) and for the bridge baseline in
the same run, and their ratio.

    make bench-ingest                     # bench stack, capacity search
    python bench/ingest.py --rate 12000 --seconds 20 --procs 1,2     # one offered load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CapacitySearch,
    CpuMeter,
    MakeChunk,
    QosOnePublisher,
    load_step,
    paced,
    percentile,
    stack_environment,
    wait_until,
)
from schemas.kafka_topics import TELEMETRY_TOPIC
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)

ROOT = Path(__file__).resolve().parents[1]


def make_payload_factory(devices: list[str]) -> MakeChunk:
    """``make(n)``: the next ``n`` temperature readings, a round-robin over ``devices``, as
    (topic, payload). Message ids are unique (a prefix of this factory and a counter of its
    own, not the caller's index: a message id used again would be a duplicate to ingest) and
    each device's ``seq`` rises by one per reading.

    ``device_time`` is read once per call, so the readings of one chunk share it: its
    resolution is the chunk. ``paced`` asks for what is due every 2 ms or so (at most 2,000
    readings), so a reading's ``device_time`` is a few ms at most before its PUBLISH is written,
    unless the publisher's window is full (then it waits for PUBACKs, as it did one message at
    a time). Ingest's lag figures (publish → Kafka, publish → stored) start from it."""
    prefix = uuid.uuid4().hex[:20]
    message_id = f"{prefix[:8]}-{prefix[8:12]}-4{prefix[12:15]}-8{prefix[15:18]}-"
    names = [d.encode() for d in devices]
    seqs = [0] * len(devices)
    topics = [f"vigil/v1/dev/{d}/temperature" for d in devices]
    count = len(devices)
    made = 0

    def make(n: int) -> list[tuple[str, bytes]]:
        nonlocal made
        now = datetime.now(UTC).isoformat(timespec="microseconds")
        template = (
            '{"schema":"vigil.device.temperature.v1","message_id":"'
            + message_id
            + '%012x","device_id":"%s","seq":%d,"device_time":"'
            + now
            + '","value":37.2,"unit":"C","site":"axillary"}'
        ).encode()
        out = []
        for i in range(made, made + n):
            k = i % count
            seq = seqs[k] = seqs[k] + 1
            out.append((topics[k], template % (i, names[k], seq)))
        made += n
        return out

    return make


async def register(dsn: str, run: str, tag: str, count: int) -> list[str]:
    devices = [f"bench-{run}-{tag}-{i:03d}" for i in range(count)]
    conn = await asyncpg.connect(dsn)
    try:
        team = f"team-bench-{run}"
        await upsert_care_team(conn, team, "Benchmark", f"bench-{run}@hospital.test")
        since = datetime.now(UTC) - timedelta(days=1)
        for device in devices:
            patient = f"P-{device}"
            await upsert_patient(conn, patient, team)
            await upsert_device(conn, device, "thermometer", "bench")
            await bind_device(conn, device, patient, since)
    finally:
        await conn.close()
    return devices


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def scrape(port: int) -> dict[str, float]:
    """Mean batch size and mean Kafka, DB and whole-batch seconds from ingest's /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("vigil_ingest_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    out: dict[str, float] = {}
    for metric in ("batch_size", "kafka_seconds", "db_seconds", "batch_seconds"):
        count = values.get(f"vigil_ingest_{metric}_count", 0.0)
        total = values.get(f"vigil_ingest_{metric}_sum", 0.0)
        out[f"mean_{metric}"] = round(total / count, 4) if count else 0.0
    out["batch_failures"] = sum(
        v for k, v in values.items() if k.startswith("vigil_ingest_batch_failures_total")
    )
    return out


def start_ingest(
    env: dict[str, str], client_id: str, group: str, log: Path, metrics_port: int
) -> subprocess.Popen[bytes]:
    child = dict(os.environ)
    child.update(env)
    child.update(
        {
            "VIGIL_INGEST_MQTT_CLIENT_ID": client_id,
            "VIGIL_INGEST_MQTT_SHARE_GROUP": group,
            "VIGIL_INGEST_METRICS_PORT": str(metrics_port),
            "PYTHONPATH": str(ROOT),
        }
    )
    with log.open("wb") as out:
        # BENCH_INGEST_PROFILE=<dir> writes a cProfile of each ingest process there.
        profile = os.environ.get("BENCH_INGEST_PROFILE")
        prefix = ["-m", "cProfile", "-o", f"{profile}/{client_id}.prof"] if profile else []
        return subprocess.Popen(
            [sys.executable, *prefix, "-m", "vigil_tools.cli", "ingest"],
            env=child,
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )


async def wait_subscribed(log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    # A few small reads of a local log file, before any timing starts.
    while b"ingest_subscribed" not in log.read_bytes():  # noqa: ASYNC240
        if time.monotonic() > deadline:
            raise RuntimeError(f"ingest did not subscribe; see {log}")
        await asyncio.sleep(0.1)


async def drop_session(env: dict[str, str], client_id: str) -> None:
    async with aiomqtt.Client(
        "127.0.0.1",
        int(env["VIGIL_MQTT_PORT"]),
        username=env["VIGIL_INGEST_MQTT_USERNAME"],
        password=env["VIGIL_INGEST_MQTT_PASSWORD"],
        identifier=client_id,
        clean_session=True,
    ):
        pass


async def _stop(consumer: AIOKafkaConsumer) -> None:
    # aiokafka 0.14 lets a group-less consumer's stop() raise the CancelledError of its own
    # internal task; the consumer is closed either way.
    with contextlib.suppress(asyncio.CancelledError):
        await consumer.stop()


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    # A producer's partitions_for() fetches the topic's metadata; a group-less consumer's
    # partitions_for_topic() only reads what it already has (nothing).
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(partitions))
    finally:
        await _stop(consumer)


async def scan(
    bootstrap: str, topic: str, start: dict[TopicPartition, int], keep: Any
) -> tuple[list[tuple[str, int]], list[bytes]]:
    """Records of ``topic`` from ``start`` to the current end: (message id, timestamp ms) of those
    ``keep`` selects (``keep(value) -> message id | None``)."""
    end = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    found: list[tuple[str, int]] = []
    raw: list[bytes] = []
    try:
        parts = [tp for tp in end if end[tp] > start.get(tp, 0)]
        if not parts:
            return found, raw
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start.get(tp, 0))
        remaining = {tp: end[tp] for tp in parts}
        while remaining:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    key = keep(record.value)
                    if key is not None:
                        found.append((key, record.timestamp))
                        raw.append(record.value)
                if records and records[-1].offset + 1 >= end[tp]:
                    remaining.pop(tp, None)
    finally:
        await _stop(consumer)
    return found, raw


async def wait_db(dsn: str, devices: list[str], expected: int, timeout_s: float) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            count = int(
                await conn.fetchval(
                    "SELECT count(*) FROM temperature_readings WHERE device_id = ANY($1::text[])",
                    devices,
                )
            )
            if count >= expected or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def db_figures(dsn: str, devices: list[str]) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM stored_at - device_time) AS lag, stored_at, message_id "
            "FROM temperature_readings WHERE device_id = ANY($1::text[])",
            devices,
        )
    finally:
        await conn.close()
    lags = [float(r["lag"]) for r in rows]
    return {
        "rows": len(rows),
        "distinct": len({r["message_id"] for r in rows}),
        "lags": lags,
        "last_stored": max((r["stored_at"] for r in rows), default=None),
    }


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def ingest_phase(
    env: dict[str, str], run: str, procs: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    dsn, bootstrap = env["VIGIL_PG_DSN"], env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    tag = f"p{procs}"
    devices = await register(dsn, run, tag, args.devices)
    device_set = set(devices)
    group = f"bench-{run}-{tag}"
    client_ids = [f"bench-{run}-{tag}-ingest-{k}" for k in range(procs)]
    logs = [log_dir / f"ingest-{tag}-{k}.log" for k in range(procs)]
    ports = [free_port() for _ in range(procs)]
    children = [
        start_ingest(env, c, group, log, port)
        for c, log, port in zip(client_ids, logs, ports, strict=True)
    ]
    scraped: list[dict[str, float]] = []
    try:
        for log in logs:
            await wait_subscribed(log)
        start_offsets = await end_offsets(bootstrap, TELEMETRY_TOPIC)
        publishers = [
            QosOnePublisher(
                "127.0.0.1",
                int(env["VIGIL_MQTT_PORT"]),
                f"bench-{run}-{tag}-pub-{k}",
                env["VIGIL_SIM_MQTT_USERNAME"],
                env["VIGIL_SIM_MQTT_PASSWORD"],
                window=args.window,
            )
            for k in range(args.connections)
        ]
        for publisher in publishers:
            await publisher.connect()
        cpu = CpuMeter([c.pid for c in children])
        cpu_started = time.monotonic()
        _, started, finished = await paced(
            publishers, make_payload_factory(devices), args.rate, args.seconds, args.max_messages
        )
        acked = sum(p.acked for p in publishers)
        stored = await wait_db(dsn, devices, acked, args.drain_timeout)
        cpu_figures = cpu.stop()
        cpu_wall = time.monotonic() - cpu_started
        for publisher in publishers:
            await publisher.close()
        scraped = [await scrape(port) for port in ports]
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        for client_id in client_ids:
            await drop_session(env, client_id)

    def keep(value: bytes) -> str | None:
        doc = orjson.loads(value)
        if doc.get("device_id") not in device_set:
            return None
        return f"{doc['message']['message_id']}|{doc['message']['device_time']}"

    kafka, _ = await scan(bootstrap, TELEMETRY_TOPIC, start_offsets, keep)
    kafka_ids = {k.split("|", 1)[0] for k, _ in kafka}
    kafka_lags = [
        ts / 1000 - datetime.fromisoformat(k.split("|", 1)[1]).timestamp() for k, ts in kafka
    ]
    db = await db_figures(dsn, devices)
    last_kafka = max((ts for _, ts in kafka), default=0) / 1000
    last_db = db["last_stored"].timestamp() if db["last_stored"] else 0.0
    end_to_end = max(last_kafka, last_db) - started
    return {
        "ingest_processes": procs,
        "published": acked,
        "publish_seconds": round(finished - started, 2),
        "publish_rate": round(acked / max(finished - started, 1e-9)),
        "in_db": db["rows"],
        "in_db_distinct": db["distinct"],
        "in_kafka": len(kafka),
        "in_kafka_distinct": len(kafka_ids),
        "zero_loss": db["distinct"] == acked == len(kafka_ids) and stored == acked,
        "sustained_readings_per_s": round(acked / max(end_to_end, 1e-9)),
        "publish_to_kafka_ms": {
            "p50": ms(percentile(kafka_lags, 50)),
            "p99": ms(percentile(kafka_lags, 99)),
        },
        "publish_to_db_ms": {
            "p50": ms(percentile(db["lags"], 50)),
            "p99": ms(percentile(db["lags"], 99)),
        },
        "cpu": {
            "machine_busy_pct": cpu_figures["machine_busy_pct"],
            "ingest_pct_of_one_core": cpu_figures["processes_cpu_pct_of_one_core"],
            # CPU time of the ingest processes per reading: steadier than readings/s on a
            # machine other work shares, because waiting for a core costs no CPU time.
            "ingest_cpu_us_per_reading": round(
                cpu_figures["processes_cpu_pct_of_one_core"] / 100 * cpu_wall / max(acked, 1) * 1e6,
                1,
            ),
        },
        "ingest_metrics": scraped,
    }


def start_bridge(
    env: dict[str, str], run: str, topic: str, devices: list[str]
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """``mosquitto_sub`` (one filter per device) piped into Kafka's console producer.
    Started once, before the timed part."""
    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    libs = Path(
        os.environ.get("VIGIL_STACK_KAFKA_LIBS_DIR", Path.home() / ".cache/vigil/kafka-4.1.0/libs")
    )
    sub = subprocess.Popen(
        [
            "mosquitto_sub", "-h", "127.0.0.1", "-p", env["VIGIL_MQTT_PORT"],
            "-u", env["VIGIL_INGEST_MQTT_USERNAME"], "-P", env["VIGIL_INGEST_MQTT_PASSWORD"],
            "-i", f"bench-{run}-base-sub", "-q", "1",
            # One filter per device: "+" cannot sit inside a topic level.
            *[arg for d in devices for arg in ("-t", f"vigil/v1/dev/{d}/temperature")],
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    producer = subprocess.Popen(
        [
            "java", "-Xmx512m", "-cp", f"{libs}/*", "org.apache.kafka.tools.ConsoleProducer",
            "--bootstrap-server", bootstrap, "--topic", topic,
            "--producer-property", "acks=all", "--producer-property", "linger.ms=5",
        ],
        stdin=sub.stdout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return sub, producer


async def baseline_phase(env: dict[str, str], run: str, args: argparse.Namespace) -> dict[str, Any]:
    """mosquitto_sub | kafka ConsoleProducer: the same stream with nothing but transport."""
    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"bench.baseline.{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
    devices = [f"bench-{run}-base-{i:03d}" for i in range(args.devices)]
    sub, producer = start_bridge(env, run, topic, devices)
    try:
        make = make_payload_factory(devices)
        publisher = QosOnePublisher(
            "127.0.0.1",
            int(env["VIGIL_MQTT_PORT"]),
            f"bench-{run}-base-pub",
            env["VIGIL_SIM_MQTT_USERNAME"],
            env["VIGIL_SIM_MQTT_PASSWORD"],
            window=args.window,
        )
        await publisher.connect()
        # Warm-up: the console producer's JVM is ready once one record arrives.
        deadline = time.monotonic() + 60
        while sum((await end_offsets(bootstrap, topic)).values()) == 0:
            await publisher.publish(*make(1)[0])
            await publisher.drain()
            if time.monotonic() > deadline:
                raise RuntimeError("the baseline console producer never produced")
            await asyncio.sleep(0.5)
        start_offsets = await end_offsets(bootstrap, topic)
        publishers = [publisher]
        for k in range(1, args.connections):
            extra = QosOnePublisher(
                "127.0.0.1",
                int(env["VIGIL_MQTT_PORT"]),
                f"bench-{run}-base-pub-{k}",
                env["VIGIL_SIM_MQTT_USERNAME"],
                env["VIGIL_SIM_MQTT_PASSWORD"],
                window=args.window,
            )
            await extra.connect()
            publishers.append(extra)
        cpu = CpuMeter([sub.pid, producer.pid])
        sent, started, _ = await paced(publishers, make, args.rate, args.seconds, args.max_messages)
        acked = sent  # paced() returns after every publisher drained its PUBACKs
        deadline = time.monotonic() + args.drain_timeout
        while True:
            now = await end_offsets(bootstrap, topic)
            arrived = sum(now.values()) - sum(start_offsets.values())
            if arrived >= acked or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
        cpu_figures = cpu.stop()
        for p in publishers:
            await p.close()
    finally:
        producer.terminate()
        sub.terminate()
        producer.wait(30)
        sub.wait(30)

    def keep(value: bytes) -> str | None:
        doc = orjson.loads(value)
        return f"{doc['message_id']}|{doc['device_time']}"

    kafka, _ = await scan(bootstrap, topic, start_offsets, keep)
    await admin.delete_topics([topic])
    await admin.close()
    ids = {k.split("|", 1)[0] for k, _ in kafka}
    lags = [ts / 1000 - datetime.fromisoformat(k.split("|", 1)[1]).timestamp() for k, ts in kafka]
    last = max((ts for _, ts in kafka), default=0) / 1000
    return {
        "published": acked,
        "in_kafka": len(kafka),
        "in_kafka_distinct": len(ids),
        "zero_loss": len(ids) == acked,
        "sustained_readings_per_s": round(len(ids) / max(last - started, 1e-9)),
        "publish_to_kafka_ms": {"p50": ms(percentile(lags, 50)), "p99": ms(percentile(lags, 99))},
        "cpu": {
            "machine_busy_pct": cpu_figures["machine_busy_pct"],
            "pipe_pct_of_one_core": cpu_figures["processes_cpu_pct_of_one_core"],
        },
    }


class OffsetProbe:
    """End offsets of one topic, summed over its partitions, from one long-lived consumer (the
    backlog is sampled every half second)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        self.partitions: list[TopicPartition] = []

    async def start(self) -> None:
        self.partitions = list(await end_offsets(self.bootstrap, self.topic))
        await self.consumer.start()

    async def total(self) -> int:
        return sum((await self.consumer.end_offsets(self.partitions)).values())

    async def stop(self) -> None:
        await _stop(self.consumer)


def step_reason(step: dict[str, Any]) -> str | None:
    """Why a search step was not sustained (None: it was)."""
    if not step["zero_loss"]:
        return "loss"
    if step["backlog_growing"]:
        return "backlog growing"
    if not step["kept_pace"]:
        return "publisher could not keep the pace"
    return None


def search_figures(steps: list[dict[str, Any]]) -> dict[str, Any]:
    best = max((s for s in steps if s["sustained"]), key=lambda s: s["offered_per_s"], default=None)
    first_failure = next((s["reason"] for s in steps if not s["sustained"]), None)
    return {
        "capacity_readings_per_s": best["published_per_s"] if best else None,
        "capacity_offered_per_s": best["offered_per_s"] if best else None,
        "first_failure": first_failure,
        # No step failed, or only the load generator did: the capacity is at least this.
        "lower_bound_only": first_failure in (None, "publisher could not keep the pace"),
        "steps": steps,
    }


async def connect_publishers(
    env: dict[str, str], prefix: str, args: argparse.Namespace
) -> list[QosOnePublisher]:
    publishers = [
        QosOnePublisher(
            "127.0.0.1",
            int(env["VIGIL_MQTT_PORT"]),
            f"{prefix}-{k}",
            env["VIGIL_SIM_MQTT_USERNAME"],
            env["VIGIL_SIM_MQTT_PASSWORD"],
            window=args.window,
        )
        for k in range(args.connections)
    ]
    for publisher in publishers:
        await publisher.connect()
    return publishers


async def search_steps(
    args: argparse.Namespace,
    publishers: list[QosOnePublisher],
    make: Any,
    through: Callable[[datetime], Awaitable[int]],
    kafka: OffsetProbe,
    label: str,
    start_rate: float | None = None,
) -> dict[str, Any]:
    """The capacity search: ``through(since)`` counts the step's messages that have come
    through (stored, or in the baseline's topic) since ``since``: the zero-loss verdict once
    the step has drained. The backlog sampled during the step is measured alike for Vigil and
    the bridge, by the telemetry topic's end offsets (``kafka``): counting Vigil's rows in
    PostgreSQL twice a second took the database (on the same two cores) 97-170 ms per count
    of 72,000-75,000 rows, growing through the step, a load the bridge's steps did not carry. Ingest
    acknowledges a batch only once Kafka and PostgreSQL both have it, with at most three
    batches in flight, so its Kafka records run ahead of its stored rows by at most those
    batches."""
    search = CapacitySearch(
        start=start_rate or args.start_rate,
        factor=args.factor,
        refine=args.refine,
        max_steps=args.max_steps,
    )
    steps: list[dict[str, Any]] = []
    while (rate := search.next_rate()) is not None:
        since = datetime.now(UTC)
        kafka_before = await kafka.total()
        base = await through(since)

        async def backlog(acked: int, before: int = kafka_before) -> int:
            return acked - (await kafka.total() - before)

        load1 = os.getloadavg()[0]
        step = await load_step(publishers, make, rate, args.step_s, backlog)
        acked = step["published"]
        began = time.monotonic()

        async def drained(
            since: datetime = since,
            base: int = base,
            acked: int = acked,
            before: int = kafka_before,
        ) -> bool:
            # Both: ingest stores a batch and appends it to Kafka concurrently, either first.
            stored = await through(since) - base
            return stored >= acked and await kafka.total() - before >= acked

        await wait_until(drained, args.drain_timeout)
        arrived = await through(since) - base
        in_kafka = await kafka.total() - kafka_before
        step |= {
            "load1": load1,
            "came_through": arrived,
            "drain_s": round(time.monotonic() - began, 2),
            # Kafka: the topic's end offsets moved by at least as many records (a lower bound;
            # transaction markers take offsets too); the database counts each message once.
            "kafka_offsets_advanced": in_kafka,
            "zero_loss": arrived == acked and in_kafka >= acked,
        }
        step["reason"] = step_reason(step)
        step["sustained"] = step["reason"] is None
        search.record(rate, step["sustained"])
        if not step["zero_loss"]:
            search.stop()
        steps.append(step)
        print(json.dumps({label: step}), file=sys.stderr, flush=True)
    return search_figures(steps)


async def ingest_search(
    env: dict[str, str], run: str, procs: int, args: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    dsn, bootstrap = env["VIGIL_PG_DSN"], env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    tag = f"s{procs}"
    devices = await register(dsn, run, tag, args.devices)
    patients = [f"P-{d}" for d in devices]
    group = f"bench-{run}-{tag}"
    client_ids = [f"bench-{run}-{tag}-ingest-{k}" for k in range(procs)]
    logs = [log_dir / f"ingest-{tag}-{k}.log" for k in range(procs)]
    children = [
        start_ingest(env, c, group, log, free_port())
        for c, log in zip(client_ids, logs, strict=True)
    ]
    conn = await asyncpg.connect(dsn)
    kafka = OffsetProbe(bootstrap, TELEMETRY_TOPIC)
    try:
        for log in logs:
            await wait_subscribed(log)
        await kafka.start()
        publishers = await connect_publishers(env, f"bench-{run}-{tag}-pub", args)

        async def stored(since: datetime) -> int:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM temperature_readings "
                    "WHERE patient_id = ANY($1::text[]) AND device_time >= $2",
                    patients,
                    since,
                )
            )

        figures = await search_steps(
            args, publishers, make_payload_factory(devices), stored, kafka, f"ingest_{procs}"
        )
        for publisher in publishers:
            await publisher.close()
    finally:
        await kafka.stop()
        await conn.close()
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        for client_id in client_ids:
            await drop_session(env, client_id)
    return {"ingest_processes": procs, **figures}


async def baseline_search(
    env: dict[str, str], run: str, args: argparse.Namespace, start_rate: float | None
) -> dict[str, Any]:
    """The same search through ``mosquitto_sub | kafka ConsoleProducer``, from ``start_rate``
    (Vigil's capacity: the question is whether the bridge carries more)."""
    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    topic = f"bench.baseline.{run}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])
    devices = [f"bench-{run}-sbase-{i:03d}" for i in range(args.devices)]
    sub, producer = start_bridge(env, run, topic, devices)
    kafka = OffsetProbe(bootstrap, topic)
    try:
        make = make_payload_factory(devices)
        publishers = await connect_publishers(env, f"bench-{run}-sbase-pub", args)
        await kafka.start()
        # Warm-up: the console producer's JVM is ready once one record arrives.
        deadline = time.monotonic() + 60
        while await kafka.total() == 0:
            await publishers[0].publish(*make(1)[0])
            await publishers[0].drain()
            if time.monotonic() > deadline:
                raise RuntimeError("the baseline console producer never produced")
            await asyncio.sleep(0.5)

        async def arrived(since: datetime) -> int:
            return await kafka.total()

        figures = await search_steps(
            args, publishers, make, arrived, kafka, "baseline", start_rate=start_rate
        )
        for publisher in publishers:
            await publisher.close()
    finally:
        await kafka.stop()
        producer.terminate()
        sub.terminate()
        producer.wait(30)
        sub.wait(30)
        await admin.delete_topics([topic])
        await admin.close()
    return figures


async def search_async(args: argparse.Namespace) -> dict[str, Any]:
    env = stack_environment()
    run = uuid.uuid4().hex[:6]
    log_dir = Path(os.environ.get("VIGIL_STACK_DATA_DIR", ".vigil-test")) / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "bench": "ingest_capacity",
        "start_rate": args.start_rate,
        "factor": args.factor,
        "step_s": args.step_s,
        "devices": args.devices,
        "load1_before": os.getloadavg()[0],
    }
    vigil = [await ingest_search(env, run, procs, args, log_dir) for procs in args.procs]
    results["ingest"] = vigil
    if not args.no_baseline:
        best = max((v["capacity_readings_per_s"] or 0 for v in vigil), default=0)
        offered = max((v["capacity_offered_per_s"] or 0 for v in vigil), default=0)
        results["baseline"] = await baseline_search(env, run, args, offered or None)
        base = results["baseline"]["capacity_readings_per_s"]
        results["ratio_vigil_to_bridge"] = round(best / base, 2) if base else None
    results["load1_after"] = os.getloadavg()[0]
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    env = stack_environment()
    run = uuid.uuid4().hex[:6]
    log_dir = Path(os.environ.get("VIGIL_STACK_DATA_DIR", ".vigil-test")) / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "bench": "ingest",
        "target_rate": args.rate,
        "seconds": args.seconds,
        "devices": args.devices,
        "load1_before": os.getloadavg()[0],
    }
    phases = []
    for procs in args.procs:
        phases.append(await ingest_phase(env, run, procs, args, log_dir))
        print(json.dumps({"phase": phases[-1]}), file=sys.stderr)
    results["ingest"] = phases
    if not args.no_baseline:
        results["baseline"] = await baseline_phase(env, run, args)
        best = max(p["sustained_readings_per_s"] for p in phases)
        results["ratio_ingest_to_baseline"] = round(
            best / max(1, results["baseline"]["sustained_readings_per_s"]), 2
        )
    results["zero_loss"] = all(p["zero_loss"] for p in phases)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=12000, help="readings/s offered; 0 = max")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-messages", type=int, default=400_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--window", type=int, default=500, help="QoS 1 in flight per connection")
    parser.add_argument(
        "--procs",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="ingest processes, e.g. 1,2 (default: 1,2; with --search: 1)",
    )
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--no-baseline", action="store_true")
    search = parser.add_argument_group("capacity search (--search)")
    search.add_argument("--search", action="store_true", help="search for the capacity")
    search.add_argument("--start-rate", type=float, default=2000.0, help="first offered load")
    search.add_argument("--factor", type=float, default=1.25, help="each step's load increase")
    search.add_argument("--step-s", type=float, default=15.0, help="seconds per step")
    search.add_argument("--refine", type=int, default=2, help="midpoints after the first failure")
    search.add_argument("--max-steps", type=int, default=14)
    args = parser.parse_args()
    if args.procs is None:
        args.procs = [1] if args.search else [1, 2]
    if args.search:
        args.drain_timeout = min(args.drain_timeout, 60.0)
        print(json.dumps(asyncio.run(search_async(args))))
    else:
        print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
