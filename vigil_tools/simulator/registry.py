"""Registry rows for a simulated fleet: the care team, patients, devices and bindings. Pure.

The run command inserts these rows so ingest knows the simulated devices; this module only
produces plain data and must not touch the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from vigil_tools.simulator.fleet import patient_id_for, pump_id_for, thermometer_id_for


@dataclass(frozen=True, slots=True)
class CareTeamRow:
    care_team_id: str
    name: str
    oncall_email: str
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class PatientRow:
    patient_id: str
    care_team_id: str
    weight_kg: float | None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device_id: str
    kind: Literal["thermometer", "pump"]
    model: str


@dataclass(frozen=True, slots=True)
class BindingRow:
    device_id: str
    patient_id: str
    valid_from: datetime
    valid_to: datetime | None = None


@dataclass(frozen=True, slots=True)
class FleetRegistry:
    """The registry rows (care team, patients, devices, bindings) a simulated fleet needs."""

    care_team: CareTeamRow
    patients: tuple[PatientRow, ...]
    devices: tuple[DeviceRow, ...]
    bindings: tuple[BindingRow, ...]


#: Bindings start here, the earliest device time the contract accepts, so every simulated
#: message, whatever its time, falls inside its device's binding.
REGISTRY_VALID_FROM = datetime(2000, 1, 1, tzinfo=UTC)


def fleet_registry(
    n_patients: int,
    care_team_id: str,
    oncall_email: str,
    *,
    care_team_name: str = "Simulated care team",
    valid_from: datetime = REGISTRY_VALID_FROM,
    first_patient: int = 1,
) -> FleetRegistry:
    """Rows that register a fleet of ``n_patients`` with one care team. Plain data, no I/O.

    ``first_patient`` must match the fleet's (``SimulatorSettings.first_patient``).
    """
    if n_patients < 1:
        raise ValueError("the fleet needs at least one patient")
    patients: list[PatientRow] = []
    devices: list[DeviceRow] = []
    bindings: list[BindingRow] = []
    for number in range(first_patient, first_patient + n_patients):
        patient_id = patient_id_for(number)
        # Weights spread over 12-60 kg so that weight-aware rules (no 7-day bag under 22 kg)
        # see both sides of their limits; a fixed formula keeps the registry reproducible.
        weight = round(12.0 + (number * 7.3) % 48.0, 1)
        patients.append(PatientRow(patient_id, care_team_id, weight))
        for device in (
            DeviceRow(thermometer_id_for(patient_id), "thermometer", "vigil-sim thermometer"),
            DeviceRow(pump_id_for(patient_id), "pump", "vigil-sim ambulatory pump"),
        ):
            devices.append(device)
            bindings.append(BindingRow(device.device_id, patient_id, valid_from))
    return FleetRegistry(
        care_team=CareTeamRow(care_team_id, care_team_name, oncall_email),
        patients=tuple(patients),
        devices=tuple(devices),
        bindings=tuple(bindings),
    )
