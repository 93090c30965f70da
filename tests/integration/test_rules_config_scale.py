"""The rules service starts against a large registry: 100,000 registered patients of whom
10,000 are monitored (an open binding, a recent cycle), the rest discharged long ago.

The service runs in this process on private topics with its configuration from the real
PostgreSQL. It must become ready; its working configuration holds the monitored patients and
none of the discharged ones; the largest record it writes to its state topic does not grow with
the fleet (a config record of a few kilobytes, where the whole configuration is megabytes); the
stored pieces are small too; and a change to one patient's override, reloaded while it runs, is
stored as one changed piece, and pages that patient's next reading on the new threshold.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas.events import Alert
from tests.integration.test_rules_config_reload import read_topic
from tests.kafka_helpers import create_rules_topics, rules_settings
from tests.polling import eventually
from tests.support.rules import Home, register_fleet, remove_fleet
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings
from vigil_tools.replay import config_store

pytestmark = pytest.mark.stack

REGISTERED = 100_000
ACTIVE = 10_000


@pytest.fixture
async def fleet(pg_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, list[str]]]:
    """The registry, removed afterwards (the recorded configs stay: append-only)."""
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        patients = await register_fleet(
            conn, prefix, registered=REGISTERED, active=ACTIVE, now=datetime.now(UTC)
        )
        yield conn, patients
    finally:
        await remove_fleet(conn, prefix)
        await conn.close()


async def test_rules_starts_on_a_large_registry_and_writes_no_record_that_grows_with_it(
    fleet: tuple[asyncpg.Connection, list[str]],
) -> None:
    """Ready with 100,000 registered / 10,000 monitored; only monitored patients configured;
    every state-topic record and stored piece a few kilobytes; a one-patient override is one
    stored change and decides that patient's next reading."""
    from services.rules.app import run as run_rules

    conn, patients = fleet
    active, discharged = patients[:ACTIVE], patients[ACTIVE:]
    run = uuid.uuid4().hex[:8]
    kafka = KafkaSettings()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    names = await create_rules_topics(admin, f"scaletest.{run}")
    settings = rules_settings(names, group_id=f"rules-scaletest-{run}", config_reload_s=0.5)
    stop = asyncio.Event()
    service = asyncio.create_task(run_rules(settings, stop))
    producer = make_producer(kafka, f"scaletest-{run}")
    await producer.start()

    async def config_records() -> list[dict[str, object]]:
        if service.done():
            service.result()  # surface a failure of the service as the error it is
        return [
            orjson.loads(value)
            for key, value in await read_topic(names["state"], 1)
            if key.startswith(b"__config__/")
        ]

    try:
        first = await eventually(
            config_records, timeout_s=120, interval_s=0.5, what="the service to pin its config"
        )
        assert isinstance(first, list)
        pinned = await config_store.load_config(conn, str(first[0]["content_hash"]))
        profiles = pinned.config.profiles
        # Other tests' monitored patients may share the database: at least ours, none gone.
        assert int(str(first[0]["profiles"])) == len(profiles) >= ACTIVE
        assert all(p in profiles for p in active)
        assert not any(p in profiles for p in discharged)
        whole = len(pinned.canonical())
        assert whole > 1_000_000  # the whole configuration: megabytes

        # A one-patient change while it runs: one stored change, and the next reading decides
        # on it (a 38.4 °C reading pages under the patient's new 38.4 °C single-reading level;
        # the fleet's one-in-ten override of 38.5 would have kept it quiet).
        patient = active[10]  # one in ten has an override: index 10 is one of them
        await conn.execute(
            "INSERT INTO patient_rule_overrides (patient_id, version, overrides, signed_off_by,"
            " signed_off_at) VALUES ($1, 2, '{\"fever_single_c\": 38.4}'::jsonb, 'test', now())",
            patient,
        )

        async def reloaded() -> dict[str, object] | None:
            for record in await config_records():
                if record["config_version"] != first[0]["config_version"]:
                    return record
            return None

        second = await eventually(
            reloaded, timeout_s=60, interval_s=0.5, what="the reloaded config"
        )
        assert isinstance(second, dict)
        changes = await conn.fetch(
            "SELECT kind, piece_key FROM rules_config_manifest_changes WHERE content_hash = $1",
            second["content_hash"],
        )
        assert [(r["kind"], r["piece_key"]) for r in changes] == [("profile", patient)]
        home = Home(
            patient, datetime.now(UTC) - timedelta(minutes=30), thermometer_id=f"{patient}-t"
        )
        await producer.send_and_wait(
            names["telemetry"], encode(home.temp(0, 38.4)), key=patient.encode()
        )

        async def paged() -> list[Alert]:
            return [
                alert
                for alert in (
                    Alert.model_validate_json(v) for _, v in await read_topic(names["alerts"], 1)
                )
                if alert.patient_id == patient
            ]

        alerts = await eventually(
            paged, timeout_s=60, interval_s=0.5, what="the alert on the new threshold"
        )
        assert isinstance(alerts, list)
        assert [a.code for a in alerts] == ["fever_single"]
        assert alerts[0].config_version == second["config_version"]

        records = await read_topic(names["state"], 1)
        largest = max(len(value) for _, value in records)
        largest_piece = await conn.fetchval(
            "SELECT max(octet_length(piece_text)) FROM rules_config_pieces"
            " WHERE piece_key = ANY($1::text[])",
            active[:100],
        )
        print(
            f"largest state-topic record: {largest} bytes of {len(records)} records; "
            f"largest stored piece: {largest_piece} bytes; whole config: {whole} bytes"
        )
        assert largest < 16_384
        assert largest_piece < 4_096
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(service, return_exceptions=True), 60)
        await admin.delete_topics(list(names.values()))
        await admin.close()
