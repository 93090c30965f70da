"""Benchmark of the rules: the pure core, end to end through Kafka, and memory of rule state.

``make bench-rules`` (or ``python bench/rules.py`` with the stack's environment). Prints progress
on stderr and ONE JSON line of figures on stdout at the end:

- ``core_events_per_s``: ``RulesEngine.on_observation`` over a pre-converted stream of the
  design fleet (thermometer and pump per patient, one message per device per 10 s of device
  time, normal values with a few fevers and pump stops), on one core; ``core_baseline_per_s`` is
  a loop over the same stream that only reads the fields, measured in the same run.
- ``decode_events_per_s`` / ``decode_us_per_event``: Kafka record bytes -> Observation (the
  edge conversion), best of five passes.
- ``kafka_events_per_s``: records preloaded on a fresh telemetry topic, then the rules service
  (transactions, state topic, offsets) consuming all of them, timed from start to the last
  committed offset: the service's start-up (joining the group, reading the empty state topic,
  opening the transactional producer) is in it. ``kafka_first_commit_s`` is the time from the
  start to the first committed offset, and ``kafka_after_first_commit_per_s`` the records
  committed after it over the time from it to the last: the throughput of a running service
  (one batch and the start-up are left out of it).
- ``state_bytes_per_10k_devices``: tracemalloc of the engine's state after every device of a
  10,000-device fleet has reported for an hour of device time.

Nothing here asserts a speed: it measures and reports. Uses its own topics and consumer group.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import (
    PUMP_STATUS,
    TEMPERATURE,
    Observation,
)

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fleet_stream(patients: int, seconds: int, *, every_s: int = 10) -> list[Observation]:
    """Observations in device-time order: each patient's thermometer and pump every ``every_s``.

    One patient in 50 runs a fever from minute 10 for 80 minutes; one in 50 has a pump stopped
    from minute 20 to minute 65 (pages at 30 min). The rest is normal.
    """
    stream: list[Observation] = []
    ingest_lag = timedelta(seconds=1)
    for step in range(0, seconds, every_s):
        now = T0 + timedelta(seconds=step)
        minute = step / 60
        for p in range(patients):
            pid = f"B-{p:05d}"
            feverish = p % 50 == 1 and 10 <= minute < 90
            stream.append(
                Observation(
                    patient_id=pid,
                    device_id=f"thermo-{pid}",
                    channel=TEMPERATURE,
                    device_time=now,
                    ingest_time=now + ingest_lag,
                    message_id=f"{p:08x}-0000-4000-8000-{step:012x}",
                    temperature_c=38.6 if feverish else 36.6 + (p % 7) / 10,
                    site="oral",
                )
            )
            stopped = p % 50 == 2 and 20 <= minute < 65
            stream.append(
                Observation(
                    patient_id=pid,
                    device_id=f"pump-{pid}",
                    channel=PUMP_STATUS,
                    device_time=now,
                    ingest_time=now + ingest_lag,
                    message_id=f"{p:08x}-0001-4000-8000-{step:012x}",
                    pump_state="stopped" if stopped else "running",
                    rate_ml_h=10.0,
                    volume_remaining_ml=240.0 - 10.0 * step / 3600,
                )
            )
    return stream


def bench_core(stream: list[Observation]) -> dict[str, float]:
    engine = RulesEngine()
    on_observation = engine.on_observation
    alerts = 0
    started = time.perf_counter()
    for obs in stream:
        if on_observation(obs):
            alerts += 1
    core_s = time.perf_counter() - started
    # Baseline: touching the same fields in the same loop, so the ratio shows the rules' cost.
    started = time.perf_counter()
    sink = 0.0
    for obs in stream:
        sink += obs.t
        if obs.patient_id is None or obs.device_id is None:
            sink += 1
    base_s = time.perf_counter() - started
    return {
        "core_events": len(stream),
        "core_events_per_s": round(len(stream) / core_s),
        "core_baseline_per_s": round(len(stream) / base_s),
        "core_alert_batches": alerts,
    }


def bench_memory(devices: int = 10_000) -> dict[str, float]:
    """Everything the engine keeps alive: traced from before the stream is built, measured
    after the stream is dropped, so ids the state holds on to are counted too."""
    patients = devices // 2
    gc.collect()
    tracemalloc.start()
    start_bytes, _ = tracemalloc.get_traced_memory()
    stream = fleet_stream(patients, 3600, every_s=60)
    engine = RulesEngine()
    for obs in stream:
        engine.on_observation(obs)
    engine.take_dirty()
    del stream
    gc.collect()
    state, _ = tracemalloc.get_traced_memory()
    state -= start_bytes
    tracemalloc.stop()
    assert engine.patient_count == patients
    return {
        "state_devices": devices,
        "state_bytes_per_10k_devices": round(state * 10_000 / devices),
        "state_mb_per_10k_devices": round(state * 10_000 / devices / 1e6, 2),
    }


def bench_decode(count: int = 100_000, repeats: int = 5) -> dict[str, float]:
    """The edge codec over alternating temperature and pump-status records; the best of
    ``repeats`` passes (the machine is shared: the best pass is the steadiest figure)."""
    from services.rules.adapters.codec import decode_observation
    from tests.support.rules import Home

    home = Home("B-DECODE", T0)
    payloads = [
        (home.temp(i, 36.8) if i % 2 else home.status(i)).model_dump_json(by_alias=True).encode()
        for i in range(1000)
    ]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(count):
            decode_observation(payloads[i % 1000])
        best = min(best, time.perf_counter() - started)
    return {
        "decode_events_per_s": round(count / best),
        "decode_us_per_event": round(best / count * 1e6, 3),
    }


async def bench_kafka(records: int, patients: int) -> dict[str, float]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from services.rules.app import run
    from services.rules.settings import RulesSettings
    from tests.support.rules import Home

    bootstrap = os.environ.get("VIGIL_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:29092")
    run_id = uuid.uuid4().hex[:8]
    topics = {
        "telemetry": f"bench.rules.telemetry.{run_id}",
        "alerts": f"bench.rules.alerts.{run_id}",
        "state": f"bench.rules.state.{run_id}",
        "deadletter": f"bench.rules.deadletter.{run_id}",
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics(
        [NewTopic(t, 6, 1) for t in topics.values() if t != topics["state"]]
        + [NewTopic(topics["state"], 6, 1, topic_configs={"cleanup.policy": "compact"})]
    )
    try:
        homes = [Home(f"BK-{run_id}-{p:05d}", T0) for p in range(patients)]
        templates = []
        for i, home in enumerate(homes):
            templates.append((home.patient_id, home.temp(0, 36.7 + (i % 5) / 10)))
            templates.append((home.patient_id, home.status(0)))
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, linger_ms=20, acks="all", max_batch_size=256 * 1024
        )
        await producer.start()
        log(f"kafka: preloading {records} records")
        futures = []
        per_round = len(templates)
        for n in range(records):
            patient_id, template = templates[n % per_round]
            step = n // per_round
            message = template.message.model_copy(
                update={
                    "device_time": T0 + timedelta(seconds=10 * step),
                    "message_id": uuid.uuid4(),
                    "seq": step,
                }
            )
            event = template.model_copy(
                update={"message": message, "ingest_time": T0 + timedelta(seconds=10 * step + 1)}
            )
            futures.append(
                await producer.send(
                    topics["telemetry"],
                    event.model_dump_json(by_alias=True).encode(),
                    key=patient_id.encode(),
                )
            )
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        await producer.stop()

        settings = RulesSettings(
            group_id=f"bench-rules-{run_id}",
            telemetry_topic=topics["telemetry"],
            alerts_topic=topics["alerts"],
            state_topic=topics["state"],
            deadletter_topic=topics["deadletter"],
            config_from_postgres=False,
            log_level="WARNING",
        )
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(run(settings, stop))
        first_at, first_count, done_at = await wait_committed(
            admin, settings.group_id, topics["telemetry"], records, task
        )
        elapsed = done_at - started
        stop.set()
        await asyncio.wait_for(task, 60)
        return {
            "kafka_events": records,
            "kafka_seconds": round(elapsed, 2),
            "kafka_events_per_s": round(records / elapsed),
            "kafka_first_commit_s": round(first_at - started, 2),
            "kafka_first_commit_records": first_count,
            "kafka_after_first_commit_per_s": (
                round((records - first_count) / (done_at - first_at))
                if done_at > first_at and first_count < records
                else None
            ),
        }
    finally:
        await admin.delete_topics(list(topics.values()))
        await admin.close()


async def wait_committed(
    admin: object, group: str, topic: str, total: int, task: asyncio.Task[None]
) -> tuple[float, int, float]:
    """When the first offset was seen committed and how many records it covered, and when
    all ``total`` were (polled every 50 ms)."""
    from aiokafka.errors import KafkaError

    first: tuple[float, int] | None = None
    while True:
        if task.done():
            task.result()
            raise RuntimeError("rules stopped before consuming everything")
        try:
            offsets = await admin.list_consumer_group_offsets(group)  # type: ignore[attr-defined]
        except KafkaError:
            # A fresh stack creates its offsets topic (the group coordinator) on first use.
            await asyncio.sleep(0.2)
            continue
        committed = sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic)
        now = time.perf_counter()
        if first is None and committed > 0:
            first = (now, committed)
        if committed >= total:
            first_at, first_count = first if first is not None else (now, committed)
            return first_at, first_count, now
        await asyncio.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=5000, help="design fleet: 10,000 devices")
    parser.add_argument("--seconds", type=int, default=1800, help="device time of the stream")
    parser.add_argument("--kafka-records", type=int, default=200_000)
    parser.add_argument("--skip-kafka", action="store_true")
    parser.add_argument("--only-kafka", action="store_true")
    args = parser.parse_args(argv)

    figures: dict[str, float | str] = {}
    if not args.skip_kafka:
        from bench.common import stack_environment

        stack_environment()  # the stack named by VIGIL_STACK_*, and its variables for the services
    if args.only_kafka:
        figures.update(asyncio.run(bench_kafka(args.kafka_records, args.patients)))
        print(json.dumps(figures))
        return 0
    log(f"core: building a stream of {args.patients} patients over {args.seconds} s")
    stream = fleet_stream(args.patients, args.seconds)
    figures.update(bench_core(stream))
    log(f"core: {figures['core_events_per_s']} events/s")
    del stream
    figures.update(bench_decode())
    figures.update(bench_memory())
    log(f"memory: {figures['state_mb_per_10k_devices']} MB per 10k devices")
    if not args.skip_kafka:
        figures.update(asyncio.run(bench_kafka(args.kafka_records, args.patients)))
    figures["core_target_per_s"] = 500_000
    figures["kafka_target_per_s"] = 50_000
    figures["state_target_mb_per_10k_devices"] = 10
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
