"""The absence rules: a device silent, a fever unobserved; the shape of an absence's alerts.

A device is silent when nothing from it has *arrived* for its limit (``DeviceTrack.heard_t``
plus ``rules.silent_s``), whatever device times its messages carry; a fever is unobserved when
an episode is open and no plausible temperature has arrived for ``rules.unobserved_s``. Both run
on the arrival clock, on the engine's timer wheel (docs/rules.md, "Time").

``end_silence`` is the silence rule's step for a message of a device whose silence is open
(any message that arrives ends it: the device or its hub is reaching us, even with an old
reading from its buffer; the engine notes every message's arrival on the device's record and
calls it only then). ``start_silence``/``start_unobserved`` are what a timer decides at its
deadline, ``end_unobserved`` what a temperature that arrives decides.
``absence_alert`` and ``all_clear`` are the alerts' shape, shared with the sensor-fault rule.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import NamedTuple

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority
from services.rules.domain.alerting import at, build_alert, evidence, stamp
from services.rules.domain.config import PatientRules
from services.rules.domain.observation import ObservationLike
from services.rules.domain.state import DeviceTrack, PatientTrack

SILENCE_RULE_ID = "device_silent"
UNOBSERVED_RULE_ID = "fever_unobserved"


class Absence(NamedTuple):
    """A rule that pages when data stops coming: what its alerts say, start and all clear."""

    rule_id: str
    code: str
    kind: AlertKind
    priority: AlertPriority
    measure: str  # the evidence: minutes since the last data of this kind


SILENCE = Absence(
    SILENCE_RULE_ID,
    "device_silent",
    AlertKind.TECHNICAL,
    AlertPriority.MEDIUM,
    "minutes_since_last_message",
)
UNOBSERVED = Absence(
    UNOBSERVED_RULE_ID,
    "fever_unobserved",
    AlertKind.PHYSIOLOGICAL,
    AlertPriority.HIGH,
    "minutes_since_last_temperature",
)


def start_silence(
    patient_id: str,
    device_id: str,
    device: DeviceTrack,
    deadline: float,
    limit: float,
    rules: PatientRules,
    config_version: str,
) -> Alert:
    device.silent_key = f"{patient_id}:{SILENCE_RULE_ID}:{device_id}:{stamp(device.heard_t)}"
    device.silent_at = deadline
    what = "Thermometer" if device.is_thermometer else "Infusion pump"
    title = f"{what} silent for {int(limit // 60)} min: no data, no clinical decisions"
    priority = rules.silent_priority(device_id, device.is_thermometer)
    return absence_alert(
        SILENCE if priority is SILENCE.priority else SILENCE._replace(priority=priority),
        device.silent_key,
        patient_id,
        device_id,
        title,
        rules,
        config_version,
        deadline=deadline,
        minutes=limit / 60,
        last_t=device.last_t,
        ingest_t=device.heard_t,
    )


def end_silence(
    patient_id: str,
    obs: ObservationLike,
    device: DeviceTrack,
    rules: PatientRules,
    config_version: str,
) -> Alert:
    key, device.silent_key = device.silent_key, None
    since, device.silent_at = device.silent_at, None
    assert key is not None
    return all_clear(
        SILENCE,
        key,
        patient_id,
        obs,
        "All clear: device reporting again",
        rules,
        config_version,
        not_before=since,
    )


def start_unobserved(
    patient_id: str,
    patient: PatientTrack,
    deadline: float,
    rules: PatientRules,
    config_version: str,
) -> Alert:
    episode = patient.fever.episode_key
    patient.unobserved_key = f"{episode}:{UNOBSERVED_RULE_ID}:{stamp(patient.temp_heard_t)}"
    patient.unobserved_at = deadline
    minutes = rules.unobserved_s(patient.thermometer_id) / 60
    title = f"Fever open and no temperature for {int(minutes)} min"
    return absence_alert(
        UNOBSERVED,
        patient.unobserved_key,
        patient_id,
        patient.thermometer_id,
        title,
        rules,
        config_version,
        deadline=deadline,
        minutes=minutes,
        last_t=patient.fever.newest,
        ingest_t=patient.temp_heard_t,
    )


def end_unobserved(
    patient_id: str,
    obs: ObservationLike,
    patient: PatientTrack,
    rules: PatientRules,
    config_version: str,
) -> Alert:
    key, patient.unobserved_key = patient.unobserved_key, None
    since, patient.unobserved_at = patient.unobserved_at, None
    assert key is not None
    return all_clear(
        UNOBSERVED,
        key,
        patient_id,
        obs,
        "All clear: temperature readings again",
        rules,
        config_version,
        not_before=since,
    )


def absence_alert(
    rule: Absence,
    key: str,
    patient_id: str,
    device_id: str,
    title: str,
    rules: PatientRules,
    config_version: str,
    *,
    deadline: float,
    minutes: float,
    last_t: float,
    ingest_t: float,
) -> Alert:
    """The page that data stopped coming: decided at ``deadline``, ``minutes`` after the
    last data (at ``last_t``, whose ingest time it carries)."""
    return build_alert(
        dedup_key=key,
        phase=AlertPhase.START,
        patient_id=patient_id,
        device_id=device_id,
        kind=rule.kind,
        code=rule.code,
        priority=rule.priority,
        title=title,
        device_time=at(deadline),
        ingest_time=at(ingest_t),
        evidence=(evidence(rule.measure, minutes, minutes, ">=", at(last_t), unit="min"),),
        rule_id=rule.rule_id,
        rule_version=rules.rules_version,
        config_version=config_version,
    )


def all_clear(
    rule: Absence,
    key: str,
    patient_id: str,
    obs: ObservationLike,
    title: str,
    rules: PatientRules,
    config_version: str,
    *,
    not_before: float | None,
) -> Alert:
    """The end of an absence, decided by the data that came again (``obs``), with the
    times it carries as received; never dated before the alert it ends (``not_before``):
    an old reading from a hub's buffer ends a silence when it arrives, not when it was
    taken."""
    device_time = obs.device_time
    if not_before is not None and obs.t < not_before:
        device_time = at(not_before)
    return build_alert(
        dedup_key=key,
        phase=AlertPhase.END,
        patient_id=patient_id,
        device_id=obs.device_id,
        kind=rule.kind,
        code=rule.code,
        priority=AlertPriority.INFO,
        title=title,
        device_time=device_time,
        ingest_time=obs.ingest_time,
        evidence=(),
        rule_id=rule.rule_id,
        rule_version=rules.rules_version,
        config_version=config_version,
    )
