"""Builders of telemetry streams for tests, golden files and benchmarks of the rules.

``Home`` is one patient's thermometer and pump writing events on a clock the caller moves by
hand (minutes from a start time), with deterministic message ids, so the same script always
produces the same stream, byte for byte. It builds the validated ``Telemetry`` contract, exactly
what ingest puts on Kafka; nothing here is used by the service itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from schemas.device import (
    HeartbeatMessage,
    PumpAlarmCode,
    PumpEvent,
    PumpEventKind,
    PumpState,
    PumpStatus,
    TemperatureReading,
    TemperatureSite,
)
from schemas.events import Alert, Telemetry
from services.rules.domain.engine import RulesEngine

_STREAM_NAMESPACE = uuid.UUID("0b5e3c2a-5d0e-4c59-9d8a-6f1f4f1f7a11")


class Home:
    """A patient's home devices, emitting ``Telemetry`` at minute offsets from ``start``."""

    def __init__(
        self,
        patient_id: str,
        start: datetime,
        *,
        thermometer_id: str | None = None,
        pump_id: str | None = None,
        ingest_delay: timedelta = timedelta(seconds=1),
    ) -> None:
        self.patient_id = patient_id
        self.start = start
        self.thermometer_id = thermometer_id or f"thermo-{patient_id}"
        self.pump_id = pump_id or f"pump-{patient_id}"
        self.ingest_delay = ingest_delay
        # One counter per device, as the device contract asks (docs/mqtt.md, section 4).
        self._seq: dict[str, int] = {}

    def _next(self, device_id: str) -> tuple[str, int]:
        seq = self._seq[device_id] = self._seq.get(device_id, 0) + 1
        return str(uuid.uuid5(_STREAM_NAMESPACE, f"{device_id}|{seq}")), seq

    def _telemetry(
        self,
        device_id: str,
        channel: str,
        message: object,
        at: datetime,
        temperature_c: float | None = None,
    ) -> Telemetry:
        return Telemetry.model_validate(
            {
                "patient_id": self.patient_id,
                "device_id": device_id,
                "mqtt_topic": f"vigil/v1/dev/{device_id}/{channel}",
                "ingest_time": at + self.ingest_delay,
                "message": message,
                "temperature_c": temperature_c,
            }
        )

    def temp(
        self,
        minutes: float,
        celsius: float,
        *,
        site: TemperatureSite = TemperatureSite.UNKNOWN,
        message_id: str | None = None,
    ) -> Telemetry:
        at = self.start + timedelta(minutes=minutes)
        mid, seq = self._next(self.thermometer_id)
        message = TemperatureReading.model_validate(
            {
                "schema": "vigil.device.temperature.v1",
                "message_id": message_id or mid,
                "device_id": self.thermometer_id,
                "seq": seq,
                "device_time": at,
                "value": celsius,
                "site": site,
            }
        )
        return self._telemetry(self.thermometer_id, "temperature", message, at, celsius)

    def status(
        self,
        minutes: float,
        *,
        state: PumpState = PumpState.RUNNING,
        rate_ml_h: float = 10.0,
        remaining_ml: float = 240.0,
        bag_ml: float | None = 250.0,
        battery_pct: float | None = 80.0,
    ) -> Telemetry:
        at = self.start + timedelta(minutes=minutes)
        mid, seq = self._next(self.pump_id)
        message = PumpStatus.model_validate(
            {
                "schema": "vigil.device.pump_status.v1",
                "message_id": mid,
                "device_id": self.pump_id,
                "seq": seq,
                "device_time": at,
                "state": state,
                "rate_ml_h": rate_ml_h,
                "volume_remaining_ml": remaining_ml,
                "bag_volume_ml": bag_ml,
                "battery_pct": battery_pct,
            }
        )
        return self._telemetry(self.pump_id, "pump-status", message, at)

    def pump_event(
        self, minutes: float, event: PumpEventKind, alarm: PumpAlarmCode | None = None
    ) -> Telemetry:
        at = self.start + timedelta(minutes=minutes)
        mid, seq = self._next(self.pump_id)
        message = PumpEvent.model_validate(
            {
                "schema": "vigil.device.pump_event.v1",
                "message_id": mid,
                "device_id": self.pump_id,
                "seq": seq,
                "device_time": at,
                "event": event,
                "alarm": alarm,
            }
        )
        return self._telemetry(self.pump_id, "pump-event", message, at)

    def alarm(self, minutes: float, code: PumpAlarmCode) -> Telemetry:
        return self.pump_event(minutes, PumpEventKind.ALARM_RAISED, code)

    def clear(self, minutes: float, code: PumpAlarmCode) -> Telemetry:
        return self.pump_event(minutes, PumpEventKind.ALARM_CLEARED, code)


def delivered_at(event: Telemetry, ingest_time: datetime) -> Telemetry:
    """``event`` as it reaches ingest at ``ingest_time`` (a hub forwarding its buffer late)."""
    return event.model_copy(update={"ingest_time": ingest_time})


