"""A synthetic treatment course, deterministic to the byte, for replay tests and benchmarks.

One patient's 28-day home infusion as ingest would have published it: a thermometer reading
every ``reading_every`` and a pump status every ``status_every``, with scripted episodes (a
sustained low-grade fever, a single spike, a critical fever, a paused pump) so a replay has
decisions to reproduce. Message ids are derived from the patient and sequence number, so two
calls build the same stream. Nothing here is used by a running service.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.events import Telemetry

_NAMESPACE = uuid.UUID("7d0c9b8e-3f52-4a7b-8f0e-2b1c5d6e7f80")


@dataclass(frozen=True, slots=True)
class FeverEpisode:
    """Temperatures raised to ``peak_c`` from ``start`` (offset into the course) for ``length``."""

    start: timedelta
    length: timedelta
    peak_c: float


@dataclass(frozen=True, slots=True)
class PumpPause:
    start: timedelta
    length: timedelta


DEFAULT_FEVERS = (
    FeverEpisode(timedelta(days=1, hours=20), timedelta(minutes=100), 38.1),  # sustained
    FeverEpisode(timedelta(days=8, hours=3), timedelta(minutes=25), 38.6),  # single reading
    FeverEpisode(timedelta(days=15, hours=14), timedelta(hours=3), 39.7),  # critical
)
DEFAULT_PAUSES = (PumpPause(timedelta(days=5, hours=2), timedelta(minutes=50)),)


def _baseline(minute: float) -> float:
    # A gentle daily rhythm around 36.9 °C, in 0.1 °C steps like a home thermometer.
    return round(36.9 + 0.25 * math.sin(2 * math.pi * minute / 1440.0), 1)


def course(
    patient_id: str,
    start: datetime,
    *,
    days: float = 28,
    reading_every: timedelta = timedelta(minutes=5),
    status_every: timedelta = timedelta(minutes=15),
    fevers: Iterable[FeverEpisode] = DEFAULT_FEVERS,
    pauses: Iterable[PumpPause] = DEFAULT_PAUSES,
    ingest_delay: timedelta = timedelta(seconds=2),
    thermometer_id: str | None = None,
    pump_id: str | None = None,
) -> list[Telemetry]:
    """The course's telemetry in device-time order (thermometer before pump at equal times)."""
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    thermometer = thermometer_id or f"th-{patient_id}"
    pump = pump_id or f"pu-{patient_id}"
    fevers = tuple(fevers)
    pauses = tuple(pauses)
    end = timedelta(days=days)
    events: list[tuple[timedelta, int, Telemetry]] = []
    seq = 0

    def message_id(device: str, number: int) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{device}|{number}"))

    offset = timedelta(0)
    while offset < end:
        seq += 1
        minute = offset.total_seconds() / 60
        value = _baseline(minute)
        for fever in fevers:
            if fever.start <= offset < fever.start + fever.length:
                value = fever.peak_c
        at = start + offset
        events.append(
            (
                offset,
                0,
                Telemetry.model_validate(
                    {
                        "patient_id": patient_id,
                        "device_id": thermometer,
                        "mqtt_topic": f"vigil/v1/dev/{thermometer}/temperature",
                        "ingest_time": at + ingest_delay,
                        "message": {
                            "schema": "vigil.device.temperature.v1",
                            "message_id": message_id(thermometer, seq),
                            "device_id": thermometer,
                            "seq": seq,
                            "device_time": at,
                            "value": value,
                            "unit": "C",
                            "site": "axillary",
                        },
                        "temperature_c": value,
                    }
                ),
            )
        )
        offset += reading_every

    offset = timedelta(0)
    pump_seq = 0
    bag_ml = 250.0
    while offset < end:
        pump_seq += 1
        paused = any(p.start <= offset < p.start + p.length for p in pauses)
        hours_into_bag = (offset.total_seconds() / 3600) % 24
        at = start + offset
        events.append(
            (
                offset,
                1,
                Telemetry.model_validate(
                    {
                        "patient_id": patient_id,
                        "device_id": pump,
                        "mqtt_topic": f"vigil/v1/dev/{pump}/pump-status",
                        "ingest_time": at + ingest_delay,
                        "message": {
                            "schema": "vigil.device.pump_status.v1",
                            "message_id": message_id(pump, pump_seq),
                            "device_id": pump,
                            "seq": pump_seq,
                            "device_time": at,
                            "state": "paused" if paused else "running",
                            "rate_ml_h": 10.0,
                            "volume_remaining_ml": round(bag_ml - 10.0 * hours_into_bag, 1),
                            "bag_volume_ml": bag_ml,
                            "battery_pct": 90.0,
                        },
                    }
                ),
            )
        )
        offset += status_every
    events.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in events]
