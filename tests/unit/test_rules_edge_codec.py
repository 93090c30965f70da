"""The fast edge decoder (msgspec + positional builders) against the validated reference path.

``decode_observation`` reads Kafka telemetry records without pydantic; ``reference_observation``
validates the full contract and converts with ``observe``. These tests hold the two equal, field
by field (value, type, and the UTC offset of every time), for every device message the contract
documents and for the edges: °F readings, non-UTC offsets, missing optional fields, integers
where floats are expected, the heartbeat, the clock-skew flag; and they check that the fast path
is really taken for what ingest writes, and that broken records still raise for the dead letter.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.events import Telemetry
from services.rules.adapters import codec
from services.rules.adapters.codec import decode_observation, reference_observation
from services.rules.domain import observation as obs_module
from services.rules.domain.observation import (
    HEARTBEAT,
    PUMP_EVENT,
    PUMP_STATUS,
    TEMPERATURE,
    Observation,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
INGEST_TIME = datetime(2025, 3, 1, 2, 12, 1, 500000, tzinfo=UTC)


def fields(obs: Observation) -> dict[str, Any]:
    """Every slot, with its type, and each time's UTC offset (equal datetimes can differ in
    offset, and an alert reproduces the offset)."""
    out: dict[str, Any] = {}
    for name in Observation.__slots__:
        value = getattr(obs, name)
        out[name] = (value, type(value))
        if isinstance(value, datetime):
            out[name + ".utcoffset"] = value.utcoffset()
    return out


def envelope(message: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A telemetry record as ingest writes it (validated, serialised by the model)."""
    device_id = message["device_id"]
    event = Telemetry.model_validate(
        {
            "patient_id": "P-edge",
            "device_id": device_id,
            "mqtt_topic": f"vigil/v1/dev/{device_id}/x",
            "ingest_time": INGEST_TIME,
            "message": message,
            **extra,
        }
    )
    data: dict[str, Any] = json.loads(event.model_dump_json(by_alias=True))
    return data


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return data


@pytest.fixture
def fast_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fallback fail loudly, so a test proves the fast path decided."""

    def refuse(payload: bytes) -> Observation:
        raise AssertionError(f"fell back to the model for {payload!r}")

    monkeypatch.setattr(codec, "reference_observation", refuse)


def both(data: dict[str, Any]) -> tuple[Observation, Observation]:
    payload = json.dumps(data).encode()
    return decode_observation(payload), reference_observation(payload)


EXAMPLE_CHANNELS = {
    "temperature.v1.example.json": TEMPERATURE,
    "pump-status.v1.example.json": PUMP_STATUS,
    "pump-event.v1.example.json": PUMP_EVENT,
    "heartbeat.v1.example.json": HEARTBEAT,
}


def test_every_documented_message_type_is_covered() -> None:
    """The examples folder holds exactly the message types this test walks through, so a new
    message type cannot slip past the equality test below."""
    assert {p.name for p in EXAMPLES.glob("*.json")} == set(EXAMPLE_CHANNELS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_CHANNELS))
def test_fast_path_equals_reference_for_every_example(name: str, fast_only: None) -> None:
    """Each documented message, as ingest puts it on Kafka, decodes on the fast path to the
    Observation the validated model gives (the fallback is disabled here)."""
    message = example(name)
    temperature_c = 38.6 if EXAMPLE_CHANNELS[name] == TEMPERATURE else None
    data = envelope(message, temperature_c=temperature_c)
    fast = decode_observation(json.dumps(data).encode())
    assert fast.channel == EXAMPLE_CHANNELS[name]
    assert fields(fast) == fields(observe_reference(data))


def observe_reference(data: dict[str, Any]) -> Observation:
    return reference_observation(json.dumps(data).encode())


def test_fahrenheit_reading_with_normalised_value(fast_only: None) -> None:
    """A °F reading that ingest normalised: the normalised °C value, on the fast path."""
    message = {**example("temperature.v1.example.json"), "value": 101.3, "unit": "F"}
    data = envelope(message, temperature_c=38.5)
    fast = decode_observation(json.dumps(data).encode())
    assert fast.temperature_c == 38.5
    assert fields(fast) == fields(observe_reference(data))


@pytest.mark.parametrize("value", [101.3, 98.6, 104.0, 100])
def test_fahrenheit_reading_without_normalised_value(value: float, fast_only: None) -> None:
    """A °F reading with no ``temperature_c`` is converted exactly as the model rounds it."""
    message = {**example("temperature.v1.example.json"), "value": value, "unit": "F"}
    data = envelope(message)
    data["temperature_c"] = None
    fast, reference = both(data)
    assert fields(fast) == fields(reference)
    assert fast.temperature_c == round((value - 32.0) * 5.0 / 9.0, 2)


@pytest.mark.parametrize(
    "device_time",
    [
        "2025-03-01T03:12:05.250+01:00",
        "2025-03-01T07:42:05+05:30",
        "2025-02-28T18:12:05.000001-08:00",
        "2025-03-01T02:12:05Z",
        "2025-03-01T02:12:05+00:00",
    ],
)
def test_offsets_other_than_utc_keep_their_offset(device_time: str, fast_only: None) -> None:
    """Device times with any UTC offset give the same instant and the same offset both ways
    (an alert's device time reproduces the device's own offset)."""
    message = {**example("pump-status.v1.example.json"), "device_time": device_time}
    data = envelope(message)
    data["message"]["device_time"] = device_time  # exactly as the device wrote it
    fast, reference = both(data)
    assert fields(fast) == fields(reference)
    assert fast.device_time.utcoffset() == datetime.fromisoformat(device_time).utcoffset()


def test_missing_optional_fields(fast_only: None) -> None:
    """Records without the optional fields (bag volume, battery, site, unit, alarm, flags)
    decode on the fast path to the model's defaults."""
    status = example("pump-status.v1.example.json")
    del status["bag_volume_ml"], status["battery_pct"]
    reading = example("temperature.v1.example.json")
    del reading["site"], reading["unit"]
    pump_event = example("pump-event.v1.example.json")
    pump_event = {**pump_event, "event": "infusion_started"}
    del pump_event["alarm"], pump_event["detail"]
    for message, extra in ((status, {}), (reading, {"temperature_c": 38.6}), (pump_event, {})):
        data = envelope(message, **extra)
        for key in ("bag_volume_ml", "battery_pct", "site", "unit", "alarm", "detail"):
            data["message"].pop(key, None)
        del data["flags"]
        fast = decode_observation(json.dumps(data).encode())
        assert fields(fast) == fields(observe_reference(data))
    assert decode_observation(json.dumps(envelope(status)).encode()).bag_volume_ml is None


