"""The sensor-fault rule: a temperature outside the plausible range of a body is a faulty
sensor (a probe off the skin, a broken thermometer), never a fever.

Ingest flags such a reading ``implausible_temperature``; the rules apply the same range
(``schemas.device.PLAUSIBLE_MIN_C``/``PLAUSIBLE_MAX_C``, the device contract's) to the value
itself, so a live record, an archived row and a sealed archive day decide alike. The reading
never reaches a fever rule and does not count as a temperature taken; the thermometer's first
implausible reading opens one technical alert, and its next plausible reading is the all clear.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from schemas.device import PLAUSIBLE_MAX_C, PLAUSIBLE_MIN_C
from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority
from services.rules.domain.alerting import build_alert, evidence
from services.rules.domain.observation import ObservationLike

SENSOR_FAULT_RULE_ID = "sensor_fault"
SENSOR_FAULT_CODE = "implausible_temperature"


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
