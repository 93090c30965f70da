"""Broker restarts through the real ingest: a Mosquitto of the test's own (the stack's
configuration; stopped, killed and started here), ingest connected to it with its default
settings (a direct subscription, reconnecting after 0.25-2 s), the test stack's Kafka and
PostgreSQL, and a paced QoS 1 publisher of valid readings with a persistent session that resends
after reconnecting. Every reading the broker acknowledged must be stored in PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.ingest.app import run as run_ingest
from services.ingest.settings import IngestSettings
from tests.broker_faults import OwnBroker, PacedPublisher, free_port
from tests.factories import temperature_message
from tests.polling import NotInTime, eventually, until_ready
from vigil.settings import KafkaSettings, MqttSettings, PostgresSettings
from vigil_tools.stack.credentials import INGEST_MQTT_USER, SIM_MQTT_USER

pytestmark = pytest.mark.stack

RATE = 100.0


@pytest.fixture
def broker() -> Iterator[OwnBroker]:
    path = Path(tempfile.mkdtemp(prefix="vigil-ingest-restart-"))
    os.chmod(path, 0o755)  # as root the broker drops to its own user
    own = OwnBroker(path)
    try:
        own.start()
        yield own
    finally:
        own.stop(signal.SIGTERM)
        shutil.rmtree(path, ignore_errors=True)


def reading(device: str, seq: int) -> bytes:
    message = temperature_message(device, 37.0, seq=seq, unit="C", site="oral")
    return json.dumps(message).encode()


async def register(dsn: str, run: str, devices: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, f"team-rst-{run}", "restart test", "oncall@hospital.test")
        await upsert_patient(conn, f"P-rst-{run}", f"team-rst-{run}")
        for device in devices:
            await upsert_device(conn, device, "thermometer", "test-thermometer")
            await bind_device(conn, device, f"P-rst-{run}", datetime.now(UTC) - timedelta(days=1))
    finally:
        await conn.close()


async def stored(dsn: str, devices: list[str]) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT message_id FROM temperature_readings WHERE device_id = ANY($1)", devices
        )
    finally:
        await conn.close()
    return {str(r["message_id"]) for r in rows}


@pytest.mark.parametrize("fault", ["graceful", "sigkill", "offline-restart"])
async def test_every_acknowledged_reading_is_stored_across_a_broker_restart(
    stack_env: dict[str, str], broker: OwnBroker, fault: str
) -> None:
    run = uuid.uuid4().hex[:8]
    devices = [f"rst-{run}-{i}" for i in range(4)]
    dsn = stack_env["VIGIL_PG_DSN"]
    await register(dsn, run, devices)
    ops_port = free_port()
    settings = IngestSettings(
        mqtt_username=INGEST_MQTT_USER,
        mqtt_password=broker.secrets.mqtt_ingest_password,
        mqtt_client_id=f"ingest-rst-{run}",
        metrics_port=ops_port,
        kafka=KafkaSettings(bootstrap_servers=stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]),
        pg=PostgresSettings(dsn=dsn),
        mqtt=MqttSettings(host="127.0.0.1", port=broker.port),
    )
    publisher = PacedPublisher(
        broker.port,
        SIM_MQTT_USER,
        broker.secrets.mqtt_sim_password,
        f"rst-hub-{run}",
        devices,
        RATE,
        payload=reading,
    )
    stop = asyncio.Event()
    ingest = asyncio.create_task(run_ingest(settings, stop))
    try:
        # Publishing starts once ingest is ready (subscribed): what a broker receives before a
        # subscription exists for the first time goes nowhere, restart or not.
        await until_ready(ops_port, what="ingest", timeout_s=30, tasks=[ingest])
        await asyncio.to_thread(publisher.connect)
        publisher.start(16.0)
        await asyncio.sleep(4.0)
        if fault == "offline-restart":
            # Ingest stopped (its session stays), the broker restarted while it is away.
            stop.set()
            await asyncio.wait_for(ingest, 60)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(broker.stop, signal.SIGTERM)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(broker.start)
            await asyncio.sleep(6.0)
            stop = asyncio.Event()
            ingest = asyncio.create_task(run_ingest(settings, stop))
        else:
            fault_at = time.monotonic_ns()
            sig = signal.SIGKILL if fault == "sigkill" else signal.SIGTERM
            await asyncio.to_thread(broker.stop, sig)
            await asyncio.sleep(2.0)
            await asyncio.to_thread(broker.start)
        await asyncio.to_thread(publisher.join)
        await eventually(publisher.all_acked, timeout_s=60, what="every PUBACK", interval_s=0.02)
        acked = set(publisher.counts.acked)
        have: set[str] = set()

        async def all_stored() -> bool:
            nonlocal have
            have = await stored(dsn, devices)
            return acked <= have

        # Not arriving in time is the loss this test measures, not an error of its own.
        with contextlib.suppress(NotInTime):
            await eventually(
                all_stored, timeout_s=60, interval_s=0.5, what="every acked reading stored"
            )
        lost = acked - have
        figures = {
            "fault": fault,
            "published": len(publisher.counts.published),
            "acked": len(acked),
            "stored": len(have & acked),
            "lost": len(lost),
        }
        if lost and fault != "offline-restart":
            figures["lost_published_s_after_fault"] = sorted(
                round((publisher.counts.published[m] - fault_at) / 1e9, 3) for m in lost
            )
            figures["lost_acked_s_after_fault"] = sorted(
                round((publisher.counts.acked[m] - fault_at) / 1e9, 3) for m in lost
            )
        print(figures)
        assert len(acked) == len(publisher.counts.published) > 1000, figures
        if fault == "sigkill":
            # A crash may lose what the broker acknowledged since its last save (about a second,
            # docs/reliability.md); nothing else.
            assert len(lost) <= 2 * RATE, figures
        else:
            assert not lost, figures
    finally:
        stop.set()
        await asyncio.to_thread(publisher.close)
        await asyncio.wait_for(ingest, 60)
