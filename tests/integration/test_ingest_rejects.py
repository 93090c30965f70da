"""Bad inputs through the real broker and ingest: each lands in the dead-letter topic with its
reason, nothing crashes, a good reading after them is stored, a duplicate is dropped and counted,
and the device's last-seen row and /metrics reflect what happened."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import aiomqtt
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.kafka_topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from tests.factories import temperature_message
from tests.kafka_helpers import end_offsets
from tests.polling import eventually, until_ready

pytestmark = pytest.mark.stack


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def read_since(
    bootstrap: str,
    topic: str,
    start: dict[TopicPartition, int],
    wanted: int,
    match: object,
    distinct: Callable[[dict[str, object]], object] | None = None,
) -> list[dict[str, object]]:
    """Records of ``topic`` after ``start`` for which ``match(doc)`` holds, until ``wanted`` of
    them (with ``distinct``: until ``wanted`` distinct ``distinct(doc)`` among them)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    found: list[dict[str, object]] = []
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + 60

        def enough() -> bool:
            seen = found if distinct is None else {distinct(doc) for doc in found}
            return len(seen) >= wanted

        while not enough() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    doc = json.loads(record.value)
                    if match(doc):  # type: ignore[operator]
                        found.append(doc)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await consumer.stop()
    return found


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    return body


def reading(device: str, **overrides: object) -> dict[str, object]:
    payload = temperature_message(device, 37.4)
    payload.update(overrides)
    return payload


