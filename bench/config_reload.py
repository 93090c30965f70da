"""Benchmark of the rules service's configuration at network scale: start-up and reload with
100,000 registered patients of whom 10,000 are monitored.

``make bench-config-reload`` (its own stack, BENCH_STACK in the Makefile), or ``python
bench/config_reload.py`` with ``VIGIL_STACK_*`` set. Registers ``--registered`` patients in
twenty care teams of their own (``tests.support.rules.register_fleet``: a thermometer and a
cycle each, an override for one in ten), the first ``--active`` monitored, the rest discharged
long ago, then measures:

- ``startup_s``: the real rules service (``services.rules.app.run``, on topics of its own, in
  this process) from its start to ``/readyz`` answering 200: config read, built, recorded and
  pinned on the state topic, partitions assigned and restored. ``rss_mb``: this process's
  resident memory once it is ready (``rss_before_mb``: before it started).
- ``reload_unchanged_cpu_ms``: a reload when nothing changed (best of five), in CPU time;
  ``reload_unchanged_ms`` the same in wall time (mostly the server computing its digest).
- ``patient_reload_cpu_ms`` / ``patient_stall_ms``: one patient's override signed off, then the
  reload the service runs (``ConfigWatch.check_once``: read what changed, rebuild, record,
  compile) and the swap's re-arming of an engine holding every monitored patient's state
  (``RulesEngine.reconfigure``): CPU time of the whole (``_reload_ms``: wall time), and the
  longest the event loop went without running a 1 ms ticker meanwhile (how long no alert
  could be decided). Measured after the service has stopped, so nothing else runs here.
  ``team_reload_cpu_ms`` / ``team_stall_ms``: the same for one care team's protocol (500
  monitored patients at the defaults).
- ``full_build_cpu_ms``: a load by a source that remembers nothing (what every change cost
  before reloads were incremental), for comparison: the median of five, each with what the
  process held before it frozen out of the garbage collector (``gc.freeze``), so that a build
  pays for collecting what it makes, not for the engine and configs this script holds.
- ``largest_record_bytes``: the largest record on the service's state topic after start-up
  and a reload (its key in ``largest_record_key``); ``largest_piece_bytes``: the largest
  stored piece of the config; ``changes_per_patient_reload``: rows the one-patient reload
  stored for its version.

ONE JSON line of figures goes to stdout at the end; nothing asserts a speed. Everything it
registered is deleted at the end, and its topics (the recorded configs and their audit entries
stay, as they are append-only).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import stack_environment
from services.rules.adapters.config_store import RulesConfigSource
from services.rules.domain.config import RulesCompiler, Thresholds
from services.rules.domain.engine import RulesEngine
from services.rules.service_layer.config_swap import ConfigWatch
from services.rules.settings import RulesSettings
from tests.support.rules import Home, register_fleet, remove_fleet


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def loop_stall_ms(work: Callable[[], Awaitable[object]]) -> float:
    """The longest gap, in ms, between two runs of a ticker that asks for the loop every 1 ms,
    while ``work`` runs."""
    worst = 0.0
    running = True

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.02)
    worst = 0.0
    try:
        await work()
    finally:
        running = False
        await ticker
    return worst * 1000


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
            return int(answer.status) == 200
    except OSError:
        return False


async def state_records(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """Every committed (key, value) of the one-partition ``topic``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    found: list[tuple[bytes, bytes]] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=200)).values():
                found += [(r.key or b"", r.value) for r in records if r.value is not None]
    finally:
        await consumer.stop()
    return found


