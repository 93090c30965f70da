"""Ingest validation builds an accepted message's Telemetry without validating it again: the same
outcomes as when pydantic validates it, over generated valid and near-valid messages."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import Telemetry
from services.ingest.adapters.kafka_batches import encode
from services.ingest.domain import validation
from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.times import as_device_utc
from services.ingest.domain.validation import Accepted, Rejected, validate_message

NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
REGISTRY = BindingIndex(
    [
        Binding("thermo-1", "P-0001", NOW - timedelta(days=10), None),
        Binding("pump-7", "P-0001", NOW - timedelta(days=10), NOW - timedelta(days=2)),
        Binding("pump-7", "P-0002", NOW - timedelta(days=2), None),
        Binding("hb.svc_1", "OPS-TECH", NOW - timedelta(days=10), None),
    ]
)
CHANNELS = {
    "vigil.device.temperature.v1": "temperature",
    "vigil.device.pump_status.v1": "pump-status",
    "vigil.device.pump_event.v1": "pump-event",
    "vigil.device.heartbeat.v1": "heartbeat",
}


def _validated_telemetry(
    patient_id: str,
    device_id: str,
    mqtt_topic: str,
    ingest_time: datetime,
    message: Any,
    temperature_c: float | None,
    flags: tuple[str, ...],
) -> Telemetry:
    """The Telemetry as it was built before: every field validated by pydantic."""
    return Telemetry(
        patient_id=patient_id,
        device_id=device_id,
        mqtt_topic=mqtt_topic,
        ingest_time=ingest_time,
        message=message,
        temperature_c=temperature_c,
        flags=flags,
    )


def _both(
    topic: str, payload: bytes, received_at: datetime
) -> tuple[Accepted | Rejected | str, Accepted | Rejected | str]:
    def run() -> Accepted | Rejected | str:
        try:
            return validate_message(topic, payload, received_at, REGISTRY)
        except (TypeError, ValidationError) as error:  # a naive receive time is refused
            return f"{type(error).__name__}: {error}"

    fast = run()
    built = validation._telemetry
    validation._telemetry = _validated_telemetry  # type: ignore[assignment]
    try:
        slow = run()
    finally:
        validation._telemetry = built
    return fast, slow


def _model_state(model: Any) -> tuple[object, ...]:
    return (
        type(model),
        list(model.__dict__.items()),
        model.__pydantic_fields_set__,
        model.__pydantic_extra__,
        model.__pydantic_private__,
    )


def assert_same(fast: Accepted | Rejected | str, slow: Accepted | Rejected | str) -> None:
    assert type(fast) is type(slow)
    if isinstance(fast, str):
        assert fast == slow
    elif isinstance(fast, Rejected):
        assert isinstance(slow, Rejected)
        assert fast.dead_letter == slow.dead_letter
        assert encode(fast.dead_letter) == encode(slow.dead_letter)
    else:
        assert isinstance(slow, Accepted)
        a, b = fast.telemetry, slow.telemetry
        assert a == b
        assert encode(a) == encode(b)
        assert a.model_dump_json(by_alias=True) == b.model_dump_json(by_alias=True)
        assert _model_state(a) == _model_state(b)
        assert _model_state(a.message) == _model_state(b.message)
        assert type(a.ingest_time.tzinfo) is type(b.ingest_time.tzinfo)
        assert a.ingest_time.utcoffset() == b.ingest_time.utcoffset()
        assert type(a.device_time.tzinfo) is type(b.device_time.tzinfo)
        assert type(a.temperature_c) is type(b.temperature_c)
        assert [type(f) for f in a.flags] == [type(f) for f in b.flags]


# -- generated messages ---------------------------------------------------------------------

_ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


def _times() -> st.SearchStrategy[object]:
    def text(at: datetime, spec: str, zone: str) -> str:
        return at.strftime("%Y-%m-%d") + spec[0] + at.strftime("%H:%M:%S") + spec[1:] + zone

    instants = st.datetimes(
        min_value=datetime(1999, 12, 25, tzinfo=UTC).replace(tzinfo=None),
        max_value=datetime(2101, 1, 5, tzinfo=UTC).replace(tzinfo=None),
        timezones=st.none(),
    )
    zones = st.sampled_from(
        ["Z", "z", "+00:00", "-00:00", "+02:00", "-05:30", "+0100", "+23:59", "+24:00", "", "+14"]
    )
    fractions = st.sampled_from(["T", "T.5", "T.123456", "T.1234567", "t", " ", "T.", "T,5"])
    near = NOW + timedelta(seconds=1)
    # Either side of the years allowed (2000-2100), in the device's local time.
    edges = st.builds(
        lambda year, day, zone: f"{year}-{day}T{zone[0]}{zone[1]}",
        st.sampled_from([1999, 2000, 2100, 2101]),
        st.sampled_from(["01-01", "12-31"]),
        st.sampled_from([("00:30:00", "+01:00"), ("23:30:00", "-01:00"), ("12:00:00", "Z")]),
    )
    return st.one_of(
        edges,
        st.builds(lambda d: (NOW - d).isoformat(), st.timedeltas(timedelta(0), timedelta(days=12))),
        st.builds(lambda d: (NOW + d).isoformat(), st.timedeltas(timedelta(0), timedelta(hours=1))),
        st.builds(text, instants, fractions, zones),
        st.builds(
            lambda z: near.astimezone(timezone(timedelta(minutes=z))).isoformat(),
            st.integers(-23 * 60, 23 * 60),
        ),
        st.sampled_from(
            [
                "2026-11-21T03:00:00",
                "2026-02-30T03:00:00Z",
                "2026-11-21T03:00:60Z",
                "2026-11-21T24:00:00Z",
                "2026-11-21",
                "1763694000000000000",
                "",
                "\uff12\uff10\uff12\uff16-11-21T03:00Z",
            ]
        ),
        st.integers(min_value=0, max_value=2**64),
        st.floats(allow_nan=False),
        _ANY_JSON,
    )


def _numbers(low: float, high: float) -> st.SearchStrategy[object]:
    return st.one_of(
        st.floats(min_value=low, max_value=high),
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=int(low) - 2, max_value=int(high) + 2),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.sampled_from([0, -0.0, 0.0, 1e308, 2**53 + 1, True, False, None, "37.5", "NaN"]),
        _ANY_JSON,
    )


def _common(schema: str, device: str) -> dict[str, st.SearchStrategy[object]]:
    return {
        "schema": st.just(schema),
        "message_id": st.one_of(
            st.uuids().map(str),
            st.uuids().map(lambda u: str(u).upper()),
            st.uuids().map(lambda u: u.hex),
            st.uuids().map(lambda u: "{" + str(u) + "}"),
            st.uuids().map(lambda u: "urn:uuid:" + str(u)),
            st.sampled_from(["", "not-a-uuid", str(uuid.UUID(int=0)), 42]),
            _ANY_JSON,
        ),
        "device_id": st.one_of(
            st.just(device),
            st.just(device + "\n"),
            st.just(device.upper()),
            st.sampled_from(["thermo-2", "-x", "é", "a" * 65, "", 7]),
            st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,70}\Z"),
        ),
        "seq": st.one_of(
            st.integers(min_value=-2, max_value=2**64),
            st.sampled_from([0, 2**63 - 1, 2**63, 1.0, 1.5, "3", True, None]),
        ),
        "device_time": _times(),
    }


_ENUM_TEXT = st.text(alphabet="ACFacfilnorstuxy_- ", max_size=12)

SPECIFIC: dict[str, dict[str, st.SearchStrategy[object]]] = {
    "vigil.device.temperature.v1": {
        "value": _numbers(20.0, 110.0),
        "unit": st.sampled_from(["C", "F", "c", "K", "", None]) | _ENUM_TEXT,
        "site": st.sampled_from(
            ["axillary", "oral", "tympanic", "temporal", "skin_patch", "unknown", "Oral", None]
        )
        | _ENUM_TEXT,
    },
    "vigil.device.pump_status.v1": {
        "state": st.sampled_from(["running", "paused", "stopped", "alarming", "off", None]),
        "rate_ml_h": _numbers(0, 1000),
        "volume_remaining_ml": _numbers(0, 5000),
        "bag_volume_ml": _numbers(0, 5000),
        "battery_pct": _numbers(0, 100),
    },
    "vigil.device.pump_event.v1": {
        "event": st.sampled_from(
            [
                "alarm_raised",
                "alarm_cleared",
                "infusion_started",
                "infusion_paused",
                "infusion_stopped",
                "bag_changed",
                "x",
            ]
        ),
        "alarm": st.sampled_from(
            ["occlusion_upstream", "air_in_line", "door_open", "infusion_stopped", "nope", None]
        ),
        "detail": st.one_of(
            st.none(), st.text(max_size=510), st.just("é" * 500), st.just("x" * 501)
        ),
    },
    "vigil.device.heartbeat.v1": {},
}
REQUIRED_SPECIFIC = {
    "vigil.device.temperature.v1": {"value"},
    "vigil.device.pump_status.v1": {"state", "rate_ml_h", "volume_remaining_ml"},
    "vigil.device.pump_event.v1": {"event"},
    "vigil.device.heartbeat.v1": set(),
}
DEVICE_OF = {
    "vigil.device.temperature.v1": "thermo-1",
    "vigil.device.pump_status.v1": "pump-7",
    "vigil.device.pump_event.v1": "pump-7",
    "vigil.device.heartbeat.v1": "hb.svc_1",
}


def _good_times() -> st.SearchStrategy[str]:
    """Device times pydantic accepts, within the bindings, in the forms devices write."""
    offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
    moments = st.timedeltas(-timedelta(days=12), timedelta(minutes=10)).map(lambda d: NOW + d)
    return st.one_of(
        st.builds(lambda at, z: at.astimezone(z).isoformat(), moments, offsets),
        st.builds(lambda at: at.isoformat(timespec="microseconds"), moments),
        st.builds(lambda at: at.strftime("%Y-%m-%dT%H:%M:%SZ"), moments),
        st.builds(lambda at: at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z", moments),
    )


GOOD: dict[str, st.SearchStrategy[object]] = {
    "message_id": st.uuids().map(str),
    "seq": st.integers(0, 2**63 - 1),
    "device_time": _good_times(),
    "value": st.floats(25, 45) | st.integers(30, 110) | st.floats(90, 110),
    "unit": st.sampled_from(["C", "F"]),
    "site": st.sampled_from(["axillary", "oral", "tympanic", "temporal", "skin_patch", "unknown"]),
    "state": st.sampled_from(["running", "paused", "stopped", "alarming"]),
    "rate_ml_h": st.floats(0, 1000) | st.integers(0, 1000),
    "volume_remaining_ml": st.floats(0, 5000) | st.integers(0, 5000),
    "bag_volume_ml": st.none() | st.floats(0, 5000),
    "battery_pct": st.none() | st.floats(0, 100) | st.integers(0, 100),
    "event": st.sampled_from(["alarm_raised", "alarm_cleared", "infusion_started", "bag_changed"]),
    "alarm": st.sampled_from(["occlusion_upstream", "air_in_line", "door_open", None]),
    "detail": st.none() | st.text(max_size=40),
}


@st.composite
def messages(draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[str, bytes]:
    schema = draw(st.sampled_from(sorted(CHANNELS)))
    device = DEVICE_OF[schema]
    common = _common(schema, device)
    fields = {**common, **SPECIFIC[schema]}
    document: dict[str, object] = {}
    for name, strategy in fields.items():
        required = name in common or name in REQUIRED_SPECIFIC[schema]
        # Mostly present and well formed; sometimes left out (required or not), or mutated.
        # (hypothesis leans to small numbers: they are the well-formed cases here)
        roll = draw(st.integers(0, 99))
        if roll >= 97 if required else 40 <= roll < 70:
            continue
        good = st.just(device) if name == "device_id" else GOOD.get(name, strategy)
        document[name] = draw(strategy if roll >= 82 else good)
    if draw(st.integers(0, 19)) == 19:
        extra = draw(st.sampled_from(["extra", "schema_", "temperature_c", "Seq"]))
        document[extra] = draw(_ANY_JSON)
    if draw(st.integers(0, 49)) == 49:
        document.pop("schema", None)
        document[draw(st.sampled_from(["schema", "schema_"]))] = draw(
            st.sampled_from([*CHANNELS, "vigil.device.temperature.v9", None, 1])
        )
    items = list(document.items())
    if draw(st.booleans()):
        items = draw(st.permutations(items))
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}"
    mutation = draw(st.integers(0, 29))
    if mutation == 29 and items:  # a duplicate key: the last one wins
        key, _ = draw(st.sampled_from(items))
        text = text[:-1] + f", {json.dumps(key)}: {json.dumps(draw(_ANY_JSON))}" + "}"
    elif mutation == 28:
        text = text.replace("38", "NaN", 1).replace("0.0", "Infinity", 1)
    elif mutation == 27:
        text = text[: draw(st.integers(0, len(text)))]
    channel = CHANNELS.get(str(document.get("schema")), "temperature")
    topic_device = device
    if draw(st.integers(0, 9)) == 9:
        topic_device = draw(st.sampled_from(["thermo-9", "pump-7"]))
    if draw(st.integers(0, 29)) == 29:
        channel = draw(st.sampled_from([*CHANNELS.values(), "blood-pressure"]))
    return f"vigil/v1/dev/{topic_device}/{channel}", text.encode()


RECEIVED = st.sampled_from(
    [
        *[as_device_utc(NOW)] * 6,
        *[NOW] * 3,
        as_device_utc(NOW + timedelta(minutes=7, microseconds=3)),
        as_device_utc(NOW - timedelta(days=8)),
        NOW.astimezone(timezone(timedelta(hours=2))),
        NOW.replace(tzinfo=None),
    ]
)


@settings(
    max_examples=1200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(messages(), RECEIVED)
def test_generated_messages_decide_alike(message: tuple[str, bytes], received_at: datetime) -> None:
    """Whatever the message and the receive time: the same decision, the same Telemetry (fields,
    types, tzinfo classes, Kafka bytes) or the same dead letter as with pydantic building it."""
    topic, payload = message
    assert_same(*_both(topic, payload, received_at))


def _reading(**overrides: object) -> dict[str, object]:
    document: dict[str, object] = {
        "schema": "vigil.device.temperature.v1",
        "message_id": str(uuid.UUID(int=12345)),
        "device_id": "thermo-1",
        "seq": 10,
        "device_time": "2026-11-21T02:59:58.123456Z",
        "value": 38.4,
    }
    document.update(overrides)
    return document


@pytest.mark.parametrize(
    "document",
    [
        _reading(),
        _reading(value=101, unit="F", site="oral"),
        _reading(value=50.0),
        _reading(device_time="2026-11-21T05:10:00+02:00"),
        _reading(device_time="2026-11-21T03:20:00Z"),
        _reading(device_time="2026-11-12T03:00:00Z"),
    ],
)
@pytest.mark.parametrize("received_at", [NOW, as_device_utc(NOW)])
def test_accepted_readings_are_built_without_validation_and_equal(
    document: dict[str, object], received_at: datetime
) -> None:
    """The common shapes are accepted, and their Telemetry equals pydantic's in every respect."""
    fast, slow = _both(
        "vigil/v1/dev/thermo-1/temperature", json.dumps(document).encode(), received_at
    )
    assert isinstance(fast, Accepted)
    assert fast.telemetry.ingest_time is received_at
    assert_same(fast, slow)


