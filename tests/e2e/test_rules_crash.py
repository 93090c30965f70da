"""A crash in the middle of a stream, against the real stack: SIGKILL the rules service, start it
again, and the alerts topic (read committed) holds exactly the alerts of an uninterrupted run.

The rules service runs as its own process (``python -m vigil_tools.cli rules``) on this run's own
topics, consumer group and transactional id, with a pinned configuration file. The stream is the
golden recording, copied for many patients and spread over six partitions. The uninterrupted
run is the pure engine over each partition's events in partition order (the service runs one
engine per partition), so the comparison checks what Kafka delivered against what the rules
decide: none lost, none duplicated, each patient's alerts in the same order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from schemas.events import Alert, Telemetry
from services.rules.domain.config import RulesConfig
from services.rules.domain.engine import RulesEngine
from tests.golden.record import config as golden_config
from tests.golden.record import stream as golden_stream
from tests.polling import eventually

pytestmark = pytest.mark.stack

PARTITIONS = 6
COPIES = 24
ROOT = Path(__file__).resolve().parents[2]


def partition_of(patient_id: str) -> int:
    return zlib.crc32(patient_id.encode()) % PARTITIONS


def build(run_id: str) -> tuple[RulesConfig, list[Telemetry]]:
    """Many copies of the golden homes with this run's patient ids, in arrival order."""
    profiles = {}
    events: list[tuple[int, Telemetry]] = []
    for copy in range(COPIES):
        prefix = f"crash-{run_id}-{copy:02d}-"
        profiles.update(golden_config(prefix).profiles)
        events += [(copy, e) for e in golden_stream(prefix)]
    events.sort(key=lambda pair: (pair[1].ingest_time, pair[0]))
    config = golden_config().model_copy(update={"profiles": profiles, "config_version": run_id})
    return config, [e for _, e in events]


def uninterrupted(config: RulesConfig, events: list[Telemetry]) -> dict[str, list[str]]:
    """Each patient's alerts (JSON) as one engine per partition decides them."""
    engines = [RulesEngine(config) for _ in range(PARTITIONS)]
    by_patient: dict[str, list[str]] = defaultdict(list)
    for event in events:
        for alert in engines[partition_of(event.patient_id)].on_telemetry(event):
            by_patient[alert.patient_id].append(alert.model_dump_json(by_alias=True))
    return by_patient


class Topics:
    def __init__(self, run_id: str) -> None:
        self.telemetry = f"test.rules-crash.telemetry.{run_id}"
        self.alerts = f"test.rules-crash.alerts.{run_id}"
        self.state = f"test.rules-crash.state.{run_id}"
        self.deadletter = f"test.rules-crash.deadletter.{run_id}"


