"""The infusion clocks: the bag at risk of running dry, and the interruption clock.

- The *bag clock* predicts the bag-empty time from the newest status (remaining volume / rate)
  and pages "bag change due" ``bag_change_lead`` before it, ahead of the pump's own low-volume
  alarm. It is not computed from stale data: at the deadline the pump must have reported within
  its silence limit, otherwise the device-silent alert speaks instead. A new bag (``new_bag``)
  ends it.
- The *interruption clock* accumulates the time the drug is not flowing (stopped, paused or a
  stopping alarm: ``set_flowing``). It pages at ``interruption_page`` (30 min), escalates to high
  priority at ``interruption_escalate`` (2 h), both well before the 4-hour supervised-restart
  limit. A restart shorter than the resume grace does not reset the accumulated time.

The pump rules' step (``domain/pump.py``) moves these clocks' state; their deadlines are
computed here (``bag_due_deadline``, ``interruption_deadline``) and *timed* by the engine on
its timer wheel, which calls ``fire_bag_due`` or ``fire_interruption`` when one falls due.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

from schemas.events import Alert, AlertPhase, AlertPriority
from services.rules.domain.alerting import at, evidence, stamp
from services.rules.domain.config import PatientRules
from services.rules.domain.observation import ObservationLike
from services.rules.domain.pump_track import PumpTrack, pump_alert, pump_all_clear

BAG_RULE_ID = "bag_clock"
INTERRUPTION_RULE_ID = "interruption_clock"


def new_bag(
    track: PumpTrack, obs: ObservationLike, rules: PatientRules, config_version: str | None
) -> list[Alert]:
    track.bag_key = stamp(obs.t)
    track.bag_t = obs.t
    track.bag_due_fired = None
    if track.bag_due_key is None:
        return []
    key, track.bag_due_key = track.bag_due_key, None
    return [
        pump_all_clear(
            obs,
            key,
            code="bag_change_due",
            title="All clear: new bag hung",
            rule_id=BAG_RULE_ID,
            rules=rules,
            config_version=config_version,
        )
    ]


def set_flowing(
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
                pump_all_clear(
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
        pump_alert(
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
        pump_alert(
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
