"""End to end on the real stack: a thermometer reading over MQTT becomes an e-mail page."""

from __future__ import annotations

import asyncio
import base64
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from schemas.events import DeadLetter
from schemas.kafka_topics import DEADLETTER_TOPIC
from tests.e2e.conftest import (
    Pipeline,
    publish,
    register_patient,
    rules_caught_up,
    temperature,
)
from tests.polling import eventually

pytestmark = pytest.mark.stack


async def control_page(pipeline: Pipeline, stack_env: dict[str, str]) -> None:
    """Positive control before a "no (further) page" check: a fever of another patient,
    published now, is paged; any page decided earlier has had the same way to go."""
    patient, device, _ = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, f"control-{uuid.uuid4().hex[:6]}"
    )
    await publish(stack_env, f"vigil/v1/dev/{device}/temperature", temperature(device, 38.6, 1))
    await eventually(
        lambda: pipeline.mail.for_patient(patient),
        timeout_s=60,
        interval_s=0.1,
        what="the control patient's fever page",
    )


async def test_normal_reading_pages_no_one(pipeline: Pipeline, stack_env: dict[str, str]) -> None:
    """A normal temperature is stored and evaluated by rules, and no page is sent."""
    patient, device, _ = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, "normal"
    )
    await publish(stack_env, f"vigil/v1/dev/{device}/temperature", temperature(device, 37.1, 1))

    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:

        async def stored() -> int:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM temperature_readings WHERE patient_id = $1", patient
                )
            )

        await eventually(stored, timeout_s=30, interval_s=0.2, what="the reading to be stored")
    finally:
        await conn.close()
    await rules_caught_up(stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"], pipeline.rules_group)
    await control_page(pipeline, stack_env)
    assert pipeline.mail.for_patient(patient) == []


async def test_fever_reading_reaches_the_oncall_by_email(
    pipeline: Pipeline, stack_env: dict[str, str]
) -> None:
    """38.6 °C published over MQTT QoS 1 becomes one e-mail page to the team's on-call address,
    carrying patient, device, value and threshold, and the page is recorded."""
    patient, device, oncall = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, "fever"
    )
    topic = f"vigil/v1/dev/{device}/temperature"
    await publish(stack_env, topic, temperature(device, 37.2, 1))
    await publish(stack_env, topic, temperature(device, 38.6, 2))

    await eventually(
        lambda: pipeline.mail.for_patient(patient),
        timeout_s=60,
        interval_s=0.1,
        what="the fever page",
    )
    page = pipeline.mail.for_patient(patient)[0]
    body = page.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert page["To"] == oncall
    assert patient in page["Subject"] and "HIGH" in page["Subject"].upper()
    for expected in (patient, device, "38.6", "38.3", "fever"):
        assert expected in body, expected

    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        rows = await conn.fetch(
            "SELECT recipient, status FROM pages WHERE patient_id = $1", patient
        )
    finally:
        await conn.close()
    assert [r["recipient"] for r in rows] == [oncall]
    assert rows[0]["status"] in ("sent", "delivered")
    # The 37.2 °C reading before it paged no one; the fever paged exactly once.
    await rules_caught_up(stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"], pipeline.rules_group)
    await control_page(pipeline, stack_env)
    assert len(pipeline.mail.for_patient(patient)) == 1


async def test_invalid_payload_goes_to_dead_letter_with_reason(
    pipeline: Pipeline, stack_env: dict[str, str]
) -> None:
    """Malformed JSON is not dropped: it reaches the dead-letter topic with its reason, and the
    pipeline keeps flowing for the next good reading."""
    bootstrap = stack_env["VIGIL_KAFKA_BOOTSTRAP_SERVERS"]
    consumer = AIOKafkaConsumer(
        DEADLETTER_TOPIC,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        group_id=f"dlq-e2e-{pipeline.run_id}",
    )
    await consumer.start()
    try:
        # aiokafka offers no assignment event.
        await eventually(
            consumer.assignment,
            timeout_s=30,
            interval_s=0.1,
            what="the dead-letter consumer's assignment",
        )
        await consumer.seek_to_end()
        for tp in consumer.assignment():
            await consumer.position(tp)
        device = f"thermo-dlq-{pipeline.run_id}"
        marker = uuid.uuid4().hex.encode()
        await publish(stack_env, f"vigil/v1/dev/{device}/temperature", b"{not json " + marker)
        found: DeadLetter | None = None
        deadline = asyncio.get_running_loop().time() + 30
        while found is None:
            assert asyncio.get_running_loop().time() < deadline, "no dead letter arrived"
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    letter = DeadLetter.model_validate_json(record.value or b"")
                    if letter.device_id == device:
                        found = letter
        assert found.reason == "invalid_json"
        assert found.source_topic == f"vigil/v1/dev/{device}/temperature"

        assert marker in base64.b64decode(found.payload_b64)
    finally:
        await consumer.stop()

    patient, good_device, _ = await register_patient(
        stack_env["VIGIL_PG_DSN"], pipeline.run_id, "after-dlq"
    )
    await publish(
        stack_env, f"vigil/v1/dev/{good_device}/temperature", temperature(good_device, 38.9, 1)
    )
    await eventually(
        lambda: pipeline.mail.for_patient(patient),
        timeout_s=60,
        interval_s=0.1,
        what="a page after a bad message",
    )
