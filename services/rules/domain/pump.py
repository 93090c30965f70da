"""Pump rules: forwarded pump alarms and the 7-day-bag weight check; the step of a pump's
status or event, which also moves the infusion clocks (``domain/infusion.py``).

``PumpAlarmRule``: an ``alarm_raised`` pages at the priority the protocol maps the alarm to; the
pump's ``alarm_cleared`` ends it with an all clear. A stopped or paused pump inhibits its own
reservoir-low alarm (the bag is not emptying, and the interruption clock is already the page).
A stopping alarm stops the interruption clock's flow.

``SevenDayBagProfile``: a pump programmed at the 7-day-bag rate (0.6 mL/h) for a patient under
22 kg (benzyl alcohol) is an alert while the programme stays.

``step`` folds one pump status or event into the pump's ``PumpTrack`` (in place) and returns
the alerts it decides; ``refresh_running_status`` is its common case on its own (a running
pump's routine status), which the engine tries first. Pure: no I/O, no clock.
"""

from __future__ import annotations

from schemas.device import PumpAlarmCode, PumpEventKind, PumpState
from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority
from services.rules.domain.alerting import build_alert, evidence, stamp
from services.rules.domain.config import PatientRules
from services.rules.domain.infusion import BAG_RULE_ID as BAG_RULE_ID
from services.rules.domain.infusion import INTERRUPTION_RULE_ID as INTERRUPTION_RULE_ID
from services.rules.domain.infusion import new_bag, set_flowing
from services.rules.domain.instant import NEVER
from services.rules.domain.observation import ObservationLike
from services.rules.domain.pump_track import PumpTrack, RaisedAlarm, pump_alert, pump_all_clear

ALARM_RULE_ID = "pump_alarm"
PROFILE_RULE_ID = "seven_day_bag_weight"

# Alarms after which the drug is no longer flowing: they start the interruption clock.
STOPPING_ALARMS = frozenset(
    {
        PumpAlarmCode.OCCLUSION_UPSTREAM.value,
        PumpAlarmCode.OCCLUSION_DOWNSTREAM.value,
        PumpAlarmCode.AIR_IN_LINE.value,
        PumpAlarmCode.RESERVOIR_EMPTY.value,
        PumpAlarmCode.PUMP_ERROR.value,
        PumpAlarmCode.DOOR_OPEN.value,
        PumpAlarmCode.BATTERY_DEPLETED.value,
        PumpAlarmCode.INFUSION_STOPPED.value,
    }
)
# Alarms a not-flowing pump inhibits: they warn about a bag that is emptying.
INHIBITED_WHEN_STOPPED = frozenset({PumpAlarmCode.RESERVOIR_LOW.value})


def _alarm_alert(
    obs: ObservationLike,
    key: str,
    *,
    phase: AlertPhase,
    priority: AlertPriority,
    title: str,
    value: float,
    comparator: str,
    rules: PatientRules,
    config_version: str | None,
) -> Alert:
    """A forwarded pump alarm (raised or cleared), with the alarm as its evidence. Its times
    are the event's own, as received (``_alert`` gives a time as UTC)."""
    code = obs.alarm or ""
    found = (
        evidence(
            f"pump_alarm_{code}",
            value,
            1.0,
            comparator,
            obs.device_time,
            unit="1",
            message_id=obs.message_id,
        ),
    )
    return build_alert(
        dedup_key=key,
        phase=phase,
        patient_id=obs.patient_id,
        device_id=obs.device_id,
        kind=AlertKind.TECHNICAL,
        code=f"pump_{code}",
        priority=priority,
        title=title,
        device_time=obs.device_time,
        ingest_time=obs.ingest_time,
        evidence=found,
        rule_id=ALARM_RULE_ID,
        rule_version=rules.rules_version,
        config_version=config_version,
    )


def refresh_running_status(track: PumpTrack, obs: ObservationLike) -> bool:
    """Apply a routine status of a running pump that changes nothing but the volume left
    (same rate, same bag, still running, newest); False when the full rule must look at it
    (which also refuses a status without its volume)."""
    remaining = obs.volume_remaining_ml
    if (
        obs.event
        or remaining is None
        or obs.t < track.status_t
        or track.flowing is not True
        or obs.pump_state != "running"
        or obs.rate_ml_h != track.rate
        or remaining > track.remaining + 1.0
        or track.bag_key is None
        or obs.t < track.state_t
    ):
        return False
    track.status_t = track.state_t = obs.t
    track.status_ingest_t = obs.ingest_t
    track.remaining = remaining
    return True


