"""Ingest takes the pipeline heartbeat like any device message but stores no reading for it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.device import HeartbeatMessage
from services.ingest.adapters.postgres import is_reading, store_telemetry
from services.ingest.domain.admission import admit
from services.ingest.domain.dedup import RecentMessages
from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.validation import (
    Accepted,
    Rejected,
    ValidationLimits,
    validate_message,
)

NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
DEVICE = "heartbeat-pipeline"
PSEUDO_PATIENT = "pipeline-team-tech"
REGISTRY = BindingIndex(
    [
        Binding(DEVICE, PSEUDO_PATIENT, NOW - timedelta(days=1), None),
        Binding("thermo-1", "P-0001", NOW - timedelta(days=1), None),
    ]
)
TOPIC = f"vigil/v1/dev/{DEVICE}/heartbeat"


def heartbeat(device: str = DEVICE, seq: int = 1, **extra: object) -> bytes:
    payload: dict[str, object] = {
        "schema": "vigil.device.heartbeat.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": device,
        "seq": seq,
        "device_time": (NOW - timedelta(seconds=1)).isoformat(),
    }
    payload.update(extra)
    return json.dumps(payload).encode()


def test_heartbeat_is_accepted_and_bound_to_its_pseudo_patient() -> None:
    """A registered heartbeat device's message becomes telemetry of its pseudo-patient, with
    no temperature and no flag."""
    outcome = validate_message(TOPIC, heartbeat(), NOW, REGISTRY)
    assert isinstance(outcome, Accepted)
    telemetry = outcome.telemetry
    assert isinstance(telemetry.message, HeartbeatMessage)
    assert telemetry.patient_id == PSEUDO_PATIENT
    assert telemetry.temperature_c is None and telemetry.flags == ()


def test_unregistered_heartbeat_device_is_dead_lettered() -> None:
    """A heartbeat gets the same registry check as a reading: an unknown device is refused."""
    outcome = validate_message(
        "vigil/v1/dev/heartbeat-other/heartbeat", heartbeat("heartbeat-other"), NOW, REGISTRY
    )
    assert isinstance(outcome, Rejected) and outcome.reason == "unknown_device"


def test_heartbeat_carries_nothing_clinical_and_only_on_its_channel() -> None:
    """A clinical field on a heartbeat is refused, and a heartbeat on the temperature channel
    (or a reading on the heartbeat channel) is a topic mismatch."""
    with_value = validate_message(TOPIC, heartbeat(value=38.6), NOW, REGISTRY)
    assert isinstance(with_value, Rejected) and with_value.reason == "schema_validation"
    wrong_channel = validate_message(
        f"vigil/v1/dev/{DEVICE}/temperature", heartbeat(), NOW, REGISTRY
    )
    assert isinstance(wrong_channel, Rejected) and wrong_channel.reason == "topic_mismatch"


def test_admission_accepts_heartbeats_dedups_them_and_records_liveness() -> None:
    """Heartbeats go through the duplicate window like readings, and the heartbeat device gets a
    last-seen record on the heartbeat channel."""
    message = (TOPIC, heartbeat(seq=7))
    result = admit([message, message], NOW, REGISTRY, RecentMessages(10), ValidationLimits())
    assert len(result.accepted) == 1
    assert result.duplicates == {"message_id": 1}
    (seen,) = result.seen
    assert (seen.device_id, seen.patient_id, seen.channel, seen.last_seq) == (
        DEVICE,
        PSEUDO_PATIENT,
        "heartbeat",
        7,
    )


class _RecordingPool:
    """Stands in for asyncpg's pool: records the statement instead of running it."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    async def fetchval(self, sql: str, *args: Any) -> int:
        self.statements.append(sql)
        return 1


async def test_storage_skips_heartbeats_and_stores_the_readings_beside_them() -> None:
    """A batch of only heartbeats writes nothing; in a mixed batch only the reading is
    written, and is_reading tells the two apart."""
    limits = ValidationLimits()
    reading = json.dumps(
        {
            "schema": "vigil.device.temperature.v1",
            "message_id": str(uuid.uuid4()),
            "device_id": "thermo-1",
            "seq": 1,
            "device_time": (NOW - timedelta(seconds=1)).isoformat(),
            "value": 37.0,
        }
    ).encode()
    batch = admit(
        [(TOPIC, heartbeat()), ("vigil/v1/dev/thermo-1/temperature", reading)],
        NOW,
        REGISTRY,
        RecentMessages(10),
        limits,
    ).accepted
    beat, temperature = batch
    assert not is_reading(beat) and is_reading(temperature)

    pool = _RecordingPool()
    assert await store_telemetry(pool, [beat]) == 0
    assert pool.statements == []

    await store_telemetry(pool, batch)
    (sql,) = pool.statements
    assert "temperature_readings" in sql
    assert "pump_status" not in sql and "pump_events" not in sql
