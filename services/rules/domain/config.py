"""RulesConfig: the pinned, versioned configuration a RulesEngine is built from.

Owns every threshold the rules use, the care-team protocols they come from, the per-patient
overrides, and the patient profiles (weight, cycle start, dose step-up day). It is plain data:
JSON in, JSON out (``RulesConfig.model_validate_json`` / ``model_dump_json``), so a replay can
load the exact configuration that was live when a recorded stream was first evaluated.

Resolution order for one patient: the built-in defaults, then the patient's care-team protocol,
then the patient's own override (only the fields it names). The resolved set is compiled once
per patient into ``PatientRules`` (plain floats in seconds and degrees), which is what the hot
path reads. This module does no I/O; loading from PostgreSQL is an adapter's job.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.device import PLAUSIBLE_MAX_C, PLAUSIBLE_MIN_C, PumpAlarmCode
from schemas.events import AlertPriority
from services.rules.domain.fever import FeverLimits, FeverThresholds, HighRisk

RULES_LOGIC_VERSION = "2.0.0"

# IEC 60601-1-8 style mapping of pump alarms to priorities (domain.md, "Pump alarms"). Alarms
# that stop the drug are high; those that warn ahead of a stop are medium.
DEFAULT_PUMP_ALARM_PRIORITIES: dict[str, AlertPriority] = {
    PumpAlarmCode.OCCLUSION_UPSTREAM.value: AlertPriority.HIGH,
    PumpAlarmCode.OCCLUSION_DOWNSTREAM.value: AlertPriority.HIGH,
    PumpAlarmCode.AIR_IN_LINE.value: AlertPriority.HIGH,
    PumpAlarmCode.RESERVOIR_EMPTY.value: AlertPriority.HIGH,
    PumpAlarmCode.PUMP_ERROR.value: AlertPriority.HIGH,
    PumpAlarmCode.DOOR_OPEN.value: AlertPriority.HIGH,
    PumpAlarmCode.BATTERY_DEPLETED.value: AlertPriority.HIGH,
    PumpAlarmCode.BATTERY_LOW.value: AlertPriority.MEDIUM,
    PumpAlarmCode.RESERVOIR_LOW.value: AlertPriority.MEDIUM,
    # The interruption clock pages on a stopped pump with its own ladder; the pump's own alarm
    # is forwarded at medium so the two together never outrank the clock's escalation.
    PumpAlarmCode.INFUSION_STOPPED.value: AlertPriority.MEDIUM,
}


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Plain):
    """Every tunable value of every rule. Durations are in minutes, temperatures in °C."""

    fever_single_c: float = 38.3
    fever_sustained_c: float = 38.0
    fever_sustained_minutes: float = Field(default=60.0, gt=0)
    fever_critical_c: float = 39.5
    fever_clear_c: float = 37.8
    fever_max_gap_minutes: float = Field(default=90.0, gt=0)
    # Added to a reading before it is compared: an axillary reading runs about half a degree
    # under a core temperature. Sites differ, so the default adds nothing.
    fever_site_offsets_c: dict[str, float] = Field(default_factory=dict)
    # Either criterion is the definition of fever (IDSA febrile neutropenia); a febrile child on
    # blinatumomab needs a call back now, so both page high unless a protocol says otherwise.
    fever_single_priority: AlertPriority = AlertPriority.HIGH
    fever_sustained_priority: AlertPriority = AlertPriority.HIGH
    # A thermometer that stops reporting while a fever is open is itself an alarm.
    fever_unobserved_minutes: float = Field(default=30.0, gt=0)

    pump_alarm_priorities: dict[str, AlertPriority] = Field(
        default_factory=lambda: dict(DEFAULT_PUMP_ALARM_PRIORITIES)
    )

    # A bag with no new one recorded pages the care team this long before its predicted empty
    # time: it is at risk of running dry. Routine changes are earlier than this and page no
    # one (a team that wants the page ahead of the pump's own reservoir-low alarm sets more).
    bag_change_lead_minutes: float = Field(default=30.0, gt=0)
    interruption_page_minutes: float = Field(default=30.0, gt=0)
    # Well before the 4-hour supervised-restart limit (Blincyto PI): time to reach the family.
    interruption_escalate_minutes: float = Field(default=120.0, gt=0)
    interruption_restart_limit_minutes: float = Field(default=240.0, gt=0)
    # A restart shorter than this does not end an interruption: stopped time keeps adding up.
    interruption_resume_grace_minutes: float = Field(default=15.0, ge=0)

    pump_silent_minutes: float = Field(default=15.0, gt=0)
    thermometer_silent_minutes: float = Field(default=240.0, gt=0)
    # How long a gap in a device's seq may stay open (a hub still forwarding its buffer) before
    # it is raised as data lost.
    data_lost_wait_minutes: float = Field(default=30.0, gt=0)
    # A spot-check thermometer (registered as such) is read a few times a day: silent means
    # later than its usual longest gap (overnight), and during a fever the caregiver re-measures
    # about hourly, so "no temperature" counts from that rhythm.
    spot_check_silent_minutes: float = Field(default=720.0, gt=0)
    spot_check_unobserved_minutes: float = Field(default=75.0, gt=0)
    # Whether a missed spot check pages at any hour (medium) or waits for the morning round
    # (low: notify holds low alerts through the care team's quiet hours and pages them as the
    # morning digest). The care team's protocol decides; only these two are allowed.
    spot_check_silent_priority: AlertPriority = AlertPriority.MEDIUM

    seven_day_bag_rate_ml_h: float = Field(default=0.6, gt=0)
    seven_day_bag_rate_tolerance_ml_h: float = Field(default=0.05, ge=0)
    seven_day_bag_min_weight_kg: float = Field(default=22.0, gt=0)

    high_risk_cycle_days: tuple[int, ...] = (1, 2, 3)

    @model_validator(mode="after")
    def _coherent(self) -> Thresholds:
        self.fever()  # FeverThresholds refuses incoherent temperature levels
        # A level no body temperature can reach switches the rule off for every child it
        # applies to (a reading above 43.0 °C is a sensor fault, never a fever): refused, as a
        # clear level no reading can go under would keep every fever open forever.
        if not self.fever_critical_c <= PLAUSIBLE_MAX_C:
            raise ValueError(
                f"fever levels above {PLAUSIBLE_MAX_C} °C can never page: no body temperature "
                "reaches them"
            )
        if not self.fever_clear_c > PLAUSIBLE_MIN_C:
            raise ValueError(f"a fever clear level must be above {PLAUSIBLE_MIN_C} °C")
        if self.spot_check_silent_priority not in (AlertPriority.MEDIUM, AlertPriority.LOW):
            raise ValueError(
                "a missed spot check pages at any hour (medium) or waits for the morning round "
                "(low)"
            )
        if not (
            self.interruption_page_minutes
            < self.interruption_escalate_minutes
            < self.interruption_restart_limit_minutes
        ):
            raise ValueError("interruption clock must page < escalate < restart limit")
        return self

    def fever(self) -> FeverThresholds:
        return FeverThresholds(
            single_c=self.fever_single_c,
            sustained_c=self.fever_sustained_c,
            sustained_for=timedelta(minutes=self.fever_sustained_minutes),
            critical_c=self.fever_critical_c,
            clear_c=self.fever_clear_c,
            max_gap=timedelta(minutes=self.fever_max_gap_minutes),
            site_offsets=tuple(sorted(self.fever_site_offsets_c.items())),
        )

    def fingerprint(self) -> str:
        """Digest of every value, so an alert names the exact threshold set it used."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def layered_thresholds(base: Thresholds, *layers: Mapping[str, Any]) -> Thresholds:
    """``base`` with each layer's overrides laid over it in order: the care team's protocol,
    then the patient's override. The one place that order is written."""
    merged = base.model_dump()
    for layer in layers:
        merged.update(layer)
    return Thresholds.model_validate(merged)