def _event(**overrides: object) -> dict[str, object]:
    document: dict[str, object] = {
        "schema": "vigil.device.pump_event.v1",
        "message_id": str(uuid.UUID(int=777)),
        "device_id": "pump-7",
        "seq": 3,
        "device_time": "2026-11-21T02:00:00Z",
        "event": "alarm_raised",
        "alarm": "air_in_line",
    }
    document.update(overrides)
    return document


@pytest.mark.parametrize(
    ("document", "outcome"),
    [
        # The device time's years are the device's local ones, whatever the instant in UTC.
        (_reading(device_time="2101-01-01T00:30:00+01:00"), "schema_validation"),
        (_reading(device_time="2100-12-31T23:30:00-01:00"), "accepted"),  # far ahead: flagged
        (_reading(device_time="1999-12-31T23:59:59.999999Z"), "schema_validation"),
        (_reading(device_time="2000-01-01T00:00:00+14:00"), "no_binding"),
        (_event(alarm=None), "schema_validation"),  # an alarm event with a null alarm
        (_event(alarm=None, event="bag_changed"), "accepted"),
        ({k: v for k, v in _event().items() if k != "alarm"}, "accepted"),  # absent: unchecked
        (_event(detail="x" * 500), "accepted"),
        (_event(detail="x" * 501), "schema_validation"),
        (_reading(value=1e308), "accepted"),
        (_reading(value=101), "accepted"),
        (_reading(value=2**1030), "invalid_json"),  # orjson refuses an integer that large
    ],
)
def test_edge_messages_decide_alike(document: dict[str, object], outcome: str) -> None:
    """Messages at the edges of the device models' checks: the same outcome either way."""
    topic = f"vigil/v1/dev/{document['device_id']}/{CHANNELS[str(document['schema'])]}"
    fast, slow = _both(topic, json.dumps(document).encode(), NOW)
    assert_same(fast, slow)
    assert isinstance(fast, Accepted if outcome == "accepted" else Rejected)
    if isinstance(fast, Rejected):
        assert fast.reason == outcome
