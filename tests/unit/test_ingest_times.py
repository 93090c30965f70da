"""Device times are compared as the same instant with the standard library's UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from schemas.device import device_message_adapter
from schemas.events import Telemetry
from schemas.topics import parse_topic
from services.ingest.domain.times import as_device_utc, as_utc
from services.ingest.domain.validation import parse_device_topic


def _device_time(text: str) -> datetime:
    message = device_message_adapter().validate_python(
        {
            "schema": "vigil.device.temperature.v1",
            "device_id": "thermo-T-0001",
            "message_id": "6f1c1f8e-3a55-4c1b-9a37-0d3f0f3f6b10",
            "seq": 1,
            "device_time": text,
            "value": 37.2,
            "unit": "C",
            "site": "axillary",
        }
    )
    return message.device_time


@pytest.mark.parametrize(
    "text",
    ["2026-12-07T10:00:00.123456Z", "2026-12-07T10:00:00+00:00", "2026-12-07T11:30:00.5+01:30"],
)
def test_a_device_time_keeps_its_instant_with_utc(text: str) -> None:
    original = _device_time(text)
    converted = as_utc(original)
    assert converted.tzinfo is UTC
    assert converted == original
    assert converted - datetime(1970, 1, 1, tzinfo=UTC) == original - datetime(
        1970, 1, 1, tzinfo=UTC
    )


def test_utc_and_other_offsets() -> None:
    now = datetime(2026, 12, 7, 10, 0, 0, 250, tzinfo=UTC)
    assert as_utc(now) is now
    other = datetime(2026, 12, 7, 5, 0, 0, 250, tzinfo=timezone(timedelta(hours=-5)))
    assert as_utc(other) == now and as_utc(other).tzinfo is UTC


def test_ingest_times_take_the_device_times_tzinfo() -> None:
    """The receive time in the tzinfo of a UTC device time: the same instant, written alike."""
    device_utc = _device_time("2026-12-07T10:00:00Z").tzinfo
    now = datetime(2026, 12, 7, 10, 0, 0, 250, tzinfo=UTC)
    converted = as_device_utc(now)
    assert converted.tzinfo is device_utc and converted == now
    assert converted.isoformat() == now.isoformat()
    assert as_utc(converted) == now and as_utc(converted).tzinfo is UTC
    other = datetime(2026, 12, 7, 5, 0, 0, 250, tzinfo=timezone(timedelta(hours=-5)))
    assert as_device_utc(other) == now and as_device_utc(other).tzinfo is device_utc


@pytest.mark.parametrize(
    "topic",
    [
        "vigil/v1/dev/thermo-T-0001/temperature",
        "vigil/v1/dev/thermo-T-0001/pump-status",
        "vigil/v1/dev/thermo-T-0001/nope",
        "vigil/v1/dev//temperature",
        "elsewhere/thermo-T-0001/temperature",
    ],
)
def test_a_remembered_topic_parses_as_before(topic: str) -> None:
    assert parse_device_topic(topic) == parse_topic(topic)
    assert parse_device_topic(topic) == parse_topic(topic)  # the second time from memory


def test_the_telemetry_written_to_kafka_is_the_same_bytes() -> None:
    """The receive time in the device's tzinfo serialises exactly as in the standard UTC."""
    message = device_message_adapter().validate_python(
        {
            "schema": "vigil.device.temperature.v1",
            "device_id": "thermo-T-0001",
            "message_id": "6f1c1f8e-3a55-4c1b-9a37-0d3f0f3f6b10",
            "seq": 1,
            "device_time": "2026-12-07T09:59:58.5Z",
            "value": 37.2,
            "unit": "C",
            "site": "axillary",
        }
    )
    written = []
    for received in (
        datetime(2026, 12, 7, 10, 0, 0, 250, tzinfo=UTC),
        datetime(2026, 12, 7, tzinfo=UTC),
    ):
        for ingest_time in (received, as_device_utc(received)):
            telemetry = Telemetry(
                patient_id="P-0001",
                device_id="thermo-T-0001",
                mqtt_topic="vigil/v1/dev/thermo-T-0001/temperature",
                ingest_time=ingest_time,
                message=message,
                temperature_c=37.2,
            )
            written.append(telemetry.model_dump_json(by_alias=True))
    assert written[0] == written[1] and written[2] == written[3]