class Protocol(_Plain):
    """A care team's protocol: a signed-off, versioned set of threshold overrides."""

    care_team_id: str
    version: int = Field(ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict)


class PatientOverride(_Plain):
    """A patient's own thresholds, on top of the care team's protocol."""

    version: int = Field(ge=1)
    overrides: dict[str, Any] = Field(default_factory=dict)


class PatientProfile(_Plain):
    """What the rules need to know about the child, beyond the devices."""

    patient_id: str
    care_team_id: str | None = None
    weight_kg: float | None = Field(default=None, gt=0)
    cycle_start: AwareDatetime | None = Field(
        default=None, description="Start of the current blinatumomab cycle (day 1 begins here)."
    )
    step_up_day: int | None = Field(
        default=8, ge=1, description="Cycle day of the dose step-up (day 8 in the PI schedule)."
    )
    spot_check_thermometers: tuple[str, ...] = Field(
        default=(),
        description="The patient's thermometers registered as spot-check (a caregiver reads "
        "them a few times a day): their silence and fever-unobserved limits are the "
        "spot-check ones.",
    )
    override: PatientOverride | None = None
    infusion_ended_at: AwareDatetime | None = Field(
        default=None,
        description="End of the bag course (the care team's end of infusion): from this time "
        "the infusion rules (pump alarms, pump silent, bag and interruption clocks) page "
        "nothing; fever monitoring goes on.",
    )
    discharged_at: AwareDatetime | None = Field(
        default=None,
        description="The patient's discharge: from this time no rule pages for them and "
        "their readings are not evaluated.",
    )