async def start_service(
    env: dict[str, str], prefix: str
) -> tuple[dict[str, float], asyncio.Event, asyncio.Task[None], RulesSettings, list[str]]:
    from services.rules.app import run

    bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    topics = {k: f"{prefix}.{k}" for k in ("telemetry", "alerts", "state", "dlq")}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topics[k], 1, 1) for k in ("telemetry", "alerts", "dlq")]
            + [NewTopic(topics["state"], 1, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()
    settings = RulesSettings(
        group_id=f"{prefix}-group",
        telemetry_topic=topics["telemetry"],
        alerts_topic=topics["alerts"],
        state_topic=topics["state"],
        deadletter_topic=topics["dlq"],
        ops_port=0,
        config_reload_s=0.5,
        log_level="WARNING",
    )
    ports: list[int] = []
    stop = asyncio.Event()
    before = rss_mb()
    started = time.perf_counter()
    task = asyncio.create_task(run(settings, stop, listening=ports.append))
    while not (ports and await asyncio.to_thread(ready, ports[0])):
        if task.done():
            task.result()
            raise RuntimeError("the rules service stopped before it was ready")
        await asyncio.sleep(0.05)
    figures = {
        "startup_s": time.perf_counter() - started,
        "rss_before_mb": before,
        "rss_mb": rss_mb(),
    }
    return figures, stop, task, settings, list(topics.values())


async def measure_reloads(
    conn: asyncpg.Connection, patients: list[str], active: int, profile: bool
) -> dict[str, float]:
    figures: dict[str, float] = {}
    source = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
    config = await source.load(conn)
    compiler = RulesCompiler(config)
    compiler.compile_profiles()
    engine = RulesEngine(config, compiler)
    start = datetime.now(UTC)
    for patient in patients[:active]:
        engine.on_telemetry(Home(patient, start, thermometer_id=f"{patient}-t").temp(0, 36.8))
    assert engine.patient_count == active

    best, best_wall = float("inf"), float("inf")
    for _ in range(5):
        started, cpu = time.perf_counter(), time.process_time()
        assert await source.load(conn) is config
        best = min(best, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - started)
    figures["reload_unchanged_cpu_ms"] = best * 1000
    # Wall time: mostly the server computing the digest of every monitored patient's rows.
    figures["reload_unchanged_ms"] = best_wall * 1000

    watch = ConfigWatch(
        lambda: source.load(conn),
        config,
        5,
        delta=lambda: (source.delta_from, source.delta),
        compiler=compiler,
    )

    async def reload() -> None:
        changed = await watch.check_once()
        assert changed is not None and watch.take() is changed and watch.compiled is not None
        engine.reconfigure(changed, watch.compiled, watch.taken_patients)

    async def timed(change: Callable[[int], Awaitable[object]], name: str) -> None:
        """Two changes of the same kind: the first reloaded alone, for its CPU time (and a
        profile), the second beside a 1 ms ticker, for the stall (the ticker costs CPU)."""
        await change(2)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        started, cpu = time.perf_counter(), time.process_time()
        await reload()
        figures[f"{name}_reload_cpu_ms"] = (time.process_time() - cpu) * 1000
        figures[f"{name}_reload_ms"] = (time.perf_counter() - started) * 1000
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)
        await change(3)
        figures[f"{name}_stall_ms"] = await loop_stall_ms(reload)

    one = patients[7]
    await timed(
        lambda version: conn.execute(
            "INSERT INTO patient_rule_overrides (patient_id, version, overrides, signed_off_by,"
            " signed_off_at) VALUES ($1, $2, $3::jsonb, 'bench', now())",
            one,
            version + 10,
            json.dumps({"fever_single_c": 38.0 + version / 10}),
        ),
        "patient",
    )
    assert engine.config.thresholds_for(one).fever_single_c == 38.3
    manifest = source.manifest
    assert manifest is not None
    figures["changes_per_patient_reload"] = float(
        await conn.fetchval(
            "SELECT count(*) FROM rules_config_manifest_changes WHERE content_hash = $1",
            manifest.content_hash,
        )
    )
    team = str(await conn.fetchval("SELECT care_team_id FROM patients WHERE patient_id = $1", one))
    await timed(
        lambda version: conn.execute(
            "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by,"
            " signed_off_at) VALUES ($1, $2, $3::jsonb, 'bench', now())",
            team,
            version + 10,
            json.dumps({"fever_single_c": 38.0 + version / 10}),
        ),
        "team",
    )
    figures["changes_per_team_reload"] = float(
        await conn.fetchval(
            "SELECT count(*) FROM rules_config_manifest_changes WHERE content_hash = $1",
            source.manifest.content_hash if source.manifest else "",
        )
    )
    figures["largest_piece_bytes"] = float(
        await conn.fetchval(
            "SELECT max(octet_length(piece_text)) FROM rules_config_pieces WHERE piece_hash ="
            " ANY($1::text[])",
            list(source.pieces[p].digest for p in source.pieces),
        )
    )
    # What this process holds by now (the engine, two configs) frozen out of the collector for
    # each build: a full collection of it (70-80 ms here) fell inside a single build or not
    # depending on what ran before, so that one build took nearly 1.5 times another of the
    # same tree. Frozen, a build pays for collecting what it makes.
    builds = []
    for _ in range(5):
        gc.collect()
        gc.freeze()
        try:
            cpu = time.process_time()
            await RulesConfigSource(Thresholds(), allowed_lateness_s=60).load(conn)
            builds.append(time.process_time() - cpu)
        finally:
            gc.unfreeze()
    figures["full_build_cpu_ms"] = statistics.median(builds) * 1000
    figures["monitored_in_config"] = float(len(source.pieces) - 1 - len(config.protocols))
    return figures


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    env = stack_environment()
    conn = await asyncpg.connect(env["VIGIL_PG_DSN"])
    prefix = f"bench-cfg-{uuid.uuid4().hex[:8]}"
    figures: dict[str, float] = {}
    topics: list[str] = []
    try:
        started = time.perf_counter()
        patients = await register_fleet(
            conn, prefix, registered=args.registered, active=args.active, now=datetime.now(UTC)
        )
        figures["register_s"] = time.perf_counter() - started
        log(f"registered {len(patients)} patients, {args.active} monitored")
        service, stop, task, settings, topics = await start_service(env, prefix)
        figures.update(service)
        log(f"rules service ready in {service['startup_s']:.2f} s")
        try:
            # A change the running service reloads (every 0.5 s): its second config record.
            await conn.execute(
                "INSERT INTO patient_rule_overrides (patient_id, version, overrides,"
                " signed_off_by, signed_off_at)"
                " VALUES ($1, 3, '{\"fever_single_c\": 38.2}'::jsonb, 'bench', now())",
                patients[3],
            )
            bootstrap = env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
            for _ in range(300):
                records = await state_records(bootstrap, settings.state_topic)
                if sum(1 for k, _ in records if k.startswith(b"__config__/")) >= 2:
                    break
                await asyncio.sleep(0.1)
            key, value = max(records, key=lambda r: len(r[1]))
            figures["state_records"] = float(len(records))
            figures["largest_record_bytes"] = float(len(value))
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        # The reloads, measured with the service stopped: nothing else runs in this process.
        figures.update(await measure_reloads(conn, patients, args.active, args.profile))
    finally:
        await remove_fleet(conn, prefix)
        await conn.close()
        if topics:
            admin = AIOKafkaAdminClient(bootstrap_servers=env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"])
            await admin.start()
            try:
                await admin.delete_topics(topics)
            finally:
                await admin.close()
    result: dict[str, object] = {
        "bench": "config_reload",
        "registered": args.registered,
        "active": args.active,
    }
    result.update({k: round(v, 2) for k, v in figures.items()})
    result["largest_record_key"] = key.decode()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registered", type=int, default=100_000, help="patients registered")
    parser.add_argument("--active", type=int, default=10_000, help="of them, monitored")
    parser.add_argument("--profile", action="store_true", help="profile the reloads (stderr)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
