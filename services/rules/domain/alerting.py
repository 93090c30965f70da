"""How a rule's decision becomes an ``Alert``: identity, state axis, and evidence records.

Every rule builds its alerts here so that the lifecycle fields mean the same thing everywhere:
the alert id is derived from (dedup key, phase); an ``end`` phase is the "all clear" and carries
state ``inactive`` (cleared) at priority ``info``; every other phase is ``active``. Whether a
person acknowledged an alert is notify's axis, never decided here.
"""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    Evidence,
)
from services.rules.domain.identity import alert_id_for


def at(t: float) -> datetime:
    """A POSIX time as an aware UTC datetime (timers fire at computed, not observed, times)."""
    return datetime.fromtimestamp(t, UTC)


def stamp(t: float) -> str:
    """A compact, stable text form of a time for dedup keys."""
    return at(t).strftime("%Y%m%dT%H%M%S.%fZ")


def evidence(
    name: str,
    value: float,
    limit: float,
    comparator: str,
    device_time: datetime,
    *,
    unit: str = "Cel",
    message_id: str | None = None,
) -> Evidence:
    return Evidence.model_validate(
        {
            "name": name,
            "value": value,
            "unit": unit,
            "limit": limit,
            "comparator": comparator,
            "device_time": device_time,
            "message_id": message_id,
        }
    )


def build_alert(
    *,
    dedup_key: str,
    phase: AlertPhase,
    patient_id: str,
    device_id: str,
    kind: AlertKind,
    code: str,
    priority: AlertPriority,
    title: str,
    device_time: datetime,
    ingest_time: datetime,
    evidence: tuple[Evidence, ...],
    rule_id: str,
    rule_version: str,
    config_version: str | None = None,
) -> Alert:
    ended = phase is AlertPhase.END
    return Alert(
        alert_id=alert_id_for(dedup_key, phase.value),
        dedup_key=dedup_key,
        patient_id=patient_id,
        device_id=device_id,
        kind=kind,
        code=code,
        priority=AlertPriority.INFO if ended else priority,
        phase=phase,
        state=AlertState.INACTIVE if ended else AlertState.ACTIVE,
        title=title,
        device_time=device_time,
        ingest_time=ingest_time,
        evidence=evidence,
        rule_id=rule_id,
        rule_version=rule_version,
        config_version=config_version,
    )
