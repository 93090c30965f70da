"""The sensor-fault rule: a temperature outside the plausible range of a body is a faulty
sensor (a probe off the skin, a broken thermometer), never a fever.

Ingest flags such a reading ``implausible_temperature``; the rules apply the same range
(``schemas.device.PLAUSIBLE_MIN_C``/``PLAUSIBLE_MAX_C``, the device contract's) to the value
itself, so a live record, an archived row and a sealed archive day decide alike. The reading
never reaches a fever rule and does not count as a temperature taken; the thermometer's first
implausible reading opens one technical alert, and its next plausible reading is the all clear
(``step``). Pure: no I/O, no clock.
"""

from __future__ import annotations

from schemas.device import PLAUSIBLE_MAX_C, PLAUSIBLE_MIN_C
from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority
from services.rules.domain.absence import Absence, all_clear
from services.rules.domain.alerting import build_alert, evidence, stamp
from services.rules.domain.config import PatientRules
from services.rules.domain.observation import ObservationLike
from services.rules.domain.state import DeviceTrack

SENSOR_FAULT_RULE_ID = "sensor_fault"
SENSOR_FAULT_CODE = "implausible_temperature"
_NOTHING: tuple[Alert, ...] = ()

FAULT = Absence(
    SENSOR_FAULT_RULE_ID,
    SENSOR_FAULT_CODE,
    AlertKind.TECHNICAL,
    AlertPriority.MEDIUM,
    "temperature",
)


def step(
    patient_id: str,
    device: DeviceTrack,
    obs: ObservationLike,
    rules: PatientRules,
    config_version: str,
) -> tuple[Alert, ...]:
    """The rule's step for a temperature of ``device``: its first implausible reading opens
    the fault, its next plausible one ends it. Afterwards ``device.fault_key`` is None exactly
    when the reading is plausible (and goes on to the fever rule)."""
    celsius = obs.temperature_c
    if celsius is None:
        # An archived row of this kind always has its reading; never read one as zero.
        raise ValueError(f"temperature {obs.message_id} without its reading or site")
    if PLAUSIBLE_MIN_C <= celsius <= PLAUSIBLE_MAX_C:
        if device.fault_key is None:
            return _NOTHING
        return (end_fault(patient_id, obs, device, rules, config_version),)
    if device.fault_key is not None:
        return _NOTHING
    device.fault_key = f"{patient_id}:{SENSOR_FAULT_RULE_ID}:{obs.device_id}:{stamp(obs.t)}"
    return (sensor_fault_alert(device.fault_key, obs, rules.rules_version, config_version),)


def plausible(celsius: float | None) -> bool:
    """Whether a reading is a body temperature at all (a missing value is not)."""
    return celsius is not None and PLAUSIBLE_MIN_C <= celsius <= PLAUSIBLE_MAX_C


def sensor_fault_alert(
    dedup_key: str, obs: ObservationLike, rule_version: str, config_version: str
) -> Alert:
    """The start of a sensor-fault episode, decided by its first implausible reading."""
    value = obs.temperature_c
    assert value is not None, "a temperature observation carries its reading"
    high = value > PLAUSIBLE_MAX_C
    limit = PLAUSIBLE_MAX_C if high else PLAUSIBLE_MIN_C
    return build_alert(
        dedup_key=dedup_key,
        phase=AlertPhase.START,
        patient_id=obs.patient_id,
        device_id=obs.device_id,
        kind=AlertKind.TECHNICAL,
        code=SENSOR_FAULT_CODE,
        priority=AlertPriority.MEDIUM,
        title=(
            f"Thermometer reading implausible ({value:.1f} °C, outside "
            f"{PLAUSIBLE_MIN_C:.1f}-{PLAUSIBLE_MAX_C:.1f} °C): sensor fault, not a fever; "
            "the child's temperature is unknown until the probe is checked"
        ),
        device_time=obs.device_time,
        ingest_time=obs.ingest_time,
        evidence=(
            evidence(
                "temperature",
                value,
                limit,
                ">" if high else "<",
                obs.device_time,
                message_id=obs.message_id,
            ),
        ),
        rule_id=SENSOR_FAULT_RULE_ID,
        rule_version=rule_version,
        config_version=config_version,
    )


def end_fault(
    patient_id: str,
    obs: ObservationLike,
    device: DeviceTrack,
    rules: PatientRules,
    config_version: str,
) -> Alert:
    key, device.fault_key = device.fault_key, None
    assert key is not None
    return all_clear(
        FAULT,
        key,
        patient_id,
        obs,
        "All clear: thermometer readings plausible again",
        rules,
        config_version,
        not_before=None,
    )
