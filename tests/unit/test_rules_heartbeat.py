"""The rules pass the pipeline heartbeat on to notify and keep it away from the clinical rules;
it moves the arrival clock of its partition (ingest writes it to every partition), so a
silence is noticed where nothing else arrives."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from schemas.device import HeartbeatMessage
from schemas.events import AlertKind, AlertPhase, AlertPriority, AlertState, Telemetry
from services.notify.service_layer.escalation import HEARTBEAT_CODE as NOTIFY_HEARTBEAT_CODE
from services.rules.adapters.codec import decode_observation
from services.rules.domain.engine import RulesEngine
from services.rules.domain.observation import observe
from tests.support.rules import Home, run_stream
from vigil.kafka import encode

START = datetime(2026, 11, 21, 2, 0, tzinfo=UTC)
PSEUDO_PATIENT = "pipeline-team-tech"
DEVICE = "heartbeat-pipeline"


def heartbeat(
    minutes: float,
    *,
    message_id: uuid.UUID | None = None,
    seq: int = 1,
    patient: str = PSEUDO_PATIENT,
) -> Telemetry:
    at = START + timedelta(minutes=minutes)
    message = HeartbeatMessage.model_validate(
        {
            "schema": "vigil.device.heartbeat.v1",
            "message_id": message_id or uuid.uuid4(),
            "device_id": DEVICE,
            "seq": seq,
            "device_time": at,
        }
    )
    return Telemetry(
        patient_id=patient,
        device_id=DEVICE,
        mqtt_topic=f"vigil/v1/dev/{DEVICE}/heartbeat",
        ingest_time=at + timedelta(seconds=1),
        message=message,
    )


def test_one_heartbeat_gives_one_alert_of_the_shape_notify_records() -> None:
    """A heartbeat message becomes exactly one alert: notify's heartbeat code, technical, info,
    phase continue, inactive, the heartbeat device, its device time and a per-device dedup key."""
    beat = heartbeat(0)
    (alert,) = RulesEngine().on_telemetry(beat)
    assert alert.code == NOTIFY_HEARTBEAT_CODE == "pipeline.heartbeat"
    assert alert.kind is AlertKind.TECHNICAL
    assert alert.priority is AlertPriority.INFO
    assert alert.phase is AlertPhase.CONTINUE
    assert alert.state is AlertState.INACTIVE
    assert alert.device_id == DEVICE
    assert alert.patient_id == PSEUDO_PATIENT
    assert alert.device_time == beat.message.device_time
    assert alert.ingest_time == beat.ingest_time
    assert alert.dedup_key == f"pipeline:heartbeat:{DEVICE}"
    assert alert.rule_id == "pipeline.heartbeat"
    assert alert.evidence == ()


def test_redelivered_heartbeat_has_the_same_alert_id_and_a_new_one_a_new_id() -> None:
    """The alert id derives from the message id: a redelivery (even to a restarted engine)
    repeats it, so it collapses downstream; the next heartbeat message gets its own id."""
    message_id = uuid.uuid4()
    first = RulesEngine().on_telemetry(heartbeat(0, message_id=message_id))[0]
    again = RulesEngine().on_telemetry(heartbeat(0, message_id=message_id))[0]
    following = RulesEngine().on_telemetry(heartbeat(0.25, seq=2))[0]
    assert first.alert_id == again.alert_id
    assert following.alert_id != first.alert_id
    assert following.dedup_key == first.dedup_key


def test_heartbeat_moves_no_patient_state_and_no_watermark_only_the_arrival_clock() -> None:
    """A heartbeat touches no patient or device state, marks nobody dirty and does not move
    the event-time watermark; what it moves is the arrival clock (its ingest time - 5 s)."""
    engine = RulesEngine()
    home = Home("P-0001", START)
    run_stream(engine, [home.temp(0, 37.0), home.status(0)])
    engine.take_dirty()
    before = engine.snapshot()
    beat = heartbeat(10)  # before any deadline: nothing fires
    engine.on_telemetry(beat)
    after = engine.snapshot()
    assert after["patients"] == before["patients"]
    assert after["watermark"] == before["watermark"]
    assert engine.take_dirty() == set()
    assert engine.patient_count == 1
    assert after["max_ingest_t"] == beat.ingest_time.timestamp() > before["max_ingest_t"]
    assert engine.arrival_clock == beat.ingest_time - timedelta(seconds=5)


def test_a_heartbeat_past_a_deadline_fires_the_silence_alone_on_its_partition() -> None:
    """A home that goes quiet with nothing else arriving: the heartbeat is what moves time.
    Just before the pump's deadline (last arrival + 15 min) a heartbeat fires nothing; the
    next one, past it, fires device_silent dated at the deadline, not at the heartbeat."""
    home = Home("P-0001", START)
    engine = RulesEngine()
    run_stream(engine, [home.temp(0, 37.0), home.status(0)])
    deadline = START + timedelta(minutes=15, seconds=1)
    # heartbeat(m) reaches ingest at m + 1 s; the clock is that - 5 s.
    early = engine.on_telemetry(heartbeat(15 + 4 / 60, seq=1))
    assert [a.code for a in early] == ["pipeline.heartbeat"]
    late = engine.on_telemetry(heartbeat(15 + 5 / 60, seq=2))
    assert [a.code for a in late] == ["pipeline.heartbeat", "device_silent"]
    assert late[1].device_id == home.pump_id and late[1].device_time == deadline


def test_heartbeats_interleaved_with_a_fever_change_no_clinical_alert() -> None:
    """The clinical alerts of a febrile stream are the same with heartbeats between its
    readings as without them; the heartbeats add only their own alerts."""
    home = Home("P-0001", START)
    readings = [home.temp(0, 37.2), home.temp(20, 38.6), home.temp(40, 38.7), home.temp(90, 37.0)]
    alone = run_stream(RulesEngine(), readings)
    mixed_stream: list[Telemetry] = []
    for i, reading in enumerate(readings):
        mixed_stream += [reading, heartbeat(i * 20 + 5, seq=i + 1)]
    mixed = run_stream(RulesEngine(), mixed_stream)
    clinical = [a for a in mixed if a.code != "pipeline.heartbeat"]
    assert any(a.code.startswith("fever") for a in alone)
    assert clinical == alone
    assert len(mixed) - len(clinical) == len(readings)


def test_fast_decoder_and_model_give_the_same_heartbeat_alert() -> None:
    """The Kafka record's bytes (the service's hot path) and the validated model decode to a
    heartbeat the engine answers identically."""
    beat = heartbeat(0)
    from_bytes = RulesEngine().on_observation(decode_observation(encode(beat)))
    from_model = RulesEngine().on_observation(observe(beat))
    assert from_bytes == from_model and len(from_bytes) == 1
