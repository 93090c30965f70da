"""Ingest validation: every message is accepted with a patient, or rejected with a reason."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.validation import Accepted, Rejected, validate_message

NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
REGISTRY = BindingIndex(
    [
        Binding("thermo-1", "P-0001", NOW - timedelta(days=10), None),
        # A pump swapped at bag change: two patients over time, one device.
        Binding("pump-7", "P-0001", NOW - timedelta(days=10), NOW - timedelta(days=2)),
        Binding("pump-7", "P-0002", NOW - timedelta(days=2), None),
    ]
)
TOPIC = "vigil/v1/dev/thermo-1/temperature"


def temperature(**overrides: object) -> dict[str, object]:
    payload: dict[str, object] = {
        "schema": "vigil.device.temperature.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": "thermo-1",
        "seq": 10,
        "device_time": (NOW - timedelta(seconds=2)).isoformat(),
        "value": 38.4,
        "unit": "C",
        "site": "axillary",
    }
    payload.update(overrides)
    return payload


def check(payload: object, topic: str = TOPIC) -> Accepted | Rejected:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return validate_message(topic, raw, NOW, REGISTRY)


def test_valid_reading_is_accepted_with_patient_and_both_times() -> None:
    """A good reading is bound to its patient and keeps device time and ingest time."""
    outcome = check(temperature())
    assert isinstance(outcome, Accepted)
    t = outcome.telemetry
    assert t.patient_id == "P-0001"
    assert t.temperature_c == 38.4
    assert t.ingest_time == NOW
    assert t.device_time == NOW - timedelta(seconds=2)
    assert t.flags == ()


def test_fahrenheit_is_normalised_and_the_original_kept() -> None:
    """101.3 °F becomes 38.5 °C for the rules; the message keeps 101.3 F."""
    outcome = check(temperature(value=101.3, unit="F"))
    assert isinstance(outcome, Accepted)
    assert outcome.telemetry.temperature_c == pytest.approx(38.5, abs=0.01)
    assert outcome.telemetry.message.value == 101.3  # type: ignore[union-attr]


def test_binding_follows_device_time_not_arrival() -> None:
    """A pump reading from before a swap belongs to the previous patient."""
    payload = {
        "schema": "vigil.device.pump_event.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": "pump-7",
        "seq": 3,
        "device_time": (NOW - timedelta(days=3)).isoformat(),
        "event": "alarm_raised",
        "alarm": "occlusion_downstream",
    }
    before = check(payload, "vigil/v1/dev/pump-7/pump-event")
    after = check({**payload, "device_time": NOW.isoformat()}, "vigil/v1/dev/pump-7/pump-event")
    assert isinstance(before, Accepted) and before.telemetry.patient_id == "P-0001"
    assert isinstance(after, Accepted) and after.telemetry.patient_id == "P-0002"


@pytest.mark.parametrize(
    ("payload", "topic", "reason"),
    [
        (b"{not json", TOPIC, "invalid_json"),
        (b"[1, 2]", TOPIC, "invalid_json"),
        (b"\xff\xfe\x00", TOPIC, "invalid_json"),
        (temperature(schema="vigil.device.temperature.v9"), TOPIC, "unknown_schema"),
        (temperature(), "vigil/v1/dev/thermo-1/pump-status", "topic_mismatch"),
        (temperature(), "vigil/v1/dev/thermo-1/blood-pressure", "unknown_channel"),
        (temperature(), "somewhere/else", "unknown_channel"),
        (temperature(device_id="thermo-2"), TOPIC, "device_id_mismatch"),
        (temperature(device_id="thermo-9"), "vigil/v1/dev/thermo-9/temperature", "unknown_device"),
        (temperature(device_time=(NOW - timedelta(days=30)).isoformat()), TOPIC, "no_binding"),
        (temperature(value="hot"), TOPIC, "schema_validation"),
        (temperature(device_time="2026-11-21T03:00:00"), TOPIC, "schema_validation"),
        (temperature(device_time=1795244784533000000), TOPIC, "schema_validation"),
        (temperature(extra_field=1), TOPIC, "schema_validation"),
        (temperature(seq=-1), TOPIC, "schema_validation"),
        # NaN and Infinity are not JSON: the parser refuses them before any schema check.
        (b'{"schema": "vigil.device.temperature.v1", "value": NaN}', TOPIC, "invalid_json"),
        (b"x" * (64 * 1024 + 1), TOPIC, "payload_too_large"),
    ],
)
def test_bad_input_is_rejected_with_its_reason(payload: object, topic: str, reason: str) -> None:
    """Each kind of bad input gets its own dead-letter reason, with the raw payload kept."""
    outcome = check(payload, topic)
    assert isinstance(outcome, Rejected), outcome
    dead = outcome.dead_letter
    assert dead.reason == reason
    assert dead.detail
    assert dead.source_topic == topic
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert dead.payload_size == len(raw)
    kept = base64.b64decode(dead.payload_b64)
    assert raw.startswith(kept)
    assert dead.payload_truncated == (len(kept) < len(raw))


def test_nan_in_an_otherwise_valid_reading_is_rejected() -> None:
    """A NaN temperature is refused as invalid JSON, not turned into a fever or a normal reading."""
    raw = json.dumps(temperature()).replace("38.4", "NaN").encode()
    outcome = validate_message(TOPIC, raw, NOW, REGISTRY)
    assert isinstance(outcome, Rejected) and outcome.reason == "invalid_json"


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "1e999"])
def test_non_finite_temperature_is_rejected(literal: str) -> None:
    """Infinity is not JSON, and a number too large for a float is not a finite reading."""
    raw = json.dumps(temperature()).replace("38.4", literal).encode()
    outcome = validate_message(TOPIC, raw, NOW, REGISTRY)
    assert isinstance(outcome, Rejected)
    assert outcome.reason in ("invalid_json", "schema_validation")


def test_timestamp_in_nanoseconds_is_rejected_not_misdated() -> None:
    """A device_time sent as epoch nanoseconds is refused, never read as some other date."""
    outcome = check(temperature(device_time=1_763_694_000_000_000_000))
    assert isinstance(outcome, Rejected) and outcome.reason == "schema_validation"


def test_timestamp_in_nanoseconds_as_text_is_rejected() -> None:
    """The same mistake inside a string is not RFC 3339 either."""
    outcome = check(temperature(device_time="1763694000000000000"))
    assert isinstance(outcome, Rejected) and outcome.reason == "schema_validation"


def test_device_clock_far_ahead_is_flagged_not_dropped() -> None:
    """A reading from ten minutes in the future is kept and flagged."""
    outcome = check(temperature(device_time=(NOW + timedelta(minutes=10)).isoformat()))
    assert isinstance(outcome, Accepted)
    assert outcome.telemetry.flags == ("device_clock_ahead",)


def test_device_clock_just_inside_skew_is_not_flagged() -> None:
    """Four minutes ahead is within the default five minutes of skew."""
    outcome = check(temperature(device_time=(NOW + timedelta(minutes=4)).isoformat()))
    assert isinstance(outcome, Accepted) and outcome.telemetry.flags == ()


@pytest.mark.parametrize("celsius", [45.0, 20.0])
def test_implausible_temperature_is_a_sensor_fault_not_a_fever(celsius: float) -> None:
    """45 °C or 20 °C is kept and flagged, and carries no temperature for the fever rule."""
    outcome = check(temperature(value=celsius))
    assert isinstance(outcome, Accepted)
    assert outcome.telemetry.temperature_c is None
    assert "implausible_temperature" in outcome.telemetry.flags


def test_dead_letter_detail_never_carries_the_value() -> None:
    """Rejection details name the field and the problem, not the PHI value."""
    outcome = check(temperature(value="39.9C-secret"))
    assert isinstance(outcome, Rejected)
    assert "39.9C-secret" not in outcome.dead_letter.detail
