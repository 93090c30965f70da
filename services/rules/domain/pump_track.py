"""PumpTrack: what the rules remember about one pump, and the technical alerts of its rules.

Shared by the pump rules (``domain/pump.py``: alarms, the 7-day-bag weight check) and the
infusion clocks (``domain/infusion.py``: bag at risk, interruption), which read and change the
same record. The engine owns the records and times the clocks' deadlines. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, Evidence
from services.rules.domain.alerting import at, build_alert
from services.rules.domain.config import PatientRules
from services.rules.domain.instant import NEVER, Instant, never_if_none
from services.rules.domain.observation import ObservationLike


class RaisedAlarm(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """An alarm the pump raised and has not cleared: its episode's dedup key and when it was
    raised. In a state record it is the array ``[key, raised_at]``."""

    key: str
    raised_at: float


@dataclass(slots=True)
class PumpTrack:
    """What the rules remember about one pump; encoded and decoded by ``msgspec`` as part of
    its patient's state record (``null`` for a time that has not happened: ``Instant``)."""

    accumulated_s: float = 0.0
    # code -> the raised alarm; code -> last cleared at; code -> raised-but-inhibited at.
    # Created on a pump's first alarm: most pumps never raise one, and an empty dict per
    # pump is most of a pump's memory.
    alarms: dict[str, RaisedAlarm] | None = None
    bag_due_fired: str | None = None
    bag_due_key: str | None = None
    bag_key: str | None = None
    # The status time whose prediction was found stale at its deadline; a newer status
    # makes a new prediction.
    bag_skipped_for: float | None = None
    bag_t: Instant = NEVER
    # Armed deadlines of this pump's clocks (the engine times them): fields here rather than a
    # (kind, device) -> deadline dict per patient, which cost more than the pump itself.
    bag_timer_at: float | None = None
    cleared: dict[str, float] | None = None
    flowing: bool | None = None
    inhibited: dict[str, float] | None = None
    int_ingest_t: float = 0.0
    int_key: str | None = None
    int_level: int = 0
    int_timer_at: float | None = None
    rate: float = 0.0
    remaining: float = 0.0
    resumed_at: float | None = None
    state_t: Instant = NEVER
    status_ingest_t: float = 0.0
    status_t: Instant = NEVER
    stopped_since: float | None = None
    underweight_key: str | None = None

    def __post_init__(self) -> None:
        self.bag_t = never_if_none(self.bag_t)
        self.state_t = never_if_none(self.state_t)
        self.status_t = never_if_none(self.status_t)


def pump_alert(
    obs_patient: str,
    device_id: str,
    *,
    dedup_key: str,
    phase: AlertPhase,
    code: str,
    priority: AlertPriority,
    title: str,
    t: float,
    ingest_t: float,
    found: tuple[Evidence, ...],
    rule_id: str,
    rules: PatientRules,
    config_version: str | None,
) -> Alert:
    return build_alert(
        dedup_key=dedup_key,
        phase=phase,
        patient_id=obs_patient,
        device_id=device_id,
        kind=AlertKind.TECHNICAL,
        code=code,
        priority=priority,
        title=title,
        device_time=at(t),
        ingest_time=at(ingest_t),
        evidence=found,
        rule_id=rule_id,
        rule_version=rules.rules_version,
        config_version=config_version,
    )


def pump_all_clear(
    obs: ObservationLike,
    key: str,
    *,
    code: str,
    title: str,
    rule_id: str,
    rules: PatientRules,
    config_version: str | None,
    found: tuple[Evidence, ...] = (),
) -> Alert:
    """The end of an episode, decided by the pump status or event ``obs``."""
    return pump_alert(
        obs.patient_id,
        obs.device_id,
        dedup_key=key,
        phase=AlertPhase.END,
        code=code,
        priority=AlertPriority.INFO,
        title=title,
        t=obs.t,
        ingest_t=obs.ingest_t,
        found=found,
        rule_id=rule_id,
        rules=rules,
        config_version=config_version,
    )