async def test_bad_inputs_are_dead_lettered_with_reasons_and_the_stream_keeps_flowing(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Malformed JSON, a v2 schema, 10 MB, NaN, nanosecond time, unknown device: each its reason."""
    from services.ingest.app import run
    from services.ingest.settings import IngestSettings

    run_id = uuid.uuid4().hex[:8]
    dsn, bootstrap = stack_env["VIGIL_PG_DSN"], stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    good = f"good-{run_id}"
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, f"team-{run_id}", "Rejects", f"r-{run_id}@hospital.test")
        await upsert_patient(conn, f"P-{run_id}", f"team-{run_id}")
        await upsert_device(conn, good, "thermometer", "test")
        await bind_device(conn, good, f"P-{run_id}", datetime.now(UTC) - timedelta(days=1))
    finally:
        await conn.close()

    def bad(case: str) -> str:
        return f"vigil/v1/dev/bad-{run_id}-{case}/temperature"

    nan = json.dumps(reading(f"bad-{run_id}-nan")).replace("37.4", "NaN").encode()
    cases: dict[str, tuple[bytes, str]] = {
        "json": (b'{"schema": "vigil.device.temperature.v1", "value": 3', "invalid_json"),
        "version": (
            json.dumps(
                reading(f"bad-{run_id}-version", schema="vigil.device.temperature.v2")
            ).encode(),
            "unknown_schema",
        ),
        "huge": (b"x" * (10 * 1024 * 1024), "payload_too_large"),
        "nan": (nan, "invalid_json"),
        "nanos": (
            json.dumps(reading(f"bad-{run_id}-nanos", device_time=time.time_ns())).encode(),
            "schema_validation",
        ),
        "unknown": (json.dumps(reading(f"bad-{run_id}-unknown")).encode(), "unknown_device"),
    }
    dead_start = await end_offsets(bootstrap, DEADLETTER_TOPIC)
    telemetry_start = await end_offsets(bootstrap, TELEMETRY_TOPIC)
    metrics_port = free_port()
    monkeypatch.setenv("VIGIL_INGEST_MQTT_CLIENT_ID", f"ingest-rejects-{run_id}")
    monkeypatch.setenv("VIGIL_INGEST_MQTT_SHARE_GROUP", f"ingest-rejects-{run_id}")
    monkeypatch.setenv("VIGIL_INGEST_METRICS_PORT", str(metrics_port))
    stop = asyncio.Event()
    ingest = asyncio.create_task(run(IngestSettings(), stop))
    try:
        good_message = json.dumps(reading(good, value=45.0)).encode()
        async with aiomqtt.Client(
            "127.0.0.1",
            int(stack_env["VIGIL_MQTT_PORT"]),
            username=stack_env["VIGIL_SIM_MQTT_USERNAME"],
            password=stack_env["VIGIL_SIM_MQTT_PASSWORD"],
            identifier=f"rejects-pub-{run_id}",
        ) as client:
            # Ingest subscribed (the share group starts with it).
            await until_ready(metrics_port, what="ingest", tasks=[ingest])
            for case, (payload, _) in cases.items():
                await client.publish(bad(case), payload, qos=1)
            # The same good reading twice: stored once, counted as a duplicate.
            await client.publish(f"vigil/v1/dev/{good}/temperature", good_message, qos=1)
            await client.publish(f"vigil/v1/dev/{good}/temperature", good_message, qos=1)

        prefix = f"bad-{run_id}-"
        dead = await read_since(
            bootstrap,
            DEADLETTER_TOPIC,
            dead_start,
            len(cases),
            lambda d: str(d.get("device_id") or "").startswith(prefix),
            # The test stack's broker is shared: every other ingest on it (each with its own
            # share group) dead-letters these inputs too. Wait for each case, not for a count.
            distinct=lambda d: d["source_topic"],
        )
        telemetry = await read_since(
            bootstrap, TELEMETRY_TOPIC, telemetry_start, 1, lambda d: d["device_id"] == good
        )
        conn = await asyncpg.connect(dsn)
        try:
            # Kafka and PostgreSQL are written concurrently: the row may trail the record.
            rows = await eventually(
                lambda: conn.fetch(
                    "SELECT flags, value_c FROM temperature_readings WHERE device_id = $1", good
                ),
                timeout_s=30,
                what="the good reading to be stored",
                interval_s=0.1,
            )
            # Liveness is flushed about once a second, after the readings are stored.
            seen = await eventually(
                lambda: conn.fetchrow("SELECT * FROM device_last_seen WHERE device_id = $1", good),
                timeout_s=30,
                what="the good device's liveness to be stored",
                interval_s=0.1,
            )
        finally:
            await conn.close()
        duplicate_line = 'vigil_ingest_duplicates_total{kind="message_id"} 1.0'

        async def counted() -> str | None:
            page = await scrape(metrics_port)
            return page if duplicate_line in page else None

        metrics = await eventually(
            counted, timeout_s=30, what="the duplicate to be counted", interval_s=0.1
        )
    finally:
        stop.set()
        await asyncio.wait_for(ingest, 30)
        async with aiomqtt.Client(
            "127.0.0.1",
            int(stack_env["VIGIL_MQTT_PORT"]),
            username=stack_env["VIGIL_INGEST_MQTT_USERNAME"],
            password=stack_env["VIGIL_INGEST_MQTT_PASSWORD"],
            identifier=f"ingest-rejects-{run_id}",
            clean_session=True,
        ):
            pass

    # Another ingest on the shared broker may have dead-lettered the same inputs: every letter
    # for a case must carry its reason and its payload.
    by_topic: dict[str, list[dict[str, object]]] = {}
    for d in dead:
        by_topic.setdefault(str(d["source_topic"]), []).append(d)
    for case, (payload, reason) in cases.items():
        letters = by_topic.get(bad(case))
        assert letters, f"{case}: no dead letter"
        for letter in letters:
            assert letter["reason"] == reason, case
            kept = base64.b64decode(str(letter["payload_b64"]))
            assert payload.startswith(kept) and len(kept) <= 64 * 1024, case
            assert letter["payload_size"] == len(payload), case
    assert all(letter["payload_truncated"] is True for letter in by_topic[bad("huge")])

    # The sensor fault (45 °C) after all of that: stored once, flagged, no fever value.
    assert len(rows) == 1 and list(rows[0]["flags"]) == ["implausible_temperature"]
    assert len(telemetry) == 1 and telemetry[0]["temperature_c"] is None
    assert seen is not None and seen["patient_id"] == f"P-{run_id}"
    assert duplicate_line in metrics
    assert 'vigil_ingest_rejected_total{reason="payload_too_large"}' in metrics
