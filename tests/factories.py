"""Builders of the events tests need, one place for each.

``make_alert`` is a fever alert as rules writes one: one patient's thermometer, 38.6 °C against
a 38.3 °C limit, high priority. Every field of ``Alert`` can be given by name; what is not given
is derived from what is, as rules derives it:

- ``dedup_key``: ``{patient_id}:{code}``;
- ``alert_id``: the same for the same ``dedup_key`` and ``phase`` (``uuid5`` of both), as a
  replay reproduces it;
- ``device_id``: ``thermo-{patient_id}``;
- ``state``: inactive for the ``END`` phase, active otherwise;
- ``device_time`` and ``ingest_time``: ``at``;
- ``evidence``: one temperature reading (``fever_evidence``) at ``device_time``.

``temperature_message`` is what a thermometer publishes over MQTT (docs/mqtt.md): a fresh
message id and the current time unless given; ``unit`` and ``site`` only when given, as a
device may leave them out.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, AlertState, Evidence

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def fever_evidence(
    at: datetime,
    *,
    value: float = 38.6,
    limit: float = 38.3,
    unit: str = "°C",
    comparator: str = ">=",
    message_id: uuid.UUID | None = None,
) -> Evidence:
    """A temperature reading of ``value`` compared with ``limit``, taken at ``at``."""
    return Evidence.model_validate(
        {
            "name": "temperature",
            "value": value,
            "unit": unit,
            "limit": limit,
            "comparator": comparator,
            "device_time": at,
            "message_id": message_id,
        }
    )


def alert_id_for(dedup_key: str, phase: AlertPhase) -> uuid.UUID:
    """The id ``make_alert`` gives one phase of one episode when none is given."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{dedup_key}:{phase.value}")


def make_alert(
    *,
    patient_id: str = "P-1",
    code: str = "FEVER",
    phase: AlertPhase = AlertPhase.START,
    at: datetime = T0,
    **overrides: Any,
) -> Alert:
    """A fever alert for ``patient_id`` in ``phase`` at ``at``; ``overrides`` replace fields."""
    dedup_key = overrides.pop("dedup_key", f"{patient_id}:{code}")
    device_time = overrides.pop("device_time", at)
    fields: dict[str, Any] = {
        "alert_id": alert_id_for(dedup_key, phase),
        "dedup_key": dedup_key,
        "patient_id": patient_id,
        "device_id": f"thermo-{patient_id}",
        "kind": AlertKind.PHYSIOLOGICAL,
        "code": code,
        "priority": AlertPriority.HIGH,
        "phase": phase,
        "state": AlertState.INACTIVE if phase is AlertPhase.END else AlertState.ACTIVE,
        "title": "Fever 38.6 °C",
        "device_time": device_time,
        "ingest_time": at,
        "evidence": (fever_evidence(device_time),),
        "rule_id": "fever.single",
        "rule_version": "1",
    }
    unknown = set(overrides) - set(Alert.model_fields)
    if unknown:
        raise TypeError(f"Alert has no field {sorted(unknown)}")
    fields.update(overrides)
    return Alert.model_validate(fields)


def temperature_message(
    device_id: str,
    value: float,
    *,
    seq: int = 1,
    unit: str | None = None,
    site: str | None = None,
    message_id: str | None = None,
    device_time: datetime | None = None,
) -> dict[str, Any]:
    """A ``vigil.device.temperature.v1`` payload, as a dict to encode or to spoil."""
    payload: dict[str, Any] = {
        "schema": "vigil.device.temperature.v1",
        "message_id": message_id or str(uuid.uuid4()),
        "device_id": device_id,
        "seq": seq,
        "device_time": (device_time or datetime.now(UTC)).isoformat(),
        "value": value,
    }
    if unit is not None:
        payload["unit"] = unit
    if site is not None:
        payload["site"] = site
    return payload
