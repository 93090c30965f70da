"""kill -9 ingest ten times in the middle of a stream: no reading the broker accepted is lost.

Ingest runs as a real subprocess (``python -m vigil_tools.cli ingest``) against the real stack. A
publisher sends a bounded QoS 1 stream; each message counts as accepted by the broker once its
PUBACK arrives. Meanwhile ingest is SIGKILLed at random points and restarted, ten times. At the
end every accepted message must be in PostgreSQL exactly once and in Kafka at least once, where
every extra Kafka copy carries the same ``message_id`` (at-least-once between producing and
the MQTT acknowledgement; consumers drop repeats by message id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.kafka_topics import TELEMETRY_TOPIC
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from tests.kafka_helpers import end_offsets
from tests.polling import NotInTime, eventually

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
KILLS = 10
DEVICES = 4
RATE_PER_S = 150
MAX_MESSAGES = 6000


class IngestProcess:
    """One ``vigil ingest`` child that can be killed and started again with the same identity."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self._env = env
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self._log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vigil_tools.cli", "ingest"],
                env=self._env,
                stdout=out,
                stderr=out,
                cwd=ROOT,
            )
        self.starts += 1

    async def wait_subscribed(self, timeout_s: float = 60.0) -> None:
        def subscribed() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self._log.read_text()
            return self._log.read_bytes().count(b"ingest_subscribed") >= self.starts

        await eventually(subscribed, timeout_s=timeout_s, what="ingest to subscribe")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def register(dsn: str, run_id: str) -> list[str]:
    devices = [f"crash-{run_id}-{i}" for i in range(DEVICES)]
    conn = await asyncpg.connect(dsn)
    try:
        team = f"team-crash-{run_id}"
        await upsert_care_team(conn, team, "Crash test", f"crash-{run_id}@hospital.test")
        for device in devices:
            await upsert_patient(conn, f"P-{device}", team)
            await upsert_device(conn, device, "thermometer", "test")
            await bind_device(conn, device, f"P-{device}", datetime.now(UTC) - timedelta(days=1))
    finally:
        await conn.close()
    return devices


async def kafka_message_ids(
    bootstrap: str, start: dict[TopicPartition, int], devices: set[str]
) -> list[str]:
    """Every telemetry record of ``devices`` written since ``start``, as message ids."""
    end = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    parts = [tp for tp in end if end[tp] > start.get(tp, 0)]
    ids: list[str] = []
    if not parts:
        return ids
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start.get(tp, 0))
        remaining = set(parts)
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            for tp, records in (await consumer.getmany(timeout_ms=1000, max_records=2000)).items():
                for record in records:
                    if record.offset < end[tp]:
                        doc = json.loads(record.value)
                        if doc["device_id"] in devices:
                            ids.append(doc["message"]["message_id"])
                    if record.offset + 1 >= end[tp]:
                        remaining.discard(tp)
        assert not remaining, "could not read the telemetry topic to its end"
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
    return ids