def test_integers_where_the_contract_has_floats(fast_only: None) -> None:
    """JSON integers in float fields become floats, as the model makes them."""
    message = {
        **example("pump-status.v1.example.json"),
        "rate_ml_h": 10,
        "volume_remaining_ml": 143,
        "bag_volume_ml": 240,
        "battery_pct": 81,
    }
    data = envelope(message, temperature_c=None)
    for key in ("rate_ml_h", "volume_remaining_ml", "bag_volume_ml", "battery_pct"):
        data["message"][key] = int(data["message"][key])
    fast = decode_observation(json.dumps(data).encode())
    assert fields(fast) == fields(observe_reference(data))
    assert type(fast.rate_ml_h) is float and type(fast.bag_volume_ml) is float


def test_clock_skew_flag_and_heartbeat(fast_only: None) -> None:
    """The skew flag survives the fast path; a heartbeat is its own channel with no values."""
    beat = envelope(example("heartbeat.v1.example.json"), flags=["device_clock_skew"])
    fast = decode_observation(json.dumps(beat).encode())
    assert fast.channel == HEARTBEAT and fast.clock_skew
    assert fields(fast) == fields(observe_reference(beat))


def test_records_the_fast_path_cannot_read_still_decide_by_the_model() -> None:
    """A naive time and an unknown message schema are refused by the model exactly as before
    (``ValidationError``, the dead-letter path); a bool where a number belongs, which the fast
    path does not take, gets whatever the model decides (it reads true as 1.0)."""
    good = envelope(example("temperature.v1.example.json"), temperature_c=38.6)
    naive = json.loads(json.dumps(good))
    naive["message"]["device_time"] = "2025-03-01T02:12:05"
    unknown = json.loads(json.dumps(good))
    unknown["message"]["schema"] = "vigil.device.glucose.v1"
    boolean = json.loads(json.dumps(good))
    boolean["message"]["value"] = True
    boolean["temperature_c"] = None
    for data in (naive, unknown):
        payload = json.dumps(data).encode()
        with pytest.raises(ValidationError):
            reference_observation(payload)
        with pytest.raises(ValidationError):
            decode_observation(payload)
    fast, reference = both(boolean)
    assert fields(fast) == fields(reference)


def test_positional_builders_equal_the_keyword_constructor() -> None:
    """The builders the decoders use fill every slot as the keyword constructor does."""
    at = datetime(2025, 3, 1, 3, 12, tzinfo=timezone(timedelta(hours=1)))
    ingest = at + timedelta(seconds=1)
    common: dict[str, Any] = {
        "patient_id": "P-1",
        "device_id": "d-1",
        "device_time": at,
        "ingest_time": ingest,
        "message_id": "m-1",
        "clock_skew": True,
    }
    pairs = [
        (
            obs_module.temperature("P-1", "d-1", at, ingest, "m-1", True, 38.4, "oral"),
            Observation(channel=TEMPERATURE, temperature_c=38.4, site="oral", **common),
        ),
        (
            obs_module.pump_status(
                "P-1", "d-1", at, ingest, "m-1", True, "paused", 10.0, 120.0, 240.0, None
            ),
            Observation(
                channel=PUMP_STATUS,
                pump_state="paused",
                rate_ml_h=10.0,
                volume_remaining_ml=120.0,
                bag_volume_ml=240.0,
                **common,
            ),
        ),
        (
            obs_module.pump_event(
                "P-1", "d-1", at, ingest, "m-1", True, "alarm_raised", "door_open"
            ),
            Observation(channel=PUMP_EVENT, event="alarm_raised", alarm="door_open", **common),
        ),
        (
            obs_module.heartbeat("P-1", "d-1", at, ingest, "m-1", True),
            Observation(channel=HEARTBEAT, **common),
        ),
    ]
    for built, keyword in pairs:
        assert fields(built) == fields(keyword)
