"""PostgreSQL adapter of ingest: loads the device registry and writes readings in batches.

Writes are ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING``: one round trip per table
per batch, and a redelivered message hits the unique key instead of making a second row.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from schemas.device import PumpEvent, PumpStatus, TemperatureReading
from schemas.events import Telemetry
from services.ingest.domain.registry import Binding, BindingIndex


async def load_bindings(pool: asyncpg.Pool) -> BindingIndex:
    rows = await pool.fetch(
        "SELECT device_id, patient_id, valid_from, valid_to FROM device_bindings"
    )
    return BindingIndex(
        Binding(r["device_id"], r["patient_id"], r["valid_from"], r["valid_to"]) for r in rows
    )


_INSERT_TEMPERATURE = """
INSERT INTO temperature_readings
    (device_time, ingest_time, patient_id, device_id, message_id, seq,
     value_c, original_value, original_unit, site, flags)
SELECT t.device_time, t.ingest_time, t.patient_id, t.device_id, t.message_id, t.seq,
       t.value_c, t.original_value, t.original_unit, t.site, string_to_array(t.flags, ',')
FROM unnest($1::timestamptz[], $2::timestamptz[], $3::text[], $4::text[], $5::uuid[], $6::bigint[],
            $7::float8[], $8::float8[], $9::text[], $10::text[], $11::text[])
    AS t(device_time, ingest_time, patient_id, device_id, message_id, seq,
         value_c, original_value, original_unit, site, flags)
ON CONFLICT DO NOTHING
"""

_INSERT_PUMP_STATUS = """
INSERT INTO pump_status
    (device_time, ingest_time, patient_id, device_id, message_id, seq,
     state, rate_ml_h, volume_remaining_ml, bag_volume_ml, battery_pct, flags)
SELECT t.device_time, t.ingest_time, t.patient_id, t.device_id, t.message_id, t.seq,
       t.state, t.rate_ml_h, t.volume_remaining_ml, t.bag_volume_ml, t.battery_pct,
       string_to_array(t.flags, ',')
FROM unnest($1::timestamptz[], $2::timestamptz[], $3::text[], $4::text[], $5::uuid[], $6::bigint[],
            $7::text[], $8::float8[], $9::float8[], $10::float8[], $11::float8[], $12::text[])
    AS t(device_time, ingest_time, patient_id, device_id, message_id, seq,
         state, rate_ml_h, volume_remaining_ml, bag_volume_ml, battery_pct, flags)
ON CONFLICT DO NOTHING
"""

_INSERT_PUMP_EVENT = """
INSERT INTO pump_events
    (device_time, ingest_time, patient_id, device_id, message_id, seq, event, alarm, detail, flags)
SELECT t.device_time, t.ingest_time, t.patient_id, t.device_id, t.message_id, t.seq,
       t.event, t.alarm, t.detail, string_to_array(t.flags, ',')
FROM unnest($1::timestamptz[], $2::timestamptz[], $3::text[], $4::text[], $5::uuid[], $6::bigint[],
            $7::text[], $8::text[], $9::text[], $10::text[])
    AS t(device_time, ingest_time, patient_id, device_id, message_id, seq,
         event, alarm, detail, flags)
ON CONFLICT DO NOTHING
"""


def _common(t: Telemetry) -> tuple[object, ...]:
    m = t.message
    return (m.device_time, t.ingest_time, t.patient_id, t.device_id, m.message_id, m.seq)


def _columns(rows: list[tuple[object, ...]]) -> list[list[object]]:
    return [list(column) for column in zip(*rows, strict=True)]


async def store_telemetry(pool: asyncpg.Pool, batch: Sequence[Telemetry]) -> None:
    """Write a batch of accepted telemetry, each kind to its table, in one transaction."""
    temperatures: list[tuple[object, ...]] = []
    statuses: list[tuple[object, ...]] = []
    events: list[tuple[object, ...]] = []
    for t in batch:
        flags = ",".join(t.flags)
        m = t.message
        if isinstance(m, TemperatureReading):
            value_c = t.temperature_c if t.temperature_c is not None else m.celsius()
            temperatures.append((*_common(t), value_c, m.value, m.unit.value, m.site.value, flags))
        elif isinstance(m, PumpStatus):
            statuses.append(
                (
                    *_common(t),
                    m.state.value,
                    m.rate_ml_h,
                    m.volume_remaining_ml,
                    m.bag_volume_ml,
                    m.battery_pct,
                    flags,
                )
            )
        elif isinstance(m, PumpEvent):
            events.append(
                (*_common(t), m.event.value, m.alarm.value if m.alarm else None, m.detail, flags)
            )
    async with pool.acquire() as conn, conn.transaction():
        if temperatures:
            await conn.execute(_INSERT_TEMPERATURE, *_columns(temperatures))
        if statuses:
            await conn.execute(_INSERT_PUMP_STATUS, *_columns(statuses))
        if events:
            await conn.execute(_INSERT_PUMP_EVENT, *_columns(events))
