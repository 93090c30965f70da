"""The pipeline heartbeat as the rules pass it on: one ``pipeline.heartbeat`` alert per message.

The heartbeat proves that MQTT, ingest, Kafka and the rules still carry messages to notify, so
the rules answer every heartbeat message with exactly one alert of the shape notify records
(docs/notify.md, "Self-watch") and do nothing else with it: no clinical rule sees it, no patient
or device state moves, the watermark stays where it is. Pure; the alert's times are the
message's own.
"""

from __future__ import annotations

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, AlertState
from services.rules.domain.identity import alert_id_for
from services.rules.domain.observation import ObservationLike

HEARTBEAT_CODE = "pipeline.heartbeat"
HEARTBEAT_RULE_ID = "pipeline.heartbeat"
HEARTBEAT_RULE_VERSION = "1"


def heartbeat_dedup_key(device_id: str) -> str:
    return f"pipeline:heartbeat:{device_id}"


def heartbeat_alert(obs: ObservationLike) -> Alert:
    """The alert that tells notify this heartbeat made it through.

    Its id is fresh per heartbeat message and derived from the message id, so a redelivered
    message gives the same alert (notify folds it) and a new message gives a new one.
    """
    dedup_key = heartbeat_dedup_key(obs.device_id)
    return Alert(
        alert_id=alert_id_for(f"{dedup_key}:{obs.message_id}", AlertPhase.CONTINUE.value),
        dedup_key=dedup_key,
        patient_id=obs.patient_id,
        device_id=obs.device_id,
        kind=AlertKind.TECHNICAL,
        code=HEARTBEAT_CODE,
        priority=AlertPriority.INFO,
        phase=AlertPhase.CONTINUE,
        state=AlertState.INACTIVE,
        title="Pipeline heartbeat",
        device_time=obs.device_time,
        ingest_time=obs.ingest_time,
        evidence=(),
        rule_id=HEARTBEAT_RULE_ID,
        rule_version=HEARTBEAT_RULE_VERSION,
    )