@pytest.fixture
async def topics(stack_env: dict[str, str]) -> AsyncIterator[Topics]:
    """This run's own topics, deleted afterwards."""
    made = Topics(uuid.uuid4().hex[:8])
    admin = AIOKafkaAdminClient(bootstrap_servers=stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    names = [made.telemetry, made.alerts, made.deadletter]
    await admin.create_topics(
        [NewTopic(name, PARTITIONS, 1) for name in names]
        + [NewTopic(made.state, PARTITIONS, 1, topic_configs={"cleanup.policy": "compact"})]
    )
    try:
        yield made
    finally:
        await admin.delete_topics([*names, made.state])
        await admin.close()


def start_rules(
    env: dict[str, str], topics: Topics, config_file: Path, run_id: str
) -> subprocess.Popen[bytes]:
    service_env = {
        **os.environ,
        **env,
        "VIGIL_RULES_GROUP_ID": f"rules-crash-{run_id}",
        "VIGIL_RULES_TRANSACTIONAL_ID": f"rules-crash-{run_id}",
        "VIGIL_RULES_TELEMETRY_TOPIC": topics.telemetry,
        "VIGIL_RULES_ALERTS_TOPIC": topics.alerts,
        "VIGIL_RULES_STATE_TOPIC": topics.state,
        "VIGIL_RULES_DEADLETTER_TOPIC": topics.deadletter,
        "VIGIL_RULES_CONFIG_FILE": str(config_file),
        # Small transactions, so the kill lands between many commits and inside one.
        "VIGIL_RULES_MAX_BATCH": "50",
        "VIGIL_RULES_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "vigil_tools.cli", "rules"],
        cwd=ROOT,
        env=service_env,
        stdout=subprocess.DEVNULL,
        # A file, not a pipe: a full pipe would block the service on its own log lines.
        stderr=(config_file.parent / f"rules-{time.monotonic_ns()}.log").open("wb"),
    )


async def committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> int:
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    except KafkaError:  # the group's coordinator is still being elected: nothing committed yet
        return 0
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


def tail(logs: Path) -> str:
    return "\n".join(p.read_text()[:2500] for p in sorted(logs.glob("rules-*.log")))


async def wait_committed(
    admin: AIOKafkaAdminClient,
    group: str,
    topic: str,
    at_least: int,
    process: subprocess.Popen[bytes],
    limit_s: float,
    logs: Path,
) -> int:
    done = 0

    async def enough() -> int | None:
        nonlocal done
        done = await committed(admin, group, topic)
        if done >= at_least:
            return done
        if process.poll() is not None:
            raise AssertionError(f"rules exited with {process.returncode}: {tail(logs)}")
        return None

    return await eventually(
        enough,
        timeout_s=limit_s,
        what=f"{at_least} records committed",
        detail=lambda: f"{done}/{at_least} committed: {tail(logs)}",
    )


async def read_alerts(bootstrap: str, topic: str) -> list[Alert]:
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await reader.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        reader.assign(partitions)
        await reader.seek_to_beginning(*partitions)
        ends = await reader.end_offsets(partitions)
        alerts: list[Alert] = []
        deadline = time.monotonic() + 60
        while [tp for tp in partitions if await reader.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, "the alerts topic could not be read to its end"
            for records in (await reader.getmany(timeout_ms=500)).values():
                alerts += [Alert.model_validate_json(r.value or b"") for r in records]
        return alerts
    finally:
        await reader.stop()


async def test_sigkill_mid_stream_loses_and_duplicates_no_alert(
    stack_env: dict[str, str], topics: Topics, tmp_path: Path
) -> None:
    """Kill -9 the rules service after part of the stream is committed, restart it: the
    committed alerts equal the uninterrupted run's, patient by patient, in order."""
    bootstrap = stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    run_id = topics.telemetry.rsplit(".", 1)[-1]
    config, events = build(run_id)
    expected = uninterrupted(config, events)
    assert sum(len(v) for v in expected.values()) >= 10 * COPIES
    config_file = tmp_path / "rules-config.json"
    config_file.write_text(config.model_dump_json())

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)
    await producer.start()
    try:
        sends = [
            await producer.send(
                topics.telemetry,
                event.model_dump_json(by_alias=True).encode(),
                key=event.patient_id.encode(),
                partition=partition_of(event.patient_id),
            )
            for event in events
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()

    group = f"rules-crash-{run_id}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    process = start_rules(stack_env, topics, config_file, run_id)
    try:
        # Kill once a third of the stream is committed: mid-stream, mid-transaction likely.
        await wait_committed(
            admin, group, topics.telemetry, len(events) // 3, process, 40, tmp_path
        )
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        killed_at = await committed(admin, group, topics.telemetry)
        assert killed_at < len(events), "the service finished before it could be killed"

        process = start_rules(stack_env, topics, config_file, run_id)
        await wait_committed(admin, group, topics.telemetry, len(events), process, 180, tmp_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        await admin.close()

    delivered = await read_alerts(bootstrap, topics.alerts)
    ids = [a.alert_id for a in delivered]
    assert len(ids) == len(set(ids)), "an alert was published twice"
    by_patient: dict[str, list[str]] = defaultdict(list)
    for alert in delivered:
        by_patient[alert.patient_id].append(alert.model_dump_json(by_alias=True))
    assert dict(by_patient) == dict(expected)