class RulesConfig(_Plain):
    """Everything a RulesEngine needs to decide, pinned under one ``config_version``."""

    config_version: str = "default"
    defaults: Thresholds = Field(default_factory=Thresholds)
    protocols: dict[str, Protocol] = Field(default_factory=dict)
    profiles: dict[str, PatientProfile] = Field(default_factory=dict)
    # How far behind the newest device time an event may arrive and still be placed before the
    # timers that depend on it fire. Timers fire at (max device time seen) - allowed_lateness.
    allowed_lateness_s: float = Field(default=60.0, ge=0)
    # The same for the arrival clock of the absence timers (device silent, fever unobserved):
    # how far out of ingest-time order records of one partition may land (several ingest
    # processes write to it). Absence timers fire at (max ingest time seen) - this.
    arrival_lateness_s: float = Field(default=5.0, ge=0)
    # Once pipeline heartbeats flow on a partition, a jump of its arrival clock by more than
    # this is an outage of the pipeline (nothing was delivered): timers that fell due inside
    # it wait ``resume_grace_s`` after it for the data queued meanwhile before they fire.
    outage_gap_s: float = Field(default=60.0, gt=0)
    resume_grace_s: float = Field(default=120.0, ge=0)

    def thresholds_for(self, patient_id: str) -> Thresholds:
        profile = self.profiles.get(patient_id)
        layers: list[Mapping[str, Any]] = []
        if profile is not None and profile.care_team_id in self.protocols:
            layers.append(self.protocols[profile.care_team_id].overrides)
        if profile is not None and profile.override is not None:
            layers.append(profile.override.overrides)
        return layered_thresholds(self.defaults, *layers)

    def compile_for(self, patient_id: str) -> PatientRules:
        return PatientRules.build(self.thresholds_for(patient_id), self.profiles.get(patient_id))