class Pulse:
    """The pipeline heartbeat as ingest writes it to a partition: the arrival clock of a
    partition where no patient's data arrives."""

    def __init__(
        self,
        start: datetime,
        *,
        device_id: str = "heartbeat-pipeline",
        patient_id: str = "pipeline-team-tech",
    ) -> None:
        self.start = start
        self.device_id = device_id
        self.patient_id = patient_id
        self._seq = 0

    def beat(self, minutes: float) -> Telemetry:
        """A heartbeat that reaches ingest ``minutes`` after ``start`` (sent 1 s before)."""
        self._seq += 1
        ingest = self.start + timedelta(minutes=minutes)
        message = HeartbeatMessage.model_validate(
            {
                "schema": "vigil.device.heartbeat.v1",
                "message_id": uuid.uuid5(_STREAM_NAMESPACE, f"{self.device_id}|{self._seq}"),
                "device_id": self.device_id,
                "seq": self._seq,
                "device_time": ingest - timedelta(seconds=1),
            }
        )
        return Telemetry.model_validate(
            {
                "patient_id": self.patient_id,
                "device_id": self.device_id,
                "mqtt_topic": f"vigil/v1/dev/{self.device_id}/heartbeat",
                "ingest_time": ingest,
                "message": message,
            }
        )

    def every(self, seconds: float, from_minutes: float, to_minutes: float) -> list[Telemetry]:
        """Heartbeats every ``seconds`` from ``from_minutes`` through ``to_minutes``."""
        count = int((to_minutes - from_minutes) * 60 // seconds) + 1
        return [self.beat(from_minutes + i * seconds / 60) for i in range(count)]


def run_stream(engine: RulesEngine, events: Iterable[Telemetry]) -> list[Alert]:
    """Every alert the engine decides over ``events``, in order."""
    alerts: list[Alert] = []
    for event in events:
        alerts += engine.on_telemetry(event)
    return alerts


async def register_fleet(
    conn: Any,
    prefix: str,
    *,
    registered: int,
    active: int,
    teams: int = 20,
    now: datetime,
) -> list[str]:
    """Register ``registered`` patients named ``{prefix}-NNNNNN`` in ``teams`` care teams of
    their own (``{prefix}-team-K``, a protocol each), each with a thermometer and a treatment
    cycle, and one in ten with an override; the first ``active`` are monitored (an open
    binding, a cycle started ten days before ``now``), the rest discharged long ago (binding
    closed 100 days back, cycle 150 days back). Bulk-loaded with COPY; returns the patient ids.
    ``remove_fleet`` takes it all away again (the recorded configs stay: they are append-only).
    """
    team_ids = [f"{prefix}-team-{k}" for k in range(teams)]
    patients = [f"{prefix}-{n:06d}" for n in range(registered)]
    await conn.copy_records_to_table(
        "care_teams",
        records=[(t, t, "fleet@example.org") for t in team_ids],
        columns=["care_team_id", "name", "oncall_email"],
    )
    await conn.copy_records_to_table(
        "rule_protocols",
        records=[(t, 1, '{"fever_single_c": 38.3}', "fleet", now) for t in team_ids],
        columns=["care_team_id", "version", "overrides", "signed_off_by", "signed_off_at"],
    )
    await conn.copy_records_to_table(
        "patients",
        records=[(p, team_ids[n % teams], 20.0 + n % 40) for n, p in enumerate(patients)],
        columns=["patient_id", "care_team_id", "weight_kg"],
    )
    await conn.copy_records_to_table(
        "devices",
        records=[(f"{p}-t", "thermometer") for p in patients],
        columns=["device_id", "kind"],
    )
    day = timedelta(days=1)
    await conn.copy_records_to_table(
        "device_bindings",
        records=[
            (f"{p}-t", p, now - 10 * day, None)
            if n < active
            else (f"{p}-t", p, now - 200 * day, now - 100 * day)
            for n, p in enumerate(patients)
        ],
        columns=["device_id", "patient_id", "valid_from", "valid_to"],
    )
    await conn.copy_records_to_table(
        "patient_cycles",
        records=[(p, now - (10 if n < active else 150) * day, 8) for n, p in enumerate(patients)],
        columns=["patient_id", "cycle_start", "step_up_day"],
    )
    await conn.copy_records_to_table(
        "patient_rule_overrides",
        records=[(p, 1, '{"fever_single_c": 38.5}', "fleet", now) for p in patients[::10]],
        columns=["patient_id", "version", "overrides", "signed_off_by", "signed_off_at"],
    )
    # Planner statistics, as a registry that grew over years has them (autovacuum has not
    # looked at rows loaded a second ago; without them a plan may scan per patient).
    for table in (
        "patients",
        "devices",
        "device_bindings",
        "patient_cycles",
        "patient_rule_overrides",
    ):
        await conn.execute(f"ANALYZE {table}")
    return patients


async def remove_fleet(conn: Any, prefix: str) -> None:
    """Remove what ``register_fleet`` registered under ``prefix``."""
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "-%"
    for table in ("patient_rule_overrides", "patient_cycles", "device_bindings"):
        await conn.execute(f"DELETE FROM {table} WHERE patient_id LIKE $1", like)
    await conn.execute("DELETE FROM devices WHERE device_id LIKE $1", like)
    await conn.execute("DELETE FROM patients WHERE patient_id LIKE $1", like)
    await conn.execute("DELETE FROM rule_protocols WHERE care_team_id LIKE $1", like)
    await conn.execute("DELETE FROM care_teams WHERE care_team_id LIKE $1", like)
