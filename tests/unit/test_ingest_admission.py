"""Ingest admission: duplicates dropped and counted, out-of-order accepted, liveness per device."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.ingest.domain.admission import DeviceSeen, admit, merge_seen
from services.ingest.domain.dedup import Duplicate, RecentMessages
from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.validation import ValidationLimits

NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
REGISTRY = BindingIndex(
    [
        Binding("thermo-1", "P-0001", NOW - timedelta(days=10), None),
        Binding("thermo-2", "P-0002", NOW - timedelta(days=10), None),
    ]
)
LIMITS = ValidationLimits()


def reading(
    device: str = "thermo-1", seq: int = 1, age_s: float = 5.0, **extra: object
) -> tuple[str, bytes]:
    payload: dict[str, object] = {
        "schema": "vigil.device.temperature.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": device,
        "seq": seq,
        "device_time": (NOW - timedelta(seconds=age_s)).isoformat(),
        "value": 37.1,
    }
    payload.update(extra)
    return f"vigil/v1/dev/{device}/temperature", json.dumps(payload).encode()


def test_redelivered_message_is_dropped_and_counted_once_accepted() -> None:
    """The same bytes twice (a broker redelivery) give one accepted message and one duplicate."""
    window = RecentMessages(100)
    message = reading()
    first = admit([message], NOW, REGISTRY, window, LIMITS)
    again = admit([message, message], NOW, REGISTRY, window, LIMITS)
    assert len(first.accepted) == 1
    assert again.accepted == [] and again.rejected == []
    assert again.duplicates == {"message_id": 2}


def test_duplicate_inside_one_batch_is_dropped() -> None:
    """A hub forwarding its buffer twice within one batch still yields one reading."""
    message = reading()
    result = admit([message, message], NOW, REGISTRY, RecentMessages(100), LIMITS)
    assert len(result.accepted) == 1
    assert result.duplicates == {"message_id": 1}


def test_same_seq_with_a_new_message_id_is_dead_lettered_not_silently_dropped() -> None:
    """A retransmission given a new id (device bug) is counted and kept in the dead letters."""
    window = RecentMessages(100)
    admit([reading(seq=7)], NOW, REGISTRY, window, LIMITS)
    result = admit([reading(seq=7)], NOW, REGISTRY, window, LIMITS)
    assert result.accepted == []
    assert [d.reason for d in result.rejected] == ["duplicate_seq"]
    assert result.duplicates == {"seq": 1}


def test_same_seq_on_another_device_is_not_a_duplicate() -> None:
    """seq is per device: two devices may use the same number."""
    result = admit(
        [reading("thermo-1", seq=7), reading("thermo-2", seq=7)],
        NOW,
        REGISTRY,
        RecentMessages(100),
        LIMITS,
    )
    assert len(result.accepted) == 2 and not result.duplicates


def test_out_of_order_readings_are_accepted_and_liveness_keeps_the_newest() -> None:
    """A buffered older reading after a newer one is accepted; last-seen stays on the newest."""
    newer, older = reading(seq=9, age_s=5), reading(seq=3, age_s=3600)
    result = admit([newer, older], NOW, REGISTRY, RecentMessages(100), LIMITS)
    assert len(result.accepted) == 2
    (seen,) = result.seen
    assert seen.device_id == "thermo-1" and seen.last_seq == 9
    assert seen.last_device_time == NOW - timedelta(seconds=5)
    assert seen.last_ingest_time == NOW and seen.patient_id == "P-0001"
    assert seen.channel == "temperature"


def test_rejected_messages_do_not_count_as_seen_or_enter_the_window() -> None:
    """An unknown device's message is dead-lettered, not remembered and not 'alive'."""
    window = RecentMessages(100)
    result = admit([reading("ghost-9")], NOW, REGISTRY, window, LIMITS)
    assert [d.reason for d in result.rejected] == ["unknown_device"]
    assert result.seen == [] and len(window) == 0


def test_sensor_fault_is_accepted_with_its_flag_for_the_rules() -> None:
    """45 °C is a technical event: stored and passed on flagged, with no temperature for fever."""
    result = admit([reading(value=45.0)], NOW, REGISTRY, RecentMessages(100), LIMITS)
    (telemetry,) = result.accepted
    assert telemetry.flags == ("implausible_temperature",)
    assert telemetry.temperature_c is None


def test_window_forgets_the_oldest_beyond_capacity() -> None:
    """The window is bounded: the oldest entry goes first, both of its keys with it."""
    window = RecentMessages(2)
    ids = [uuid.uuid4() for _ in range(3)]
    for seq, message_id in enumerate(ids):
        window.remember("d", message_id, seq)
    assert len(window) == 2
    assert window.check("d", ids[0], 0) is None
    assert window.check("d", ids[1], 99) is Duplicate.MESSAGE_ID
    assert window.check("d", uuid.uuid4(), 2) is Duplicate.SEQ


def test_window_refuses_zero_capacity() -> None:
    """A window that remembers nothing would silently disable duplicate detection."""
    with pytest.raises(ValueError):
        RecentMessages(0)


def test_liveness_merge_keeps_newest_reading_and_latest_arrival() -> None:
    """A late, older reading does not move last-seen back, but its arrival time still counts."""
    early = NOW - timedelta(hours=1)
    gathered = {
        "thermo-1": DeviceSeen("thermo-1", "P-0001", NOW, NOW, 9, "temperature"),
    }
    merge_seen(
        gathered,
        [DeviceSeen("thermo-1", "P-0001", early, NOW + timedelta(seconds=5), 3, "temperature")],
    )
    seen = gathered["thermo-1"]
    assert seen.last_device_time == NOW and seen.last_seq == 9
    assert seen.last_ingest_time == NOW + timedelta(seconds=5)
