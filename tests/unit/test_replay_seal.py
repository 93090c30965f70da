"""Sealed archive days, the pure parts: the order key, the UTC day of a row, the seal horizon,
a day's body and the merge of several days' bodies."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from services.rules.domain.observation import ArchivedObservation
from vigil_tools.replay.engine_port import decode_sealed_day
from vigil_tools.replay.seal import seal_horizon, split_days
from vigil_tools.replay.sources import _merge_sealed, day_of, day_start, encode_day, order_key


def row(t: float, it: float, device: str, n: int = 0) -> tuple[Any, ...]:
    """An archive row in ``ArchivedObservation``'s field order (a temperature)."""
    return (0, "p", device, t, it, f"m-{n}", False, 37.0, "axillary") + (None,) * 7


def test_the_order_key_orders_as_time_ingest_time_and_device_do() -> None:
    rng = random.Random(7)
    times = [0.0, 1.5e-6, -1.0, -1e9, 1.7e9, 1.7e9 + 1e-6, 2**40 + 0.5, 86_400.0]
    devices = ["a", "b", "ab", "é", "z", "Z", "th-1", "th-10", "th-2"]
    events = [
        ArchivedObservation(*row(rng.choice(times), rng.choice(times), rng.choice(devices)))
        for _ in range(2000)
    ]
    by_key = sorted(events, key=order_key)
    by_fields = sorted(events, key=lambda e: (e.t, e.ingest_t, e.device_id.encode()))
    assert [(e.t, e.ingest_t, e.device_id) for e in by_key] == [
        (e.t, e.ingest_t, e.device_id) for e in by_fields
    ]
    # Python compares str by code point, which is the UTF-8 bytes' order (PostgreSQL's "C").
    assert sorted(devices) == sorted(devices, key=str.encode)


def test_a_row_belongs_to_the_utc_day_of_its_device_time() -> None:
    midnight = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
    assert day_of(midnight) == date(2026, 3, 2)
    assert day_of(midnight - 1e-6) == date(2026, 3, 1)
    assert day_of(midnight + 86_400 - 1e-6) == date(2026, 3, 2)
    assert day_of(-1e-6) == date(1969, 12, 31)
    assert day_start(date(2026, 3, 2)).timestamp() == midnight


def test_the_horizon_is_the_start_of_the_utc_day_a_lag_ago() -> None:
    now = datetime(2026, 3, 5, 1, 30, tzinfo=timezone(timedelta(hours=2)))  # 23:30 UTC on 4 March
    assert seal_horizon(now, timedelta(hours=24)) == datetime(2026, 3, 3, tzinfo=UTC)
    assert seal_horizon(now, timedelta(0)) == datetime(2026, 3, 4, tzinfo=UTC)
    with pytest.raises(ValueError):
        seal_horizon(datetime(2026, 3, 5), timedelta(0))  # noqa: DTZ001 - the naive case


def test_rows_split_by_day_and_a_body_holds_them_in_order() -> None:
    midnight = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
    rows = [row(midnight - 1.0, midnight, "a", 1), row(midnight, midnight, "a", 2)]
    rows.append(row(midnight + 5.0, midnight + 6.0, "b", 3))
    days = split_days(rows)
    assert {day: [r[5] for r in group] for day, group in days.items()} == {
        date(2026, 3, 1): ["m-1"],
        date(2026, 3, 2): ["m-2", "m-3"],
    }
    keys, events = decode_sealed_day(encode_day(days[date(2026, 3, 2)]))
    assert events == [ArchivedObservation(*r) for r in days[date(2026, 3, 2)]]
    assert keys == [order_key(e) for e in events]


def test_merged_days_keep_each_body_s_order_among_rows_that_tie() -> None:
    """Two bodies of one day (two patients): merged on time, ingest time and device; rows of
    one body that tie on all three (one device's two messages stamped alike) stay in the
    body's order, which the server chose by sequence number and message id."""
    one = [row(10.0, 12.0, "th-b", 1), row(10.0, 12.0, "th-b", 0), row(20.0, 21.0, "th-b", 2)]
    two = [row(10.0, 12.0, "th-a", 3), row(15.0, 16.0, "th-a", 4)]
    keys: list[bytes] = []
    events: list[ArchivedObservation] = []
    for body in (encode_day(one), encode_day(two)):
        body_keys, body_events = decode_sealed_day(body)
        keys += body_keys
        events += body_events
    merged = _merge_sealed(keys, events)
    assert [e.message_id for e in merged] == ["m-3", "m-1", "m-0", "m-4", "m-2"]