def step(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    """Fold one pump status or pump event into ``track``; return the alerts decided."""
    if obs.event:
        return _fold_event(track, obs, rules, config_version)
    return _fold_status(track, obs, rules, config_version)


def _fold_status(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    rate, remaining, state = obs.rate_ml_h, obs.volume_remaining_ml, obs.pump_state
    if rate is None or remaining is None or state is None:
        raise ValueError(f"pump status {obs.message_id} without its rate, volume or state")
    t = obs.t
    if t < track.status_t:
        # An older status describes a past the newer one already replaced.
        return []
    alerts: list[Alert] = []
    previous_remaining = track.remaining if track.status_t > NEVER else None
    track.status_t = t
    track.status_ingest_t = obs.ingest_t
    track.rate = rate
    track.remaining = remaining
    # A bag hung without a bag_changed event shows as volume going up.
    if track.bag_key is None or (
        previous_remaining is not None and remaining > previous_remaining + 1.0
    ):
        alerts += new_bag(track, obs, rules, config_version)
    flowing = state == PumpState.RUNNING.value and rate > 0
    alerts += set_flowing(track, flowing, obs, rules, config_version)
    alerts += _check_profile(track, obs, rate, rules, config_version)
    return alerts


def _fold_event(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    kind = obs.event
    if kind == PumpEventKind.ALARM_RAISED.value:
        return _raise_alarm(track, obs, rules, config_version)
    if kind == PumpEventKind.ALARM_CLEARED.value:
        return _clear_alarm(track, obs, rules, config_version)
    if kind == PumpEventKind.INFUSION_STARTED.value:
        return set_flowing(track, True, obs, rules, config_version)
    if kind in (PumpEventKind.INFUSION_PAUSED.value, PumpEventKind.INFUSION_STOPPED.value):
        return set_flowing(track, False, obs, rules, config_version)
    if kind == PumpEventKind.BAG_CHANGED.value:
        return new_bag(track, obs, rules, config_version)
    return []


def _raise_alarm(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    code, t = obs.alarm or "", obs.t
    alerts: list[Alert] = []
    if track.alarms is None or track.cleared is None or track.inhibited is None:
        track.alarms, track.cleared, track.inhibited = {}, {}, {}
    if code in STOPPING_ALARMS:
        alerts += set_flowing(track, False, obs, rules, config_version)
    if code in track.alarms or code in track.inhibited:
        return alerts  # the same alarm again, or a redelivery: one page per alarm
    if track.cleared.get(code, NEVER) >= t:
        return alerts  # arrived late, after its own all clear: already over
    if code in INHIBITED_WHEN_STOPPED and track.flowing is False:
        track.inhibited[code] = t
        return alerts
    key = f"{obs.patient_id}:{ALARM_RULE_ID}:{obs.device_id}:{code}:{stamp(t)}"
    track.alarms[code] = RaisedAlarm(key, t)
    alerts.append(
        _alarm_alert(
            obs,
            key,
            phase=AlertPhase.START,
            priority=rules.pump_alarm_priorities.get(code, AlertPriority.MEDIUM),
            title=f"Pump alarm: {code.replace('_', ' ')}",
            value=1.0,
            comparator="==",
            rules=rules,
            config_version=config_version,
        )
    )
    return alerts


def _clear_alarm(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    code, t = obs.alarm or "", obs.t
    if track.alarms is None or track.cleared is None or track.inhibited is None:
        track.alarms, track.cleared, track.inhibited = {}, {}, {}
    if t > track.cleared.get(code, NEVER):
        track.cleared[code] = t
    inhibited_at = track.inhibited.get(code)
    if inhibited_at is not None and inhibited_at <= t:
        del track.inhibited[code]
    opened = track.alarms.get(code)
    if opened is None or opened.raised_at > t:
        return []
    del track.alarms[code]
    return [
        _alarm_alert(
            obs,
            opened.key,
            phase=AlertPhase.END,
            priority=AlertPriority.INFO,
            title=f"All clear: pump {code.replace('_', ' ')} cleared",
            value=0.0,
            comparator="<",
            rules=rules,
            config_version=config_version,
        )
    ]


def _check_profile(
    track: PumpTrack,
    obs: ObservationLike,
    rate: float,
    rules: PatientRules,
    config_version: str | None,
) -> list[Alert]:
    """The 7-day bag rule, for a pump status programmed at ``rate``."""
    seven_day = abs(rate - rules.seven_day_rate) <= rules.seven_day_tolerance
    weight = rules.weight_kg
    if seven_day and weight is not None and weight < rules.seven_day_min_weight_kg:
        if track.underweight_key is not None:
            return []
        track.underweight_key = f"{obs.patient_id}:{PROFILE_RULE_ID}:{obs.device_id}:{stamp(obs.t)}"
        return [
            pump_alert(
                obs.patient_id,
                obs.device_id,
                dedup_key=track.underweight_key,
                phase=AlertPhase.START,
                code="seven_day_bag_underweight",
                priority=AlertPriority.HIGH,
                title=(
                    f"7-day bag rate ({rate:g} mL/h) programmed for a {weight:g} kg "
                    f"patient: contains benzyl alcohol, not for patients under "
                    f"{rules.seven_day_min_weight_kg:g} kg"
                ),
                t=obs.t,
                ingest_t=obs.ingest_t,
                found=(
                    evidence(
                        "weight_kg",
                        weight,
                        rules.seven_day_min_weight_kg,
                        "<",
                        obs.device_time,
                        unit="kg",
                    ),
                    evidence(
                        "rate_ml_h",
                        rate,
                        rules.seven_day_rate,
                        "==",
                        obs.device_time,
                        unit="mL/h",
                        message_id=obs.message_id,
                    ),
                ),
                rule_id=PROFILE_RULE_ID,
                rules=rules,
                config_version=config_version,
            )
        ]
    if not seven_day and track.underweight_key is not None:
        key, track.underweight_key = track.underweight_key, None
        return [
            pump_all_clear(
                obs,
                key,
                code="seven_day_bag_underweight",
                title=f"All clear: pump no longer at the 7-day bag rate ({rate:g} mL/h)",
                rule_id=PROFILE_RULE_ID,
                rules=rules,
                config_version=config_version,
            )
        ]
    return []
