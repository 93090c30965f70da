"""RulesEngine: the pure core of the rules service. The contract other code builds on:

``RulesEngine(config: RulesConfig)``
    Built from a pinned configuration (rule thresholds per care-team protocol, per-patient
    overrides, patient profiles, the allowed lateness). ``RulesConfig`` is JSON-serialisable,
    so a replay loads whichever version was live.

``on_telemetry(event: Telemetry) -> list[Alert]``
    Folds one event into the state and returns the alerts it decides, *including* the alerts of
    any event-time timer the event's arrival makes due. ``on_observation(obs)`` is the same for
    an already-converted ``Observation`` (the hot path; ``observe()`` converts once at the edge).

    A pipeline heartbeat gives exactly one ``pipeline.heartbeat`` alert and changes no state
    (``domain.heartbeat``).

``on_time(watermark: datetime) -> list[Alert]``
    Advances the watermark explicitly (e.g. at the end of a replayed stream) and returns the
    alerts of the timers that fall due. Never called with the wall clock by the engine itself.

``snapshot() -> dict`` / ``restore(snapshot: dict)``
    The whole rule state as JSON-ready data, and back. ``restore`` on a fresh engine built with
    the same config, then the rest of the stream, gives exactly the alerts of an uninterrupted
    run (tested in tests/golden). ``snapshot_patients(ids)``/``restore_patients`` do the same
    for a subset (the service persists only the patients a batch touched).

Time: every clinical decision uses device time. Rules that fire on the *absence* of something
run on timers, and there are two clocks, because "no data has reached us" and "when the
child's temperature was taken" are different questions:

- **Arrival time** (the absence rules: device silent, a fever going unobserved): a device is
  silent when nothing from it has *arrived* for its limit, whatever device times its messages
  carry. The clock is the largest ingest time this engine has seen (any record of its
  partition, including the pipeline heartbeat, which ingest writes to every partition so an
  idle partition's clock still moves), minus ``arrival_lateness_s``. A home forwarding an hour
  of buffered readings is not silent while they arrive, and its silence ends when data arrive.
- **Clinical time** (the pump clocks: bag change due, the interruption clock): deadlines are
  device times computed from the pump's data. They fire when the later of the event-time
  watermark (the largest device time seen, minus ``allowed_lateness_s``; events whose device
  clock ingest flagged as off do not move it) and the arrival clock passes them, so they fire
  on time on a partition where nothing else arrives.

A timer's alert carries its deadline as device time and the ingest time of the last message
the deadline was computed from, so its content does not depend on which record moved the
clock. Timers that fall due together fire in (deadline, kind, patient, device) order, so a
restored engine fires them in the same order (``domain.timers.TimerWheel``). Both clocks are
in the record (ingest times and heartbeats are on the telemetry topic), so a replay of the
topic fires the same alerts.

A patient's end of infusion and discharge (their profile's ``infusion_ended_at`` and
``discharged_at``) stop the rules from those times: a reading taken later (of a pump, after the
end of infusion) is not evaluated, a timer due later pages nothing (``PatientRules.stopped``);
both are counted (``take_stopped``).

The engine is synchronous and does no I/O; its state is mutable records per patient and
device, owned here and changed only by the methods above.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from schemas.device import PLAUSIBLE_MAX_C, PLAUSIBLE_MIN_C
from schemas.events import Alert, Telemetry
from services.rules.domain import absence, fever, sensor, sequence
from services.rules.domain import pump as pump_rules
from services.rules.domain.alerting import at
from services.rules.domain.config import PatientRules, RulesCompiler, RulesConfig
from services.rules.domain.heartbeat import heartbeat_alert
from services.rules.domain.infusion import (
    bag_due_deadline,
    fire_bag_due,
    fire_interruption,
    interruption_deadline,
)
from services.rules.domain.instant import NEVER
from services.rules.domain.observation import (
    HEARTBEAT,
    PUMP_EVENT,
    PUMP_STATUS,
    TEMPERATURE,
    ObservationLike,
    observe,
)
from services.rules.domain.pump_track import PumpTrack
from services.rules.domain.sequence import COUNTER_RESTART_JUMP, data_lost_alert
from services.rules.domain.state import (
    ENCODER,
    DeviceTrack,
    Gap,
    PatientTrack,
    patient_from_record,
)
from services.rules.domain.timers import ARRIVAL, CLINICAL, Timer, TimerWheel

SNAPSHOT_FORMAT = 1

# Timer kinds; the names order timers that fall due at the same instant.
_BAG = "bag"
_INTERRUPTION = "interruption"
_LOST = "lost"
_SILENT = "silent"
_UNOBSERVED = "unobserved"
_NEG_INF = NEVER
_ABSENCE_KINDS = frozenset({"lost", "silent", "unobserved"})


def _armed(pump: PumpTrack, kind: str) -> float | None:
    return pump.bag_timer_at if kind == _BAG else pump.int_timer_at


def _set_armed(pump: PumpTrack, kind: str, deadline: float | None) -> None:
    if kind == _BAG:
        pump.bag_timer_at = deadline
    else:
        pump.int_timer_at = deadline


def _float_or(value: Any, default: float) -> float:
    return default if value is None else float(value)


def _compiler_of(config: RulesConfig, compiler: RulesCompiler | None) -> RulesCompiler:
    if compiler is None:
        return RulesCompiler(config)
    if compiler.config is not config:
        raise ValueError("the compiler given compiles another config")
    return compiler


class RulesEngine:
    """Routes each observation to the rules, keeps per-patient state, and runs the timers."""

    def __init__(
        self, config: RulesConfig | None = None, compiler: RulesCompiler | None = None
    ) -> None:
        """``compiler``: one already compiling ``config`` (engines of one config share it)."""
        self.config = config if config is not None else RulesConfig()
        self._config_version = self.config.config_version
        self._lateness = self.config.allowed_lateness_s
        self._compiler = _compiler_of(self.config, compiler)
        self._arrival_lateness = self.config.arrival_lateness_s
        self._patients: dict[str, PatientTrack] = {}
        # Each tracked patient's rules, compiled from the config (not state: not persisted).
        self._rules: dict[str, PatientRules] = {}
        # Pump clocks (deadlines in device time, the CLINICAL lane) and absence timers
        # (deadlines in arrival time, the ARRIVAL lane).
        self._wheel = TimerWheel()
        self._max_t = _NEG_INF
        self._watermark = _NEG_INF
        # The arrival clock: the largest ingest time seen, and that minus the arrival lateness.
        self._max_ingest_t = _NEG_INF
        self._heard = _NEG_INF
        # Pipeline outages seen on this partition's arrival clock (module docstring): whether
        # heartbeats flow here, the last outage's start and when its grace ends.
        self._beating = False
        self._last_beat_t = _NEG_INF
        self._beat_gap = 0.0
        self._outage_from = _NEG_INF
        self._outage_to = _NEG_INF
        self._hold_until = _NEG_INF
        # Timers already held once (kind, patient, device): a hold is never renewed for them.
        self._held: set[tuple[str, str, str]] = set()
        self._outage_after = self.config.outage_gap_s
        self._outages: list[tuple[float, float]] = []
        self._dirty: set[str] = set()
        # The dispatch table: the rules' steps for each kind of observation (a heartbeat is
        # the pipeline's, before any patient).
        self._steps = {
            TEMPERATURE: self._on_temperature,
            PUMP_STATUS: self._on_pump,
            PUMP_EVENT: self._on_pump,
        }
        # Gaps seen since ``take_seq_gaps`` (the service counts them), and counter restarts.
        self._seq_gaps: list[tuple[str, str, int]] = []
        self.seq_restarts = 0
        # What was not decided since ``take_stopped`` because the patient's infusion ended or
        # they were discharged (``PatientRules.stopped``): (what, why); the service counts them.
        self._stopped: list[tuple[str, str]] = []

    # --- the per-event path -----------------------------------------------------------------

    def on_telemetry(self, event: Telemetry) -> list[Alert]:
        return self.on_observation(observe(event))

    def on_observation(self, obs: ObservationLike) -> list[Alert]:
        if obs.channel == HEARTBEAT:
            # A heartbeat touches no patient or device: it is the pipeline's pulse, and the
            # arrival clock of every partition (ingest writes each one to all of them).
            beat = [heartbeat_alert(obs)]
            due = self._advance(obs.ingest_t, _NEG_INF)
            # Once two heartbeats have shown their rhythm, a partition whose clock then jumps
            # by several of their intervals was not watched.
            if obs.ingest_t > self._last_beat_t:
                if self._last_beat_t != _NEG_INF:
                    self._beat_gap = obs.ingest_t - self._last_beat_t
                    self._beating = True
                    self._set_outage_after()
                self._last_beat_t = obs.ingest_t
            if due:
                beat += self._fire_due()
            return beat
        patient_id = obs.patient_id
        patient = self._patients.get(patient_id)
        rules = self._rules[patient_id] if patient is not None else self._rules_for(patient_id)
        if obs.t >= rules.stops_from_s:
            why = rules.stopped(obs.t, obs.channel != TEMPERATURE)
            if why is not None:
                # Taken after the discharge (or, a pump's, after the end of infusion): not
                # evaluated, counted; it moves the clocks as any record does.
                self._stopped.append(("reading", why))
                return self.on_context(obs)
        if patient is None:
            patient = self._patients[patient_id] = PatientTrack()
            self._rules[patient_id] = rules
        self._dirty.add(patient_id)
        device = patient.devices.get(obs.device_id)
        if device is None:
            device = patient.devices[obs.device_id] = DeviceTrack(obs.channel == TEMPERATURE)
        alerts: list[Alert] = []
        # The rules every message of a device goes through: device silence, then data lost.
        # The device's last device time and arrival are noted here (every rule reads them);
        # the silence rule's step runs when a silence is open, the seq rule's when a number
        # is not the next one (this runs for every record: a call costs as much as the check).
        t = obs.t
        if t > device.last_t:
            device.last_t = t
        if obs.ingest_t > device.heard_t:
            device.heard_t = obs.ingest_t
        if device.silent_key is not None:
            alerts.append(absence.end_silence(patient_id, obs, device, rules, self._config_version))
        if device.timer_at is None:
            self._arm_device(patient_id, obs.device_id, device, rules)
        seq = obs.seq
        if seq is not None:
            hi = device.seq_hi
            if hi is not None and seq == hi + 1:
                device.seq_hi = seq  # the next number: no gap opened, none filled
            else:
                gap = sequence.step(device, seq, obs.ingest_t)
                if gap is not None:
                    self._open_gap(patient_id, obs.device_id, device, rules, gap)
        # Then the rules of its kind (the dispatch table). A plausible temperature from a
        # sensor with no fault open goes straight to the fever rules: the sensor rule has
        # nothing to decide (``_on_temperature``'s first check, here because most records
        # are such temperatures).
        celsius = obs.temperature_c
        found: list[Alert] | tuple[Alert, ...]
        if (
            obs.channel == TEMPERATURE
            and celsius is not None
            and device.fault_key is None
            and PLAUSIBLE_MIN_C <= celsius <= PLAUSIBLE_MAX_C
        ):
            found = self._fold_temperature(patient_id, patient, obs, rules)
        else:
            found = self._steps[obs.channel](patient_id, patient, device, obs, rules)
        if found:
            alerts += found

        # The clocks, as ``_advance`` moves them, inline: this runs for every record.
        moved = False
        ingest_t = obs.ingest_t
        if ingest_t > self._max_ingest_t:
            if self._beating and ingest_t - self._max_ingest_t > self._outage_after:
                self._note_outage(ingest_t)
            self._max_ingest_t = ingest_t
            heard = ingest_t - self._arrival_lateness
            if heard > self._heard:
                self._heard = heard
                moved = True
        if t > self._max_t and not obs.clock_skew:
            self._max_t = t
            watermark = t - self._lateness
            if watermark > self._watermark:
                self._watermark = watermark
                moved = True
        if moved:
            # The wheel's due(), inline: this runs for every record.
            wheel = self._wheel
            heard = self._heard
            watermark = self._watermark
            if wheel.arrival_next <= heard or wheel.clinical_next <= (
                heard if heard > watermark else watermark
            ):
                alerts += self._fire_due()
        return alerts

    def _open_gap(
        self, patient_id: str, device_id: str, device: DeviceTrack, rules: PatientRules, gap: Gap
    ) -> None:
        """The messages of ``gap`` were skipped: lost, or still in a buffer. A jump too large to
        be a loss is a counter that restarted."""
        missing = gap.high - gap.low + 1
        if missing > COUNTER_RESTART_JUMP:
            self.seq_restarts += 1
            return
        if device.gaps is None:
            device.gaps = []
        device.gaps.append(gap)
        self._seq_gaps.append((patient_id, device_id, missing))
        if device.gap_timer_at is None:
            deadline = gap.seen + rules.data_lost_wait_s
            device.gap_timer_at = deadline
            self._wheel.schedule(ARRIVAL, deadline, _LOST, patient_id, device_id)

    # --- the rules of each kind of observation (the dispatch table's steps) -------------------

    def _on_temperature(
        self,
        patient_id: str,
        patient: PatientTrack,
        device: DeviceTrack,
        obs: ObservationLike,
        rules: PatientRules,
    ) -> list[Alert] | tuple[Alert, ...]:
        """A temperature the sensor rule must see (an implausible one, or one from a sensor
        with a fault open; ``on_observation`` sends the others straight to the fever rules):
        the sensor-fault rule, then, once no fault is open (a sensor fault is never a fever and
        not a temperature taken), the fever rules."""
        found = sensor.step(patient_id, device, obs, rules, self._config_version)
        if device.fault_key is not None:
            return found
        alerts = self._fold_temperature(patient_id, patient, obs, rules)
        return [*found, *alerts] if found else alerts

    def _on_pump(
        self,
        patient_id: str,
        patient: PatientTrack,
        device: DeviceTrack,
        obs: ObservationLike,
        rules: PatientRules,
    ) -> list[Alert]:
        """A pump status or event: the pump rules, then the infusion clocks re-armed."""
        pump = device.pump
        if pump is None:
            pump = device.pump = PumpTrack()
        if pump_rules.refresh_running_status(pump, obs):
            # The common case: a running pump's routine status; only the bag clock moves.
            deadline = bag_due_deadline(pump, rules)
            if deadline is not None:
                armed = pump.bag_timer_at
                if armed is None or deadline < armed:
                    pump.bag_timer_at = deadline
                    self._wheel.schedule(CLINICAL, deadline, _BAG, patient_id, obs.device_id)
            return []
        found = pump_rules.step(pump, obs, rules, self._config_version)
        self._arm_pump(patient_id, obs.device_id, patient, pump, rules)
        return found

    def take_outages(self) -> list[tuple[datetime, datetime]]:
        """The (last arrival before, first arrival after) of each pipeline outage seen on this
        partition since the last call."""
        outages, self._outages = self._outages, []
        return [(at(start), at(end)) for start, end in outages]

    def take_stopped(self) -> list[tuple[str, str]]:
        """The (what, why) of every reading not evaluated and every timer not paged since the
        last call because the patient's infusion ended or they were discharged: what is
        ``reading`` or the timer's kind, why ``discharged`` or ``infusion_ended``."""
        stopped, self._stopped = self._stopped, []
        return stopped

    def take_seq_gaps(self) -> list[tuple[str, str, int]]:
        """The (patient, device, messages missing) of every gap seen since the last call."""
        gaps, self._seq_gaps = self._seq_gaps, []
        return gaps

    def _fold_temperature(
        self, patient_id: str, patient: PatientTrack, obs: ObservationLike, rules: PatientRules
    ) -> list[Alert]:
        """A plausible temperature: the fever rules, and the fever-unobserved timer."""
        alerts: list[Alert] = []
        t = obs.t
        if t >= patient.fever.newest and patient.thermometer_id != obs.device_id:
            # Compared first: keeping the string already held, not each event's equal copy,
            # is one string less per patient.
            patient.thermometer_id = obs.device_id
        if obs.ingest_t > patient.temp_heard_t:
            patient.temp_heard_t = obs.ingest_t
        was_open = patient.fever.episode_key is not None
        found = fever.step(
            patient.fever,
            obs,
            rules.fever,
            rules.high_risk(t) if rules.cycle_start_s is not None else None,
            self._config_version,
        )
        if found:
            alerts += found
        if patient.unobserved_key is not None:
            # A temperature reached us: the fever is observed again.
            alerts.append(
                absence.end_unobserved(patient_id, obs, patient, rules, self._config_version)
            )
        if patient.fever.episode_key is not None and (
            not was_open or patient.unobserved_timer_at is None
        ):
            self._arm_unobserved(patient_id, patient, rules)
        return alerts

    def _advance(self, ingest_t: float, t: float) -> bool:
        """Move the arrival clock to ``ingest_t`` and the event-time watermark to ``t`` (each
        only forward); whether a timer is now due."""
        moved = False
        if ingest_t > self._max_ingest_t:
            if self._beating and ingest_t - self._max_ingest_t > self._outage_after:
                self._note_outage(ingest_t)
            self._max_ingest_t = ingest_t
            heard = ingest_t - self._arrival_lateness
            if heard > self._heard:
                self._heard = heard
                moved = True
        if t > self._max_t:
            self._max_t = t
            watermark = t - self._lateness
            if watermark > self._watermark:
                self._watermark = watermark
                moved = True
        return moved and self._wheel.due(self._heard, self._watermark)

    def _note_outage(self, ingest_t: float) -> None:
        """Nothing was delivered to this partition, heartbeats included, since the last arrival:
        the pipeline was not watching. Timers due inside the outage wait for what was queued."""
        self._outage_from = self._max_ingest_t
        self._outage_to = ingest_t
        self._hold_until = ingest_t + self.config.resume_grace_s
        self._outages.append((self._max_ingest_t, ingest_t))

    def _set_outage_after(self) -> None:
        # Several heartbeats missing, however far apart the publisher sends them.
        self._outage_after = max(self.config.outage_gap_s, 4 * self._beat_gap)

    def on_context(self, obs: ObservationLike) -> list[Alert]:
        """Move the clocks as the arrival of ``obs`` would, without folding it (a replay's
        event of a patient it does not replay); the alerts of the timers that fall due."""
        still = obs.clock_skew or obs.channel == HEARTBEAT
        if self._advance(obs.ingest_t, _NEG_INF if still else obs.t):
            return self._fire_due()
        return []

    def _rules_for(self, patient_id: str) -> PatientRules:
        return self._compiler.rules_for(patient_id)

    def reconfigure(
        self,
        config: RulesConfig,
        compiler: RulesCompiler | None = None,
        patients: Iterable[str] | None = None,
    ) -> set[str]:
        """Run on ``config`` from now on, keeping every patient's state; returns the patients
        whose armed deadlines moved (their state must be persisted with the new config).

        Rule state holds no thresholds: episodes, clocks and device times are facts about the
        devices, and every decision reads the compiled ``PatientRules``, which are rebuilt here.
        Armed timer deadlines were computed from the old thresholds, though. A deadline the new
        thresholds put *later* is already handled by the timers' laziness (a due entry re-checks
        its real deadline before firing); one they put *earlier* is re-armed here, so a lowered
        limit is not honoured only at the old, later time. A re-armed deadline the watermark has
        already passed fires with the next event that moves the watermark. An open episode
        stays open (its all clear follows the new clear level); alerts decided from now on
        carry the new ``config_version`` and ``rule_version``. ``compiler``: one that already
        compiled ``config`` (the service's check before the swap), so nothing is compiled twice.
        ``patients``: the only patients whose rules the new config changes (a reload that
        changed one profile or one protocol); None: any patient's may have changed."""
        self.config = config
        self._config_version = config.config_version
        # The watermark never moves back: a larger lateness only holds it still for a while.
        self._lateness = config.allowed_lateness_s
        self._arrival_lateness = config.arrival_lateness_s
        self._set_outage_after()
        self._compiler = _compiler_of(config, compiler)
        moved: set[str] = set()
        tracked = self._patients
        chosen = (
            tracked.items()
            if patients is None
            else [(p, tracked[p]) for p in patients if p in tracked]
        )
        for patient_id, patient in chosen:
            rules = self._rules[patient_id] = self._rules_for(patient_id)
            if self._rearm_earlier(patient_id, patient, rules):
                moved.add(patient_id)
        self._dirty |= moved
        return moved

    def _rearm_earlier(self, patient_id: str, patient: PatientTrack, rules: PatientRules) -> bool:
        moved = False
        held = self._held
        for device_id, device in patient.devices.items():
            # A timer held after an outage keeps its hold: a new config does not undo it.
            if (
                device.gap_timer_at is not None
                and device.gaps
                and (_LOST, patient_id, device_id) not in held
            ):
                lost_at = min(g.seen for g in device.gaps) + rules.data_lost_wait_s
                if lost_at < device.gap_timer_at:
                    device.gap_timer_at = lost_at
                    self._wheel.schedule(ARRIVAL, lost_at, _LOST, patient_id, device_id)
                    moved = True
            if device.timer_at is None or (_SILENT, patient_id, device_id) in held:
                continue
            limit = device.silent_limit(rules, device_id)
            deadline = device.heard_t + limit
            if deadline < device.timer_at:
                device.timer_at = deadline
                self._wheel.schedule(ARRIVAL, deadline, _SILENT, patient_id, device_id)
                moved = True
        armed = patient.unobserved_timer_at
        if armed is not None and (_UNOBSERVED, patient_id, "") not in held:
            deadline = patient.temp_heard_t + rules.unobserved_s(patient.thermometer_id)
            if deadline < armed:
                patient.unobserved_timer_at = deadline
                self._wheel.schedule(ARRIVAL, deadline, _UNOBSERVED, patient_id, "")
                moved = True
        for device_id, pump in patient.pumps().items():
            for kind, new in (
                (_BAG, bag_due_deadline(pump, rules)),
                (_INTERRUPTION, interruption_deadline(pump, rules)),
            ):
                armed = _armed(pump, kind)
                # Only an armed clock is moved: an unarmed one is unarmed by the rules' own
                # decision (already fired, or waiting for the next status).
                if (
                    armed is not None
                    and new is not None
                    and new < armed
                    and (kind, patient_id, device_id) not in held
                ):
                    _set_armed(pump, kind, new)
                    self._wheel.schedule(CLINICAL, new, kind, patient_id, device_id)
                    moved = True
        return moved

    def on_time(self, watermark: datetime) -> list[Alert]:
        """Move both clocks to ``watermark`` (each only forward) and fire the timers now due:
        the end of a replayed stream, where "now" is known without a record that says so."""
        mark = watermark.timestamp()
        moved = False
        if mark > self._watermark:
            self._watermark = mark
            moved = True
        if mark > self._heard:
            self._heard = mark
            moved = True
        return self._fire_due() if moved else []

    @property
    def watermark(self) -> datetime | None:
        return None if self._watermark == _NEG_INF else at(self._watermark)

    @property
    def arrival_clock(self) -> datetime | None:
        """The arrival clock the absence timers run on (largest ingest time seen, minus the
        arrival lateness)."""
        return None if self._heard == _NEG_INF else at(self._heard)

    # --- timers ------------------------------------------------------------------------------

    def _arm_device(
        self, patient_id: str, device_id: str, device: DeviceTrack, rules: PatientRules
    ) -> None:
        limit = device.silent_limit(rules, device_id)
        deadline = device.heard_t + limit
        device.timer_at = deadline
        self._wheel.schedule(ARRIVAL, deadline, _SILENT, patient_id, device_id)

    def _arm_unobserved(self, patient_id: str, patient: PatientTrack, rules: PatientRules) -> None:
        deadline = patient.temp_heard_t + rules.unobserved_s(patient.thermometer_id)
        if patient.unobserved_timer_at is None or deadline < patient.unobserved_timer_at:
            patient.unobserved_timer_at = deadline
            self._wheel.schedule(ARRIVAL, deadline, _UNOBSERVED, patient_id, "")

    def _arm_pump(
        self,
        patient_id: str,
        device_id: str,
        patient: PatientTrack,
        pump: PumpTrack,
        rules: PatientRules,
        *,
        after: float = _NEG_INF,
    ) -> None:
        for kind, deadline in (
            (_BAG, bag_due_deadline(pump, rules)),
            (_INTERRUPTION, interruption_deadline(pump, rules)),
        ):
            if deadline is None or deadline <= after:
                continue
            armed = _armed(pump, kind)
            if armed is None or deadline < armed:
                _set_armed(pump, kind, deadline)
                self._wheel.schedule(CLINICAL, deadline, kind, patient_id, device_id)

    def _fire_due(self) -> list[Alert]:
        """Pop every timer whose clock passed its deadline: absence timers on the arrival
        clock, pump clocks on the later of the watermark and the arrival clock; the two heaps
        merged in (deadline, kind, patient, device) order. Entries are lazy: each names the
        deadline it was armed with; if the state has since moved the real deadline later, the
        entry is re-armed at the real deadline instead of firing (so firing order is always
        the order of real deadlines, with or without a restore in between)."""
        alerts: list[Alert] = []
        schedule = self._wheel.schedule
        heard = self._heard
        now = heard if heard > self._watermark else self._watermark
        pop = self._wheel.pop
        # The last outage does not move while timers fire (only an arrival moves it).
        outage_from = self._outage_from
        outage_to = self._outage_to
        held = self._held
        while (timer := pop(heard, now)) is not None:
            deadline, kind, patient_id, device_id = timer
            patient = self._patients.get(patient_id)
            if patient is None:
                continue
            if (
                outage_from < deadline <= outage_to
                and (heard if kind in _ABSENCE_KINDS else now) < self._hold_until
                and (kind, patient_id, device_id) not in held
            ):
                self._defer(patient, kind, patient_id, device_id, deadline)
                continue
            if held:
                held.discard((kind, patient_id, device_id))
            rules = self._rules[patient_id]
            if kind == _SILENT:
                device = patient.devices.get(device_id)
                if device is None or device.timer_at != deadline:
                    continue
                device.timer_at = None
                if device.silent_key is not None:
                    continue
                limit = device.silent_limit(rules, device_id)
                real = device.heard_t + limit
                if real > deadline:
                    device.timer_at = real
                    schedule(ARRIVAL, real, kind, patient_id, device_id)
                    continue
                self._dirty.add(patient_id)
                if self._stops(rules, kind, real, not device.is_thermometer):
                    continue
                alerts.append(
                    absence.start_silence(
                        patient_id, device_id, device, real, limit, rules, self._config_version
                    )
                )
            elif kind == _LOST:
                gapped = patient.devices.get(device_id)
                if gapped is None or gapped.gap_timer_at != deadline:
                    continue
                gapped.gap_timer_at = None
                gaps = gapped.gaps
                if not gaps:
                    continue
                if self._stops(rules, kind, deadline, not gapped.is_thermometer):
                    gapped.gaps = None
                    self._dirty.add(patient_id)
                    continue
                wait = rules.data_lost_wait_s
                real = min(g.seen for g in gaps) + wait
                if real <= deadline:
                    due = [g for g in gaps if g.seen + wait <= real]
                    gaps = [g for g in gaps if g.seen + wait > real]
                    gapped.gaps = gaps or None
                    self._dirty.add(patient_id)
                    alerts.append(
                        data_lost_alert(
                            patient_id=patient_id,
                            device_id=device_id,
                            is_thermometer=gapped.is_thermometer,
                            gaps=due,
                            deadline=real,
                            rule_version=rules.rules_version,
                            config_version=self._config_version,
                        )
                    )
                    if not gaps:
                        continue
                    real = min(g.seen for g in gaps) + wait
                gapped.gap_timer_at = real
                schedule(ARRIVAL, real, kind, patient_id, device_id)
            elif kind == _UNOBSERVED:
                if patient.unobserved_timer_at != deadline:
                    continue
                patient.unobserved_timer_at = None
                if patient.fever.episode_key is None or patient.unobserved_key is not None:
                    continue
                real = patient.temp_heard_t + rules.unobserved_s(patient.thermometer_id)
                if real > deadline:
                    patient.unobserved_timer_at = real
                    schedule(ARRIVAL, real, kind, patient_id, device_id)
                    continue
                self._dirty.add(patient_id)
                if self._stops(rules, kind, real, False):
                    continue
                alerts.append(
                    absence.start_unobserved(patient_id, patient, real, rules, self._config_version)
                )
            else:
                pump_device = patient.devices.get(device_id)
                pump = pump_device.pump if pump_device is not None else None
                if pump is None or _armed(pump, kind) != deadline:
                    continue
                _set_armed(pump, kind, None)
                real_or_none = (
                    bag_due_deadline(pump, rules)
                    if kind == _BAG
                    else interruption_deadline(pump, rules)
                )
                if real_or_none is None:
                    continue
                if real_or_none > deadline:
                    _set_armed(pump, kind, real_or_none)
                    schedule(CLINICAL, real_or_none, kind, patient_id, device_id)
                    continue
                self._dirty.add(patient_id)
                if self._stops(rules, kind, real_or_none, True):
                    continue
                fire = fire_bag_due if kind == _BAG else fire_interruption
                alerts += fire(
                    pump, real_or_none, patient_id, device_id, rules, self._config_version
                )
                # The interruption clock has a second step (escalation) after the first; only a
                # later deadline is re-armed, so a timer that decided nothing cannot spin.
                self._arm_pump(patient_id, device_id, patient, pump, rules, after=real_or_none)
        return alerts

    def _stops(self, rules: PatientRules, kind: str, deadline: float, is_pump: bool) -> bool:
        """Whether a timer due at ``deadline`` pages nothing: the patient was discharged by
        then (or, a pump's timer, their infusion had ended). Its timer stays disarmed; a
        record that arrives later arms it again as usual."""
        if deadline < rules.stops_from_s:
            return False
        why = rules.stopped(deadline, is_pump)
        if why is None:
            return False
        self._stopped.append((kind, why))
        return True

    def _defer(
        self, patient: PatientTrack, kind: str, patient_id: str, device_id: str, deadline: float
    ) -> None:
        """Hold a timer that fell due inside a pipeline outage until its grace ends (if it is
        still the armed one): the data queued during the outage may yet show the device was
        not silent, or the pump restarted. It then fires on its own, real deadline."""
        hold = self._hold_until
        self._held.add((kind, patient_id, device_id))
        device = patient.devices.get(device_id)
        if kind == _SILENT:
            if device is None or device.timer_at != deadline:
                return
            device.timer_at = hold
        elif kind == _LOST:
            if device is None or device.gap_timer_at != deadline:
                return
            device.gap_timer_at = hold
        elif kind == _UNOBSERVED:
            if patient.unobserved_timer_at != deadline:
                return
            patient.unobserved_timer_at = hold
        else:
            pump = device.pump if device is not None else None
            if pump is None or _armed(pump, kind) != deadline:
                return
            _set_armed(pump, kind, hold)
            self._wheel.schedule(CLINICAL, hold, kind, patient_id, device_id)
            self._dirty.add(patient_id)
            return
        self._wheel.schedule(ARRIVAL, hold, kind, patient_id, device_id)
        self._dirty.add(patient_id)

    # --- state ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole state, JSON-ready."""
        return {**self._meta(), "patients": self.snapshot_patients(set(self._patients))}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Replace the whole state with ``snapshot`` (from ``snapshot()``)."""
        self._patients.clear()
        self._rules.clear()
        self._wheel.clear()
        self._restore_meta(snapshot)
        self.restore_patients(snapshot["patients"])

    def _meta(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "config_version": self._config_version,
            "max_t": None if self._max_t == _NEG_INF else self._max_t,
            "watermark": None if self._watermark == _NEG_INF else self._watermark,
            "max_ingest_t": None if self._max_ingest_t == _NEG_INF else self._max_ingest_t,
            "heard": None if self._heard == _NEG_INF else self._heard,
            "beating": self._beating,
            "last_beat_t": None if self._last_beat_t == _NEG_INF else self._last_beat_t,
            "beat_gap": self._beat_gap,
            "outage_from": None if self._outage_from == _NEG_INF else self._outage_from,
            "outage_to": None if self._outage_to == _NEG_INF else self._outage_to,
            "hold_until": None if self._hold_until == _NEG_INF else self._hold_until,
            "held": sorted(list(k) for k in self._held),
        }

    def _restore_meta(self, meta: dict[str, Any]) -> None:
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown snapshot format {meta.get('format')!r}")
        self._max_t = _NEG_INF if meta["max_t"] is None else float(meta["max_t"])
        self._watermark = _NEG_INF if meta["watermark"] is None else float(meta["watermark"])
        # Meta written before the arrival clock has neither: the clock starts at the next record.
        max_ingest_t = meta.get("max_ingest_t")
        heard = meta.get("heard")
        self._max_ingest_t = _NEG_INF if max_ingest_t is None else float(max_ingest_t)
        self._heard = _NEG_INF if heard is None else float(heard)
        self._beating = bool(meta.get("beating", False))
        self._last_beat_t = _float_or(meta.get("last_beat_t"), _NEG_INF)
        self._beat_gap = float(meta.get("beat_gap") or 0.0)
        self._outage_from = _float_or(meta.get("outage_from"), _NEG_INF)
        self._outage_to = _float_or(meta.get("outage_to"), _NEG_INF)
        self._hold_until = _float_or(meta.get("hold_until"), _NEG_INF)
        self._held = {(k, p, d) for k, p, d in meta.get("held") or ()}
        self._set_outage_after()

    def meta_snapshot(self) -> dict[str, Any]:
        """The engine-wide part of the state (watermark), without any patient."""
        return self._meta()

    def restore_meta(self, meta: dict[str, Any]) -> None:
        self._restore_meta(meta)

    def take_dirty(self) -> set[str]:
        """The patients whose state changed since the last call (what a store must persist)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def snapshot_patients(self, patient_ids: set[str]) -> dict[str, dict[str, Any]]:
        """Each patient's state record as JSON data (what ``encode_patients`` writes)."""
        decode = msgspec.json.decode
        return {p: decode(record) for p, record in self.encode_patients(patient_ids)}

    def encode_patients(self, patient_ids: Iterable[str]) -> list[tuple[str, bytes]]:
        """Each patient's state record as JSON bytes, one (patient, bytes) per patient in id
        order: what the service writes to its state topic, encoded by ``msgspec`` straight
        from the live ``PatientTrack``."""
        encode = ENCODER.encode
        patients = self._patients
        return [(p, encode(patients[p])) for p in sorted(patient_ids) if p in patients]

    def restore_patients(self, patients: dict[str, dict[str, Any]]) -> None:
        """Load patients' state (records of this version or the previous one, as JSON data)
        and re-arm their timers from it."""
        arrival: list[Timer] = []
        clinical: list[Timer] = []
        absent = arrival.append
        push = clinical.append
        for patient_id, data in patients.items():
            patient = patient_from_record(data)
            self._patients[patient_id] = patient
            self._rules[patient_id] = self._rules_for(patient_id)
            for device_id, device in patient.devices.items():
                if device.timer_at is not None:
                    absent(Timer(device.timer_at, _SILENT, patient_id, device_id))
                if device.gap_timer_at is not None:
                    absent(Timer(device.gap_timer_at, _LOST, patient_id, device_id))
                pump = device.pump
                if pump is not None:
                    if pump.bag_timer_at is not None:
                        push(Timer(pump.bag_timer_at, _BAG, patient_id, device_id))
                    if pump.int_timer_at is not None:
                        push(Timer(pump.int_timer_at, _INTERRUPTION, patient_id, device_id))
            if patient.unobserved_timer_at is not None:
                absent(Timer(patient.unobserved_timer_at, _UNOBSERVED, patient_id, ""))
        self._wheel.extend(ARRIVAL, arrival)
        self._wheel.extend(CLINICAL, clinical)

    def drop_patients(self, patient_ids: set[str]) -> None:
        """Forget patients (their partition moved to another instance); stale timers lapse."""
        for patient_id in patient_ids:
            self._patients.pop(patient_id, None)
            self._rules.pop(patient_id, None)
            self._dirty.discard(patient_id)

    @property
    def patient_count(self) -> int:
        return len(self._patients)