@pytest.fixture
def run_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def ingest_env(stack_env: dict[str, str], run_id: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(stack_env)
    env.update(
        {
            "VIGIL_INGEST_MQTT_CLIENT_ID": f"ingest-crash-{run_id}",
            "VIGIL_INGEST_MQTT_SHARE_GROUP": f"ingest-crash-{run_id}",
            "VIGIL_INGEST_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT),
        }
    )
    yield env


async def test_kill_9_ten_times_loses_nothing_and_stores_each_reading_once(
    stack_env: dict[str, str], ingest_env: dict[str, str], run_id: str, tmp_path: Path
) -> None:
    """Every PUBACKed reading is in the DB exactly once and in Kafka (repeats: same id)."""
    dsn, bootstrap = stack_env["VIGIL_PG_DSN"], stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    devices = await register(dsn, run_id)
    start_offsets = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    ingest = IngestProcess(ingest_env, tmp_path / "ingest.log")
    ingest.start()
    await ingest.wait_subscribed()

    accepted: list[str] = []
    killing_done = asyncio.Event()

    async def publish() -> None:
        async with aiomqtt.Client(
            "127.0.0.1",
            int(stack_env["VIGIL_MQTT_PORT"]),
            username=stack_env["VIGIL_SIM_MQTT_USERNAME"],
            password=stack_env["VIGIL_SIM_MQTT_PASSWORD"],
            identifier=f"crash-pub-{run_id}",
        ) as client:
            seq = 0
            while not killing_done.is_set() and seq < MAX_MESSAGES:
                started = time.monotonic()
                sends = []
                for _ in range(RATE_PER_S // 10):
                    device = devices[seq % DEVICES]
                    message_id = str(uuid.uuid4())
                    payload = {
                        "schema": "vigil.device.temperature.v1",
                        "message_id": message_id,
                        "device_id": device,
                        "seq": seq,
                        "device_time": datetime.now(UTC).isoformat(),
                        # Afebrile on purpose: a rules service sharing the stack must not
                        # raise fever alerts for this test's patients.
                        "value": 36.5 + (seq % 10) / 10,
                    }
                    seq += 1
                    sends.append(
                        (
                            message_id,
                            client.publish(
                                f"vigil/v1/dev/{device}/temperature", json.dumps(payload), qos=1
                            ),
                        )
                    )
                # aiomqtt's publish returns once the PUBACK arrived: the broker has it.
                await asyncio.gather(*(send for _, send in sends))
                accepted.extend(message_id for message_id, _ in sends)
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))

    publisher = asyncio.create_task(publish())
    rng = random.Random(run_id)
    try:
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            ingest.kill()
            # Sometimes come straight back, sometimes leave a backlog in the broker.
            await asyncio.sleep(rng.choice([0.0, 0.3, 1.0]))
            ingest.start()
            await ingest.wait_subscribed()
        killing_done.set()
        await asyncio.wait_for(publisher, 60)
        assert len(accepted) > 500, "the stream was too short to mean anything"

        conn = await asyncpg.connect(dsn)
        try:
            rows: list[asyncpg.Record] = []

            async def all_stored() -> bool:
                nonlocal rows
                rows = await conn.fetch(
                    "SELECT message_id::text AS id FROM temperature_readings "
                    "WHERE device_id = ANY($1::text[])",
                    devices,
                )
                return len(rows) >= len(accepted)

            # Not arriving in time is the loss the assertions below report, row by row.
            with contextlib.suppress(NotInTime):
                await eventually(
                    all_stored, timeout_s=120, interval_s=0.5, what="every accepted reading stored"
                )
        finally:
            await conn.close()
    finally:
        killing_done.set()
        publisher.cancel()
        with contextlib.suppress(BaseException):
            await publisher
        ingest.terminate()
        async with aiomqtt.Client(
            "127.0.0.1",
            int(stack_env["VIGIL_MQTT_PORT"]),
            username=stack_env["VIGIL_INGEST_MQTT_USERNAME"],
            password=stack_env["VIGIL_INGEST_MQTT_PASSWORD"],
            identifier=f"ingest-crash-{run_id}",
            clean_session=True,
        ):
            pass

    in_db = Counter(r["id"] for r in rows)
    assert set(accepted) <= set(in_db), f"{len(set(accepted) - set(in_db))} readings lost"
    assert max(in_db.values()) == 1, "a reading was stored twice"
    assert len(in_db) == len(accepted)

    in_kafka = Counter(await kafka_message_ids(bootstrap, start_offsets, set(devices)))
    assert set(in_kafka) == set(accepted), "Kafka lost a reading or has one never published"
    repeats = sum(in_kafka.values()) - len(in_kafka)
    print(
        f"\nkill -9 x{KILLS}: {len(accepted)} accepted, DB rows {len(in_db)}, "
        f"Kafka records {sum(in_kafka.values())}, Kafka repeats (same message id) {repeats}"
    )
