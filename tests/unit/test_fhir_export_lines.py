"""Bulk export writes pump statuses with ``fhir.pump_status_lines``, which fills the values of
each row into the serialised constant parts of the mapping instead of building dicts. Its lines
must be byte for byte those of ``orjson.dumps(fhir.pump_status_observation(row))``."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from services.api.domain import fhir


def course_sample(count: int) -> list[dict[str, Any]]:
    """Pump statuses as a course has them and the awkward ones: every optional value missing
    or present, whole and fractional numbers, flags, text needing JSON escapes, microseconds
    and offsets other than UTC; ids as UUIDs and as text."""
    chance = random.Random(7)
    start = datetime(2026, 11, 9, tzinfo=UTC)
    rows = []
    for i in range(count):
        rows.append(
            {
                "device_time": start + timedelta(seconds=61.123457 * i),
                "ingest_time": (start + timedelta(seconds=60 * i + 1)).astimezone(
                    chance.choice([UTC, timezone(timedelta(hours=5, minutes=30))])
                ),
                "patient_id": chance.choice(["P-1", 'P-"2\\', "P-é"]),
                "device_id": chance.choice(["pump-1", "pump-ü\n"]),
                # As the export reads them: the id as text, no flags as None.
                "message_id": chance.choice([uuid.UUID, str])(
                    str(uuid.UUID(int=chance.getrandbits(128)))
                ),
                "flags": chance.choice([None, [], [], ["device_clock_ahead"], ["duplicate_seq"]]),
                "state": chance.choice(["running", "paused", "alarm", 'odd "state"']),
                "rate_ml_h": chance.choice([10, 10.0, 0.1 + 0.2, 1e17, -0.0, 5.5]),
                "volume_remaining_ml": chance.random() * 240,
                "bag_volume_ml": chance.choice([None, 240.0, 250]),
                "battery_pct": chance.choice([None, 90, 33.3]),
            }
        )
    return rows


def test_pump_status_lines_are_the_mapping_byte_for_byte() -> None:
    rows = course_sample(2000)
    count, lines = fhir.pump_status_lines(rows)
    expected = [
        orjson.dumps(fhir.pump_status_observation(row), option=orjson.OPT_APPEND_NEWLINE)
        for row in rows
    ]
    assert count == len(rows) == len(lines.splitlines(keepends=True))
    assert lines.splitlines(keepends=True) == expected
    # The sample really holds the cases: flagged rows, rows without the optional values.
    assert any(row["flags"] for row in rows) and any(not row["flags"] for row in rows)
    assert any(row["battery_pct"] is None for row in rows)
    assert any(row["bag_volume_ml"] is None for row in rows)


def test_no_pump_statuses_is_an_empty_file() -> None:
    assert fhir.pump_status_lines([]) == (0, b"")
