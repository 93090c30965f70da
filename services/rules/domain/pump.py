"""Pump rules: forwarded pump alarms, the infusion clocks, and the 7-day-bag weight check.

``PumpAlarmRule``: an ``alarm_raised`` pages at the priority the protocol maps the alarm to; the
pump's ``alarm_cleared`` ends it with an all clear. A stopped or paused pump inhibits its own
reservoir-low alarm (the bag is not emptying, and the interruption clock is already the page).

``InfusionClocks``:
- the *bag clock* predicts the bag-empty time from the newest status (remaining volume / rate)
  and pages "bag change due" ``bag_change_lead`` before it, ahead of the pump's own low-volume
  alarm. It is not computed from stale data: at the deadline the pump must have reported within
  its silence limit, otherwise the device-silent alert speaks instead.
- the *interruption clock* accumulates the time the drug is not flowing (stopped, paused or a
  stopping alarm). It pages at ``interruption_page`` (30 min), escalates to high priority at
  ``interruption_escalate`` (2 h), both well before the 4-hour supervised-restart limit. A
  restart shorter than the resume grace does not reset the accumulated time.

``SevenDayBagProfile``: a pump programmed at the 7-day-bag rate (0.6 mL/h) for a patient under
22 kg (benzyl alcohol) is an alert while the programme stays.

Everything here is pure: the state is a per-pump record (``PumpTrack``) the engine owns; clock
deadlines are computed here and *timed* by the engine on its event-time watermark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from schemas.device import PumpAlarmCode, PumpEventKind, PumpState
from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, Evidence
from services.rules.domain.alerting import at, build_alert, evidence, stamp
from services.rules.domain.config import PatientRules
from services.rules.domain.instant import NEVER, Instant, never_if_none
from services.rules.domain.observation import ObservationLike

ALARM_RULE_ID = "pump_alarm"
BAG_RULE_ID = "bag_clock"
INTERRUPTION_RULE_ID = "interruption_clock"
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


def _alert(
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


def _all_clear(
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
    return _alert(
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


def fold_pump(
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
        alerts += _new_bag(track, obs, rules, config_version)
    flowing = state == PumpState.RUNNING.value and rate > 0
    alerts += _set_flowing(track, flowing, obs, rules, config_version)
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
        return _set_flowing(track, True, obs, rules, config_version)
    if kind in (PumpEventKind.INFUSION_PAUSED.value, PumpEventKind.INFUSION_STOPPED.value):
        return _set_flowing(track, False, obs, rules, config_version)
    if kind == PumpEventKind.BAG_CHANGED.value:
        return _new_bag(track, obs, rules, config_version)
    return []


def _raise_alarm(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    code, t = obs.alarm or "", obs.t
    alerts: list[Alert] = []
    if track.alarms is None or track.cleared is None or track.inhibited is None:
        track.alarms, track.cleared, track.inhibited = {}, {}, {}
    if code in STOPPING_ALARMS:
        alerts += _set_flowing(track, False, obs, rules, config_version)
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


def _new_bag(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    track.bag_key = stamp(obs.t)
    track.bag_t = obs.t
    track.bag_due_fired = None
    if track.bag_due_key is None:
        return []
    key, track.bag_due_key = track.bag_due_key, None
    return [
        _all_clear(
            obs,
            key,
            code="bag_change_due",
            title="All clear: new bag hung",
            rule_id=BAG_RULE_ID,
            rules=rules,
            config_version=config_version,
        )
    ]


def _set_flowing(
    track: PumpTrack,
    flowing: bool,
    obs: ObservationLike,
    rules: PatientRules,
    config_version: str | None,
) -> list[Alert]:
    t = obs.t
    if t < track.state_t:
        return []
    track.state_t = t
    was = track.flowing
    track.flowing = flowing
    if not flowing:
        if track.stopped_since is None:
            within_grace = (
                track.resumed_at is not None and t - track.resumed_at < rules.interruption_grace_s
            )
            if not within_grace:
                track.accumulated_s = 0.0
            track.stopped_since = t
            track.int_key = f"{obs.patient_id}:{INTERRUPTION_RULE_ID}:{obs.device_id}:{stamp(t)}"
            track.int_level = 0
            track.int_ingest_t = obs.ingest_t
        return []
    if was is False and track.stopped_since is not None:
        stopped_for = t - track.stopped_since
        track.accumulated_s += stopped_for
        track.stopped_since = None
        track.resumed_at = t
        key, level = track.int_key, track.int_level
        track.int_key, track.int_level = None, 0
        if key is not None and level > 0:
            return [
                _all_clear(
                    obs,
                    key,
                    code="infusion_interrupted",
                    title=(
                        f"All clear: infusion running again after "
                        f"{int(track.accumulated_s // 60)} min interrupted"
                    ),
                    found=(
                        evidence(
                            "interrupted_minutes",
                            round(track.accumulated_s / 60, 2),
                            rules.interruption_limit_s / 60,
                            "<",
                            obs.device_time,
                            unit="min",
                        ),
                    ),
                    rule_id=INTERRUPTION_RULE_ID,
                    rules=rules,
                    config_version=config_version,
                )
            ]
    return []


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
            _alert(
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
            _all_clear(
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


# --- clocks: deadlines computed here, timed by the engine -------------------------------------


def predicted_empty(track: PumpTrack) -> float | None:
    if not track.flowing or track.rate <= 0 or track.status_t < track.bag_t:
        # No status since the bag was hung: the volume left is not known yet.
        return None
    return track.status_t + track.remaining / track.rate * 3600.0


def bag_due_deadline(track: PumpTrack, rules: PatientRules) -> float | None:
    if track.bag_due_key is not None or track.bag_due_fired == track.bag_key:
        return None
    if track.bag_skipped_for == track.status_t:
        return None
    empty = predicted_empty(track)
    # Whole seconds: a prediction that moves by float noise from status to status must not
    # re-arm the timer each time.
    return None if empty is None else float(math.ceil(empty - rules.bag_change_lead_s))


def fire_bag_due(
    track: PumpTrack,
    deadline: float,
    patient_id: str,
    device_id: str,
    rules: PatientRules,
    config_version: str | None,
) -> list[Alert]:
    empty = predicted_empty(track)
    if empty is None or track.bag_due_key is not None:
        return []
    if deadline - track.status_t > rules.pump_silent_s:
        # The prediction is older than the pump's silence limit: stale data pages no one.
        track.bag_skipped_for = track.status_t
        return []
    track.bag_due_fired = track.bag_key
    track.bag_due_key = f"{patient_id}:{BAG_RULE_ID}:{device_id}:{track.bag_key}"
    # The time left is counted from a device time the evidence names: the deadline, or the
    # newest status when it is later than the deadline (data that arrived after the deadline
    # had passed: less time left than the lead). The title carries no relative time and no
    # clock time: a page is read later than it is decided, and clock times are shown in the
    # care team's zone by whoever renders them.
    as_of = max(deadline, track.status_t)
    minutes_left = max(0.0, (empty - as_of) / 60)
    return [
        _alert(
            patient_id,
            device_id,
            dedup_key=track.bag_due_key,
            phase=AlertPhase.START,
            code="bag_change_due",
            priority=AlertPriority.MEDIUM,
            title="Bag at risk of running dry: no new bag recorded",
            t=deadline,
            ingest_t=track.status_ingest_t,
            found=(
                evidence(
                    "minutes_to_empty",
                    round(minutes_left, 2),
                    rules.bag_change_lead_s / 60,
                    "<=",
                    at(as_of),
                    unit="min",
                ),
                evidence(
                    "volume_remaining_ml", track.remaining, 0.0, ">", at(track.status_t), unit="mL"
                ),
                evidence("rate_ml_h", track.rate, 0.0, ">", at(track.status_t), unit="mL/h"),
            ),
            rule_id=BAG_RULE_ID,
            rules=rules,
            config_version=config_version,
        )
    ]


def interruption_deadline(track: PumpTrack, rules: PatientRules) -> float | None:
    if track.stopped_since is None:
        return None
    if track.int_level == 0:
        threshold = rules.interruption_page_s
    elif track.int_level == 1:
        threshold = rules.interruption_escalate_s
    else:
        return None
    return track.stopped_since + max(0.0, threshold - track.accumulated_s)


def fire_interruption(
    track: PumpTrack,
    deadline: float,
    patient_id: str,
    device_id: str,
    rules: PatientRules,
    config_version: str | None,
) -> list[Alert]:
    if track.stopped_since is None or track.int_key is None:
        return []
    interrupted = track.accumulated_s + (deadline - track.stopped_since)
    limit_min = rules.interruption_limit_s / 60
    left = int((rules.interruption_limit_s - interrupted) // 60)
    if track.int_level == 0:
        track.int_level = 1
        phase, priority, limit = AlertPhase.START, AlertPriority.MEDIUM, rules.interruption_page_s
        title = (
            f"Infusion interrupted {int(interrupted // 60)} min: supervised restart needed "
            f"at {limit_min:g} min ({left} min left)"
        )
    else:
        track.int_level = 2
        phase, priority = AlertPhase.ESCALATE, AlertPriority.HIGH
        limit = rules.interruption_escalate_s
        title = (
            f"Infusion still interrupted after {int(interrupted // 60)} min: "
            f"{left} min to the {limit_min:g}-min supervised-restart limit"
        )
    return [
        _alert(
            patient_id,
            device_id,
            dedup_key=track.int_key,
            phase=phase,
            code="infusion_interrupted",
            priority=priority,
            title=title,
            t=deadline,
            ingest_t=track.int_ingest_t,
            found=(
                evidence(
                    "interrupted_minutes",
                    round(interrupted / 60, 2),
                    limit / 60,
                    ">=",
                    at(deadline),
                    unit="min",
                ),
                evidence(
                    "interrupted_minutes_to_restart_limit",
                    round(interrupted / 60, 2),
                    limit_min,
                    "<",
                    at(deadline),
                    unit="min",
                ),
            ),
            rule_id=INTERRUPTION_RULE_ID,
            rules=rules,
            config_version=config_version,
        )
    ]
