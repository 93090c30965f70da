"""End-to-end acknowledgements: what ingest answers each device, batched, in the contract's
shape; and the reference device's outbox that consumes them (resend on timeout, oldest first)."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from schemas.ack import IngestAck
from services.ingest.domain.acks import PendingAcks
from services.ingest.domain.admission import admit
from services.ingest.domain.dedup import RecentMessages
from services.ingest.domain.registry import Binding, BindingIndex
from services.ingest.domain.validation import ValidationLimits
from vigil_tools.simulator.outbox import Outbox

NOW = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
REGISTRY = BindingIndex(
    [
        Binding("thermo-1", "P-0001", NOW - timedelta(days=10), None),
        Binding("thermo-2", "P-0002", NOW - timedelta(days=10), None),
    ]
)
LIMITS = ValidationLimits()


def reading(device: str = "thermo-1", seq: int = 1, **extra: object) -> tuple[str, bytes]:
    payload: dict[str, object] = {
        "schema": "vigil.device.temperature.v1",
        "message_id": str(uuid.uuid4()),
        "device_id": device,
        "seq": seq,
        "device_time": (NOW - timedelta(seconds=5)).isoformat(),
        "value": 37.1,
    }
    payload.update(extra)
    return f"vigil/v1/dev/{device}/temperature", json.dumps(payload).encode()


def ids(message: tuple[str, bytes]) -> tuple[str, int]:
    document = json.loads(message[1])
    return document["message_id"], document["seq"]


def test_every_message_of_a_durable_batch_is_answered_to_its_own_device() -> None:
    window = RecentMessages(100)
    a1, a2, b1 = reading("thermo-1", 1), reading("thermo-1", 2), reading("thermo-2", 7)
    bad = reading("thermo-2", 8, value="hot")  # schema_validation, with a readable id and seq
    garbage = ("vigil/v1/dev/thermo-1/temperature", b"\xff not json")
    pending = PendingAcks()
    pending.add(admit([a1, a2, b1, bad, garbage], NOW, REGISTRY, window, LIMITS))
    # A retransmission of a1 in a later batch: dropped as a duplicate, answered as stored.
    pending.add(admit([a1], NOW, REGISTRY, window, LIMITS))
    assert len(pending) == 6
    sent = {m.device_id: IngestAck.model_validate_json(m.payload) for m in pending.drain(NOW)}
    assert len(pending) == 0
    assert set(sent) == {"thermo-1", "thermo-2"}
    one, two = sent["thermo-1"], sent["thermo-2"]
    assert [(str(s.message_id), s.seq) for s in one.stored] == [ids(a1), ids(a2), ids(a1)]
    assert [(r.message_id, r.seq, r.reason) for r in one.rejected] == [(None, None, "invalid_json")]
    assert one.rejected[0].payload_sha256 == hashlib.sha256(garbage[1]).hexdigest()
    assert [(str(s.message_id), s.seq) for s in two.stored] == [ids(b1)]
    assert [(str(r.message_id), r.seq, r.reason) for r in two.rejected] == [
        (*ids(bad), "schema_validation")
    ]
    assert one.ingest_time == NOW and one.device_id == "thermo-1"


def test_acks_are_split_at_max_entries_and_rejects_without_a_device_are_counted() -> None:
    window = RecentMessages(1000)
    batch = [reading("thermo-1", seq) for seq in range(1, 8)]
    nowhere = ("not/a/device/topic", b"{}")
    pending = PendingAcks(max_entries=3)
    pending.add(admit([*batch, nowhere], NOW, REGISTRY, window, LIMITS))
    assert pending.unaddressable == 1
    messages = list(pending.drain(NOW))
    assert [m.stored for m in messages] == [3, 3, 1]
    assert all(m.topic == "vigil/v1/ack/thermo-1" for m in messages)
    answered = [s["seq"] for m in messages for s in orjson.loads(m.payload)["stored"]]
    assert answered == list(range(1, 8))


def test_capacity_bounds_pending_answers_and_put_back_keeps_them() -> None:
    window = RecentMessages(1000)
    pending = PendingAcks(capacity=2)
    pending.add(admit([reading("thermo-1", s) for s in (1, 2, 3)], NOW, REGISTRY, window, LIMITS))
    assert (len(pending), pending.dropped) == (2, 1)
    (message,) = pending.drain(NOW)
    pending.put_back(message)
    (again,) = pending.drain(NOW)
    assert again.payload == message.payload


def test_outbox_keeps_messages_past_their_puback_until_answered_and_resends_oldest_first() -> None:
    window = RecentMessages(100)
    outbox = Outbox(resend_after_s=60)
    sent = [reading("thermo-1", 1), reading("thermo-1", 2), reading("thermo-2", 1)]
    for at, (topic, payload) in enumerate(sent):
        message_id, seq = ids((topic, payload))
        outbox.add(topic.split("/")[3], message_id, seq, topic, payload, float(at))
    assert outbox.due(59.5) == []  # positive control below: nothing is due before its time
    # Ingest stored the first two (thermo-1) only; thermo-2's reading was lost on the way.
    pending = PendingAcks()
    pending.add(admit(sent[:2], NOW, REGISTRY, window, LIMITS))
    for ack in pending.drain(NOW):
        settled = outbox.settle(ack.payload)
        assert (settled.stored, settled.unknown) == (2, 0)
    assert len(outbox) == 1
    due = outbox.due(62.0)
    assert [(e.device_id, e.payload) for e in due] == [("thermo-2", sent[2][1])]
    assert due[0].sends == 2 and outbox.due(62.5) == []  # sent again: its timeout restarts
    # The resent copy is stored: the answer empties the outbox.
    pending.add(admit([sent[2]], NOW, REGISTRY, window, LIMITS))
    for ack in pending.drain(NOW):
        outbox.settle(ack.payload)
    assert len(outbox) == 0 and outbox.next_due() is None


def test_outbox_drops_a_rejected_message_even_without_a_readable_id() -> None:
    outbox = Outbox(resend_after_s=60)
    topic = "vigil/v1/dev/thermo-1/temperature"
    outbox.add("thermo-1", "m-1", 5, topic, b"\xff not json", 0.0)
    pending = PendingAcks()
    pending.add(admit([(topic, b"\xff not json")], NOW, REGISTRY, RecentMessages(10), LIMITS))
    (ack,) = pending.drain(NOW)
    settled = outbox.settle(ack.payload)
    assert [(r.seq, r.reason) for r in settled.rejected] == [(5, "invalid_json")]
    assert len(outbox) == 0
    # An answer for another device's message never takes ours out.
    outbox.add("thermo-1", "m-2", 6, topic, b"x", 0.0)
    foreign = {
        "schema": "vigil.ingest.ack.v1",
        "device_id": "thermo-2",
        "stored": [{"message_id": "m-2", "seq": 6}],
    }
    assert outbox.settle(foreign).unknown == 1 and "m-2" in outbox


def test_the_example_in_the_device_contract_is_a_valid_ack() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "mqtt.md").read_text()
    section = text[text.index("### 4.1") :]
    example = section[
        section.index("```json") + 7 : section.index("```", section.index("```json") + 7)
    ]
    ack = IngestAck.model_validate_json(example)
    assert ack.device_id == "thermo-P-0001" and ack.stored[0].seq == 1042