class RulesCompiler:
    """Compiles one config's ``PatientRules``, each patient once, and the thresholds once per
    way they resolve, not once per patient.

    A patient without an override of their own resolves exactly as every other patient of
    their care team does (defaults, then the team's protocol, if it has one): the resolving,
    validating and fingerprinting is done once per team, and each patient only adds what their
    profile says (weight, cycle start, step-up day). A patient with an override is compiled on
    their own, as ``RulesConfig.compile_for`` does. Patients without a profile share one
    compiled copy of the defaults. Every result equals ``compile_for``'s (tested).

    One compiler serves every engine that runs its config, and the check that validates a new
    config before it goes live, so a config change compiles each patient once."""

    __slots__ = ("_by_patient", "_by_team", "config")

    def __init__(self, config: RulesConfig) -> None:
        self.config = config
        self._by_patient: dict[str, PatientRules] = {}
        # Keyed by care team (None: the defaults alone).
        self._by_team: dict[str | None, PatientRules] = {}

    def rules_for(self, patient_id: str) -> PatientRules:
        rules = self._by_patient.get(patient_id)
        if rules is None:
            profile = self.config.profiles.get(patient_id)
            if profile is None:
                # The defaults, one copy for all: not remembered per patient (an entry per
                # unprofiled patient would be memory the engine's state is measured by).
                return self._shared(None, patient_id)
            rules = self._by_patient[patient_id] = self._compile(patient_id, profile)
        return rules

    def keep_from(
        self, previous: RulesCompiler, patients: set[str] | None, teams: frozenset[str]
    ) -> None:
        """Take over what ``previous`` (a compiler of the config this one's replaces, with the
        same defaults) compiled, but for ``patients`` (None: all) and the teams in ``teams``:
        a change to one patient or one protocol recompiles only the patients it touches."""
        if patients is None:
            return
        self._by_team = {t: r for t, r in previous._by_team.items() if t not in teams}
        by_patient = dict(previous._by_patient)
        for patient_id in patients:
            by_patient.pop(patient_id, None)
        self._by_patient = by_patient

    def compile_patients(self, patients: set[str] | None) -> None:
        """Compile ``patients`` that have a profile (None: every patient with a profile)."""
        if patients is None:
            self.compile_profiles()
            return
        profiles = self.config.profiles
        for patient_id in patients:
            if patient_id in profiles:
                self.rules_for(patient_id)

    def compile_profiles(self) -> None:
        """Compile every patient with a profile (what a config change does before the swap)."""
        for patient_id in self.config.profiles:
            self.rules_for(patient_id)

    def check(self, patients: Iterable[str] | None = None) -> None:
        """Resolve every distinct threshold set the config's patients use (each care team's
        once, each patient override), raising for one the rules cannot read; compiles nothing
        per patient (a config being loaded is checked before it is compiled for use).
        ``patients``: only these (the ones a reload changed); None: every profile."""
        config = self.config
        profiles = config.profiles
        chosen = (
            profiles.items()
            if patients is None
            else [(p, profiles[p]) for p in patients if p in profiles]
        )
        for patient_id, profile in chosen:
            if profile.override is not None:
                config.thresholds_for(patient_id)
            else:
                self._shared(self._team_of(profile), patient_id)

    def _compile(self, patient_id: str, profile: PatientProfile) -> PatientRules:
        if profile.override is not None:
            return self.config.compile_for(patient_id)
        return self._shared(self._team_of(profile), patient_id).for_profile(profile)

    def _team_of(self, profile: PatientProfile) -> str | None:
        """The care team whose protocol a patient without an override resolves by (None: the
        defaults alone)."""
        team = profile.care_team_id
        return team if team in self.config.protocols else None

    def _shared(self, team: str | None, patient_id: str) -> PatientRules:
        shared = self._by_team.get(team)
        if shared is None:
            # Any patient of the team resolves the team's thresholds (none has an override).
            shared = self._by_team[team] = PatientRules.from_thresholds(
                self.config.thresholds_for(patient_id)
            )
        return shared


_MIN = 60.0
#: Why a reading or a timer of a patient is not paged (``PatientRules.stopped``).
DISCHARGED = "discharged"
INFUSION_ENDED = "infusion_ended"


