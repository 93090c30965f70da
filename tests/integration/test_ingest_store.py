"""Ingest's PostgreSQL writes (adapters/postgres.py ``store_telemetry``) against the stack's
database: every reading kind lands in its table with the values of its message, a batch received
at one moment and a batch of several ingest times alike; a redelivered batch adds and changes
nothing; a batch one row of which the database refuses stores none of its rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from schemas.device import TemperatureReading, parse_device_message
from schemas.events import Telemetry
from services.ingest.adapters.postgres import store_telemetry
from services.ingest.domain.times import as_device_utc

pytestmark = pytest.mark.stack

RECEIVED = datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


def _telemetry(
    device_id: str,
    seq: int,
    fields: dict[str, Any],
    *,
    ingest_time: datetime = RECEIVED,
    flags: tuple[str, ...] = (),
) -> Telemetry:
    message = parse_device_message(
        orjson.dumps(
            {
                "message_id": str(uuid.uuid4()),
                "device_id": device_id,
                "seq": seq,
                "device_time": (RECEIVED - timedelta(seconds=seq)).isoformat(),
                **fields,
            }
        )
    )
    return Telemetry(
        patient_id=f"P-{device_id}",
        device_id=device_id,
        mqtt_topic=f"vigil/v1/dev/{device_id}/x",
        ingest_time=as_device_utc(ingest_time),
        message=message,
        temperature_c=message.celsius() if isinstance(message, TemperatureReading) else None,
        flags=flags,
    )


def _batch(device_id: str, *, ingest_times: list[datetime] | None = None) -> list[Telemetry]:
    kinds: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        (
            {"schema": "vigil.device.temperature.v1", "value": 101.3, "unit": "F", "site": "oral"},
            ("device_clock_behind", "implausible_temperature"),
        ),
        ({"schema": "vigil.device.temperature.v1", "value": 36.6}, ()),
        (
            {
                "schema": "vigil.device.pump_status.v1",
                "state": "running",
                "rate_ml_h": 5.0,
                "volume_remaining_ml": 240.5,
            },
            (),
        ),
        (
            {
                "schema": "vigil.device.pump_status.v1",
                "state": "alarming",
                "rate_ml_h": 0.0,
                "volume_remaining_ml": 0.1,
                "bag_volume_ml": 250.0,
                "battery_pct": 12.5,
            },
            ("device_clock_ahead",),
        ),
        (
            {
                "schema": "vigil.device.pump_event.v1",
                "event": "alarm_raised",
                "alarm": "occlusion_downstream",
                "detail": "Okklusion unterhalb — prüfen",
            },
            (),
        ),
        ({"schema": "vigil.device.pump_event.v1", "event": "bag_changed"}, ()),
        ({"schema": "vigil.device.heartbeat.v1"}, ()),
    ]
    times = ingest_times or [RECEIVED] * len(kinds)
    return [
        _telemetry(device_id, seq, fields, ingest_time=times[seq - 1], flags=flags)
        for seq, (fields, flags) in enumerate(kinds, start=1)
    ]


async def _rows(pool: asyncpg.Pool, device_id: str) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for table in ("temperature_readings", "pump_status", "pump_events"):
        found = await pool.fetch(
            f"SELECT * FROM {table} WHERE device_id = $1 ORDER BY seq", device_id
        )
        rows[table] = [dict(r) for r in found]
    return rows


def _expected(batch: list[Telemetry]) -> dict[str, list[dict[str, Any]]]:
    """The rows each reading should make, from its message (the heartbeat makes none)."""
    rows: dict[str, list[dict[str, Any]]] = {
        "temperature_readings": [],
        "pump_status": [],
        "pump_events": [],
    }
    for t in batch:
        m: Any = t.message
        common = {
            "device_time": m.device_time,
            "ingest_time": t.ingest_time,
            "patient_id": t.patient_id,
            "device_id": t.device_id,
            "message_id": m.message_id,
            "seq": m.seq,
            "flags": list(t.flags),
        }
        schema = m.schema_
        if schema.endswith("temperature.v1"):
            own = {
                "value_c": t.temperature_c,
                "original_value": m.value,
                "original_unit": m.unit.value,
                "site": m.site.value,
            }
            rows["temperature_readings"].append(common | own)
        elif schema.endswith("pump_status.v1"):
            own = {
                "state": m.state.value,
                "rate_ml_h": m.rate_ml_h,
                "volume_remaining_ml": m.volume_remaining_ml,
                "bag_volume_ml": m.bag_volume_ml,
                "battery_pct": m.battery_pct,
            }
            rows["pump_status"].append(common | own)
        elif schema.endswith("pump_event.v1"):
            own = {
                "event": m.event.value,
                "alarm": m.alarm.value if m.alarm else None,
                "detail": m.detail,
            }
            rows["pump_events"].append(common | own)
    return rows


def _comparable(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Rows without the columns the database fills itself, and with every value's type kept
    (an enum member would compare equal to its text)."""
    return {
        table: [
            {k: (type(v).__name__, v) for k, v in row.items() if k not in ("stored_at", "id")}
            for row in found
        ]
        for table, found in rows.items()
    }


async def test_every_kind_is_stored_with_its_values_and_a_redelivery_changes_nothing(
    pool: asyncpg.Pool,
) -> None:
    device = f"store-{uuid.uuid4().hex[:12]}"
    batch = _batch(device)
    assert await store_telemetry(pool, batch) == 6  # the heartbeat is not a reading
    stored = await _rows(pool, device)
    assert _comparable(stored) == _comparable(_expected(batch))
    assert stored["temperature_readings"][0]["original_unit"] == "F"
    assert await store_telemetry(pool, batch) == 0
    assert await _rows(pool, device) == stored


async def test_a_batch_of_several_ingest_times_keeps_each_one(pool: asyncpg.Pool) -> None:
    device = f"store-{uuid.uuid4().hex[:12]}"
    times = [RECEIVED + timedelta(milliseconds=250 * i) for i in range(7)]
    batch = _batch(device, ingest_times=times)
    assert await store_telemetry(pool, batch) == 6
    stored = await _rows(pool, device)
    assert _comparable(stored) == _comparable(_expected(batch))
    ingest_times = {row["seq"]: row["ingest_time"] for rows in stored.values() for row in rows}
    assert ingest_times == {seq: times[seq - 1] for seq in range(1, 7)}
    # Half of it again, with the rest new: only the new ones count.
    again = batch[:3] + _batch(device + "-b", ingest_times=times)
    assert await store_telemetry(pool, again) == 6


async def test_a_row_the_database_refuses_stores_nothing_of_its_batch(pool: asyncpg.Pool) -> None:
    """One statement: a detail PostgreSQL cannot hold (a NUL character) fails the batch, and
    the temperatures and statuses before it in the same batch are not stored either."""
    device = f"store-{uuid.uuid4().hex[:12]}"
    batch = _batch(device)
    refused = _telemetry(
        device,
        9,
        {"schema": "vigil.device.pump_event.v1", "event": "bag_changed", "detail": "a\x00b"},
    )
    with pytest.raises(asyncpg.PostgresError):
        await store_telemetry(pool, [*batch, refused])
    assert await _rows(pool, device) == {
        "temperature_readings": [],
        "pump_status": [],
        "pump_events": [],
    }
