"""Hot reload against the real stack: a patient override a charge nurse signs off in
PostgreSQL while the rules service runs takes effect without a restart.

The service runs in this process on private topics with its configuration from the real
PostgreSQL, re-read every half second. A 38.1 °C reading does not page under the default
38.3 °C; the test then inserts an override lowering the patient's threshold to 38.0 °C, waits
until the service has pinned a configuration holding it (its ``__config__/<version>`` record on
the state topic names the content hash under which the config is stored in PostgreSQL), and a
second 38.1 °C reading pages, naming that new ``config_version``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.events import Alert
from tests.integration.test_rules_config_store import bind, unbind
from tests.kafka_helpers import create_rules_topics, rules_settings
from tests.polling import eventually
from tests.support.rules import Home
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings
from vigil_tools.replay import config_store
from vigil_tools.replay.engine_port import PinnedRules

pytestmark = pytest.mark.stack


async def read_topic(topic: str, partitions: int) -> list[tuple[bytes, bytes]]:
    """Every committed (key, value) of ``topic``, from the beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=KafkaSettings().bootstrap_servers,
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[tuple[bytes, bytes]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for records in (await consumer.getmany(*pending, timeout_ms=500)).values():
                found += [(r.key or b"", r.value) for r in records if r.value is not None]
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return found


@pytest.fixture
async def registered(pg_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A care team and a patient of this run in the real registry, removed afterwards."""
    run = uuid.uuid4().hex[:8]
    team, patient = f"team-reload-{run}", f"P-reload-{run}"
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) "
        "VALUES ($1, $1, 'x@example.org')",
        team,
    )
    await conn.execute(
        "INSERT INTO patients (patient_id, care_team_id, weight_kg) VALUES ($1, $2, 30)",
        patient,
        team,
    )
    await bind(conn, patient)  # monitored: only monitored patients are in the config
    try:
        yield conn, patient
    finally:
        await unbind(conn, [patient])
        await conn.execute("DELETE FROM patient_rule_overrides WHERE patient_id = $1", patient)
        await conn.execute("DELETE FROM patients WHERE patient_id = $1", patient)
        await conn.execute("DELETE FROM care_teams WHERE care_team_id = $1", team)
        await conn.close()


async def test_an_override_signed_off_while_rules_runs_pages_the_next_reading(
    registered: tuple[asyncpg.Connection, str],
) -> None:
    """38.1 °C is quiet under the default threshold; after an override to 38.0 °C is inserted
    in PostgreSQL (no restart), the next 38.1 °C reading pages with the reloaded config's
    version, and that version's pinned config on the state topic holds the override."""
    from services.rules.app import run as run_rules

    conn, patient = registered
    run = uuid.uuid4().hex[:8]
    kafka = KafkaSettings()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    names = await create_rules_topics(admin, f"reloadtest.{run}")
    settings = rules_settings(
        names,
        group_id=f"rules-reloadtest-{run}",
        config_reload_s=0.5,
    )
    home = Home(patient, datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
    stop = asyncio.Event()
    service = asyncio.create_task(run_rules(settings, stop))
    producer = make_producer(kafka, f"reloadtest-{run}")
    await producer.start()

    async def state_records() -> list[tuple[bytes, bytes]]:
        if service.done():
            service.result()  # surface a failure of the service as the error it is
        return await read_topic(names["state"], 1)

    async def alerts() -> list[Alert]:
        if service.done():
            service.result()
        return [
            a
            for a in (Alert.model_validate_json(v) for _, v in await read_topic(names["alerts"], 1))
            if a.patient_id == patient
        ]

    try:
        await producer.send_and_wait(names["telemetry"], encode(home.temp(0, 38.1)))

        async def first_reading_stored() -> bool:
            # The patient's state record is committed with the offsets of the first reading.
            return any(key == patient.encode() for key, _ in await state_records())

        await eventually(
            first_reading_stored,
            timeout_s=60,
            interval_s=0.5,
            what="the first reading to be processed",
        )
        assert await alerts() == [], "38.1 °C must not page under the default 38.3 °C"

        await conn.execute(
            "INSERT INTO patient_rule_overrides (patient_id, version, overrides, signed_off_by, "
            "signed_off_at, reason) VALUES ($1, 1, $2::jsonb, 'charge-nurse', $3, 'reload test')",
            patient,
            json.dumps({"fever_single_c": 38.0}),
            datetime.now(UTC),
        )

        async def pinned(record: bytes) -> PinnedRules:
            """The config a state-topic record names, loaded from PostgreSQL by its hash."""
            named = orjson.loads(record)
            rules = await config_store.load_config(conn, named["content_hash"])
            assert rules.label == named["config_version"]
            assert rules.content_hash == named["content_hash"]
            return rules

        async def pinned_with_override() -> str | None:
            for key, value in await state_records():
                if not key.startswith(b"__config__/"):
                    continue
                rules = await pinned(value)
                if rules.config.thresholds_for(patient).fever_single_c == 38.0:
                    return rules.label
            return None

        version = await eventually(
            pinned_with_override,
            timeout_s=60,
            interval_s=0.5,
            what="a reloaded config with the override",
        )

        await producer.send_and_wait(names["telemetry"], encode(home.temp(5, 38.1)))
        paged = await eventually(
            alerts, timeout_s=60, interval_s=0.5, what="the alert under the new threshold"
        )
        assert isinstance(paged, list)
        (alert,) = paged
        assert alert.code == "fever_single"
        assert alert.evidence[0].limit == 38.0
        # The alert names a config the service pinned, and that config holds the override (a
        # later reload, from another run's rows, may have superseded the first one we saw).
        assert alert.config_version is not None and alert.config_version.startswith("pg-")
        pinned_records = {
            key.decode().removeprefix("__config__/"): value
            for key, value in await state_records()
            if key.startswith(b"__config__/")
        }
        named = (await pinned(pinned_records[alert.config_version])).config
        assert named.thresholds_for(patient).fever_single_c == 38.0
        assert version in pinned_records
        # The records do not carry the profiles: each is far smaller than the config.
        assert all(len(value) < 8_192 for value in pinned_records.values())
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(service, return_exceptions=True), 30)
        await admin.delete_topics(list(names.values()))
        await admin.close()