@dataclass(frozen=True, slots=True)
class PatientRules:
    """One patient's resolved thresholds, in the units the hot path compares (s, °C)."""

    fever: FeverLimits
    rules_version: str
    fever_unobserved_s: float
    pump_alarm_priorities: dict[str, AlertPriority]
    bag_change_lead_s: float
    interruption_page_s: float
    interruption_escalate_s: float
    interruption_limit_s: float
    interruption_grace_s: float
    pump_silent_s: float
    thermometer_silent_s: float
    data_lost_wait_s: float
    spot_check_silent_s: float
    spot_check_unobserved_s: float
    spot_check_silent_priority: AlertPriority
    spot_checks: frozenset[str]
    seven_day_rate: float
    seven_day_tolerance: float
    seven_day_min_weight_kg: float
    weight_kg: float | None
    cycle_start_s: float | None
    step_up_day: int | None
    high_risk_cycle_days: frozenset[int]
    # The end of infusion and the discharge (epoch s; None: not recorded).
    infusion_end_s: float | None = None
    discharge_s: float | None = None
    # The earlier of the two (inf when neither is recorded): the one comparison the per-record
    # path makes before ``stopped``.
    stops_from_s: float = math.inf

    @classmethod
    def build(cls, thresholds: Thresholds, profile: PatientProfile | None) -> PatientRules:
        shared = cls.from_thresholds(thresholds)
        return shared if profile is None else shared.for_profile(profile)

    def for_profile(self, profile: PatientProfile) -> PatientRules:
        """These thresholds for one patient: the fields a profile sets (every other field is
        the thresholds', shared by all patients who resolve to them)."""
        cycle_start: datetime | None = profile.cycle_start
        ended = profile.infusion_ended_at
        discharged = profile.discharged_at
        ended_s = ended.timestamp() if ended is not None else None
        discharge_s = discharged.timestamp() if discharged is not None else None
        return replace(
            self,
            weight_kg=profile.weight_kg,
            cycle_start_s=cycle_start.timestamp() if cycle_start is not None else None,
            step_up_day=profile.step_up_day,
            spot_checks=frozenset(profile.spot_check_thermometers),
            infusion_end_s=ended_s,
            discharge_s=discharge_s,
            stops_from_s=min(
                (s for s in (ended_s, discharge_s) if s is not None), default=math.inf
            ),
        )

    @classmethod
    def from_thresholds(cls, thresholds: Thresholds) -> PatientRules:
        """The rules of a patient without a profile: nothing known about the child."""
        fever = thresholds.fever().limits(
            single_priority=thresholds.fever_single_priority,
            sustained_priority=thresholds.fever_sustained_priority,
        )
        return cls(
            fever=fever,
            rules_version=f"{RULES_LOGIC_VERSION}+{thresholds.fingerprint()}",
            fever_unobserved_s=thresholds.fever_unobserved_minutes * _MIN,
            pump_alarm_priorities=dict(thresholds.pump_alarm_priorities),
            bag_change_lead_s=thresholds.bag_change_lead_minutes * _MIN,
            interruption_page_s=thresholds.interruption_page_minutes * _MIN,
            interruption_escalate_s=thresholds.interruption_escalate_minutes * _MIN,
            interruption_limit_s=thresholds.interruption_restart_limit_minutes * _MIN,
            interruption_grace_s=thresholds.interruption_resume_grace_minutes * _MIN,
            pump_silent_s=thresholds.pump_silent_minutes * _MIN,
            thermometer_silent_s=thresholds.thermometer_silent_minutes * _MIN,
            data_lost_wait_s=thresholds.data_lost_wait_minutes * _MIN,
            spot_check_silent_s=thresholds.spot_check_silent_minutes * _MIN,
            spot_check_unobserved_s=thresholds.spot_check_unobserved_minutes * _MIN,
            spot_check_silent_priority=thresholds.spot_check_silent_priority,
            spot_checks=frozenset(),
            seven_day_rate=thresholds.seven_day_bag_rate_ml_h,
            seven_day_tolerance=thresholds.seven_day_bag_rate_tolerance_ml_h,
            seven_day_min_weight_kg=thresholds.seven_day_bag_min_weight_kg,
            weight_kg=None,
            cycle_start_s=None,
            step_up_day=None,
            high_risk_cycle_days=frozenset(thresholds.high_risk_cycle_days),
        )

    def silent_s(self, device_id: str, is_thermometer: bool) -> float:
        """How long a device may stay silent before it is alerted (s)."""
        if not is_thermometer:
            return self.pump_silent_s
        if device_id in self.spot_checks:
            return self.spot_check_silent_s
        return self.thermometer_silent_s

    def silent_priority(self, device_id: str, is_thermometer: bool) -> AlertPriority:
        """The priority of a device's silence: medium, or what the protocol says for a missed
        spot check."""
        if is_thermometer and device_id in self.spot_checks:
            return self.spot_check_silent_priority
        return AlertPriority.MEDIUM

    def unobserved_s(self, thermometer_id: str) -> float:
        """How long an open fever may go without a temperature, by the thermometer's rhythm."""
        if thermometer_id in self.spot_checks:
            return self.spot_check_unobserved_s
        return self.fever_unobserved_s

    def stopped(self, t: float, is_pump: bool) -> str | None:
        """Why nothing at time ``t`` of a device (a pump: ``is_pump``) is paged for this
        patient: ``discharged`` from the discharge on, ``infusion_ended`` for a pump from the
        end of infusion on; None while they are monitored."""
        if self.discharge_s is not None and t >= self.discharge_s:
            return DISCHARGED
        if is_pump and self.infusion_end_s is not None and t >= self.infusion_end_s:
            return INFUSION_ENDED
        return None

    def cycle_day(self, t: float) -> int | None:
        """Day of the cycle at device time ``t`` (day 1 starts at cycle_start)."""
        if self.cycle_start_s is None or t < self.cycle_start_s:
            return None
        return int((t - self.cycle_start_s) // 86400.0) + 1

    def high_risk(self, t: float) -> HighRisk | None:
        """Why a fever at device time ``t`` falls in a high CRS-risk window, if it does."""
        day = self.cycle_day(t)
        if day is None:
            return None
        if day in self.high_risk_cycle_days:
            return HighRisk(day, max(self.high_risk_cycle_days), "first days of the cycle")
        if self.step_up_day is not None and self.step_up_day <= day <= self.step_up_day + 1:
            return HighRisk(day, self.step_up_day + 1, "day of or after the dose step-up")
        return None
