"""Ingest's Kafka encoder writes exactly the bytes pydantic's serializer writes (the contract's
JSON, ``vigil.kafka.encode``) for every Telemetry and DeadLetter: generated events of every
message kind, with flags, None fields, non-ASCII and control characters, float edge values,
times with and without fractions in several offsets, and the values it hands to pydantic."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.device import (
    AnyDeviceMessage,
    HeartbeatMessage,
    PumpAlarmCode,
    PumpEvent,
    PumpEventKind,
    PumpState,
    PumpStatus,
    TemperatureReading,
    TemperatureSite,
    TemperatureUnit,
    device_message_adapter,
    parse_device_message,
)
from schemas.events import DeadLetter, Telemetry
from services.ingest.adapters import kafka_batches
from services.ingest.adapters.kafka_batches import encode
from services.ingest.domain.times import as_device_utc
from services.ingest.domain.validation import Flag
from vigil.kafka import encode as contract_encode

EDGE_FLOATS = [1e16, 0.1, -0.0, 0.0, 36.6, 1e-7, 5e-324, 1.7976931348623157e308, 1e15, 123.456]


def _pydantic(event: Telemetry | DeadLetter) -> bytes:
    return event.__pydantic_serializer__.to_json(event, by_alias=True)


def _same_as_pydantic(event: Telemetry | DeadLetter) -> None:
    expected = _pydantic(event)
    assert encode(event) == expected
    assert contract_encode(event) == expected


_offsets = st.sampled_from([0, 60, 3600, 7200, -18000, 19800, -34200, 50400, -43200])
_moments = st.builds(
    lambda base, micro, offset: (base + timedelta(microseconds=micro)).astimezone(
        timezone(timedelta(seconds=offset))
    ),
    st.integers(
        int(datetime(2000, 1, 2, tzinfo=UTC).timestamp()),
        int(datetime(2099, 12, 30, tzinfo=UTC).timestamp()),
    ).map(lambda seconds: datetime.fromtimestamp(seconds, UTC)),
    st.sampled_from([0, 0, 1, 120_000, 123_456, 999_999, 500_000]),
    _offsets,
)


@st.composite
def _device_time(draw: st.DrawFn) -> Any:
    """An aware time as a device sends it (pydantic's TzInfo after parsing) or as Python made
    it (the standard library's UTC or a fixed offset)."""
    moment: datetime = draw(_moments)
    how = draw(st.sampled_from(["text", "text_z", "python"]))
    if how == "python":
        return moment
    if how == "text_z" and moment.utcoffset() == timedelta(0):
        return moment.isoformat().replace("+00:00", "Z")
    return moment.isoformat()


_text = st.text(max_size=40)  # any code point but lone surrogates: non-ASCII, controls, quotes
_finite = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(EDGE_FLOATS)


def _bounded(low: float, high: float) -> st.SearchStrategy[float]:
    edges = [e for e in EDGE_FLOATS if low <= e <= high]
    return st.floats(min_value=low, max_value=high) | st.sampled_from(edges)


_device_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,20}\Z")


@st.composite
def _message(draw: st.DrawFn) -> AnyDeviceMessage:
    kind = draw(st.sampled_from(["temperature", "pump_status", "pump_event", "heartbeat"]))
    common: dict[str, Any] = {
        "message_id": str(draw(st.uuids())),
        "device_id": draw(_device_ids),
        "seq": draw(st.integers(0, 2**63 - 1) | st.sampled_from([0, 1, 2**63 - 1])),
        "device_time": draw(_device_time()),
        "schema": f"vigil.device.{kind}.v1",
    }
    if kind == "temperature":
        common["value"] = draw(_finite)
        if draw(st.booleans()):
            common["unit"] = draw(st.sampled_from(TemperatureUnit)).value
        if draw(st.booleans()):
            common["site"] = draw(st.sampled_from(TemperatureSite)).value
    elif kind == "pump_status":
        common["state"] = draw(st.sampled_from(PumpState)).value
        common["rate_ml_h"] = draw(_bounded(0, 1000))
        common["volume_remaining_ml"] = draw(_bounded(0, 5000))
        common["bag_volume_ml"] = draw(st.none() | _bounded(0, 5000))
        common["battery_pct"] = draw(st.none() | _bounded(0, 100))
    elif kind == "pump_event":
        event = draw(st.sampled_from(PumpEventKind))
        common["event"] = event.value
        alarm_needed = event in (PumpEventKind.ALARM_RAISED, PumpEventKind.ALARM_CLEARED)
        alarms = st.sampled_from(PumpAlarmCode).map(lambda a: a.value)
        common["alarm"] = draw(alarms if alarm_needed else st.none() | alarms)
        common["detail"] = draw(st.none() | st.text(max_size=80))
    if isinstance(common["device_time"], str) and draw(st.booleans()):
        return parse_device_message(orjson.dumps(common))  # as ingest parses a payload
    # Otherwise validated from Python objects (the message id as a UUID, the time as made).
    common["message_id"] = uuid.UUID(common["message_id"])
    return device_message_adapter().validate_python(common)


@st.composite
def _telemetry(draw: st.DrawFn) -> Telemetry:
    message = draw(_message())
    ingest_time: datetime = draw(_moments)
    if draw(st.booleans()):
        ingest_time = as_device_utc(ingest_time)  # what ingest writes
    temperature_c: float | None = None
    if isinstance(message, TemperatureReading) and draw(st.booleans()):
        temperature_c = message.celsius()
    elif draw(st.booleans()):
        temperature_c = draw(_finite | st.sampled_from([math.inf, -math.inf, math.nan]))
    flags = draw(
        st.lists(st.sampled_from([f.value for f in Flag]) | _text, max_size=3, unique=True)
    )
    return Telemetry(
        patient_id=draw(_text),
        device_id=message.device_id,
        mqtt_topic=draw(_text),
        ingest_time=ingest_time,
        message=message,
        temperature_c=temperature_c,
        flags=tuple(flags),
    )


@st.composite
def _dead_letter(draw: st.DrawFn) -> DeadLetter:
    received_at: datetime = draw(_moments)
    if draw(st.booleans()):
        received_at = as_device_utc(received_at)
    return DeadLetter.for_payload(
        reason=draw(_text),
        detail=draw(_text),
        service=draw(_text),
        source_topic=draw(_text),
        received_at=received_at,
        payload=draw(st.binary(max_size=300)),
        device_id=draw(st.none() | _text),
    )


_many = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_many
@given(_telemetry())
def test_telemetry_bytes_equal_pydantic(telemetry: Telemetry) -> None:
    _same_as_pydantic(telemetry)


@_many
@given(_dead_letter())
def test_dead_letter_bytes_equal_pydantic(dead: DeadLetter) -> None:
    _same_as_pydantic(dead)


def _temperature(value: float, device_time: str) -> TemperatureReading:
    message = parse_device_message(
        '{"schema":"vigil.device.temperature.v1","message_id":"'
        + str(uuid.uuid4())
        + f'","device_id":"dev-1","seq":7,"device_time":"{device_time}","value":{value!r}}}'
    )
    assert isinstance(message, TemperatureReading)
    return message


@pytest.mark.parametrize("value", [*EDGE_FLOATS, -1e16, 2.5e-5, 37, -40.0])
@pytest.mark.parametrize(
    "device_time",
    [
        "2026-12-07T12:00:00Z",
        "2026-12-07T12:00:00.000001Z",
        "2026-12-07T12:00:00.123+02:00",
        "2026-12-07T12:00:00.123456-05:30",
        "2026-12-07T12:00:00+00:00",
    ],
)
def test_edge_values_and_times(value: float, device_time: str) -> None:
    message = _temperature(value, device_time)
    for flags in [(), (Flag.IMPLAUSIBLE_TEMPERATURE.value,), ("ünïcødé", '\u0000\u2028"\\')]:
        telemetry = Telemetry(
            patient_id="P-ß",
            device_id="dev-1",
            mqtt_topic="vigil/v1/dev/dev-1/temperature",
            ingest_time=as_device_utc(datetime(2026, 12, 7, 12, 0, 1, tzinfo=UTC)),
            message=message,
            temperature_c=None if flags else message.celsius(),
            flags=flags,
        )
        _same_as_pydantic(telemetry)


def test_every_kind_goes_through_the_fast_writer() -> None:
    """Each device message kind, Telemetry and DeadLetter are written by orjson (a change to a
    model that it cannot reproduce would send everything through pydantic, unnoticed)."""
    assert set(kafka_batches._MESSAGE_FIELDS) == {
        TemperatureReading,
        PumpStatus,
        PumpEvent,
        HeartbeatMessage,
    }
    assert set(kafka_batches._EVENT_FIELDS) == {Telemetry, DeadLetter}


def test_what_orjson_would_write_differently_goes_through_pydantic() -> None:
    """An int in a float field (pydantic writes ``37.0``), a lone surrogate (orjson refuses it):
    the same bytes as pydantic's serializer, or the same error."""
    message = _temperature(36.6, "2026-12-07T12:00:00Z")
    ingest_time = as_device_utc(datetime(2026, 12, 7, 12, 0, 1, tzinfo=UTC))
    as_int = Telemetry.model_construct(
        patient_id="P-1",
        device_id="dev-1",
        mqtt_topic="t",
        ingest_time=ingest_time,
        message=message.model_copy(update={"value": 37}),
        temperature_c=37,
        flags=(),
    )
    assert b'"temperature_c":37.0' in encode(as_int)
    _same_as_pydantic(as_int)
    surrogate = Telemetry.model_construct(
        patient_id="P-\ud800",
        device_id="dev-1",
        mqtt_topic="t",
        ingest_time=ingest_time,
        message=message,
        temperature_c=36.6,
        flags=(),
    )
    try:
        expected = _pydantic(surrogate)
    except Exception as error:
        with pytest.raises(type(error)):
            encode(surrogate)
    else:
        assert encode(surrogate) == expected
