"""FeverRule: a fever that must reach a clinician, decided on device time.

Paging criteria (IDSA febrile neutropenia definition, configurable per care-team protocol):
one reading at or above ``single_c`` (38.3 °C), or readings at or above ``sustained_c`` (38.0 °C)
without a break for ``sustained_for`` (60 min). A reading at or above ``critical_c`` escalates.
Each reading is first corrected by its site's offset (an axillary reading runs low), and the
evidence shows both the corrected value and the reading as measured with its site's limit.

One fever is one *episode* with one dedup key: it opens with a ``start`` alert, may ``escalate``
once, and closes with an ``end`` ("all clear") when a reading falls below ``clear_c``. The gap
between ``single_c``/``sustained_c`` and ``clear_c`` is the hysteresis that keeps a reading
bouncing around a threshold from paging again and again.

Readings may arrive out of order: the rule keeps the readings of the recent window sorted by
device time and evaluates the sustained criterion over that order, not over arrival order. A
reading already seen (same message id) changes nothing. Two febrile readings further apart than
``max_gap`` are not one sustained run: no alert is computed from data that old.

The state is a small typed record per patient (``FeverState``, its window a list of ``Reading``
structs); the rule's ``step`` updates it in place and returns the alerts, which
is what the engine's hot path calls.
``evaluate_fever`` is the same rule as a pure ``(state, event) -> (state, alerts)`` function.
A thermometer going silent during an open episode is timed by the engine (it needs event-time
timers); this module only says whether an episode is open.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field, replace
from datetime import timedelta

import msgspec

from schemas.events import Alert, AlertKind, AlertPhase, AlertPriority, Evidence, Telemetry
from services.rules.domain.alerting import at, build_alert, evidence, stamp
from services.rules.domain.instant import NEVER, Instant, never_if_none
from services.rules.domain.observation import ObservationLike, observe

RULE_ID = "fever"
RULE_LOGIC_VERSION = "1.1.0"


@dataclass(frozen=True, slots=True)
class FeverThresholds:
    """One care team's fever protocol (or a patient's override of it)."""

    single_c: float = 38.3
    sustained_c: float = 38.0
    sustained_for: timedelta = timedelta(minutes=60)
    critical_c: float = 39.5
    clear_c: float = 37.8
    # Two readings further apart than this do not make one sustained run: the hour between them
    # is unobserved, and no alert may be computed from data that old.
    max_gap: timedelta = timedelta(minutes=90)
    # (site, °C added before comparing), e.g. (("axillary", 0.5),).
    site_offsets: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.clear_c < self.sustained_c <= self.single_c <= self.critical_c:
            raise ValueError(
                "fever thresholds must satisfy clear_c < sustained_c <= single_c <= critical_c"
            )
        if self.sustained_for <= timedelta(0) or self.max_gap <= timedelta(0):
            raise ValueError("sustained_for and max_gap must be positive")
        if any(abs(offset) > 2.0 for _, offset in self.site_offsets):
            raise ValueError("a site offset beyond ±2 °C is not a site correction")

    def fingerprint(self) -> str:
        """Short digest of the values, so an alert names the exact threshold set it used."""
        text = (
            f"{self.single_c}|{self.sustained_c}|{self.sustained_for.total_seconds()}|"
            f"{self.critical_c}|{self.clear_c}|{self.max_gap.total_seconds()}"
        )
        if self.site_offsets:
            text += "|" + ",".join(f"{site}={offset}" for site, offset in self.site_offsets)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def rule_version(self) -> str:
        return f"{RULE_LOGIC_VERSION}+{self.fingerprint()}"

    def limits(
        self,
        *,
        single_priority: AlertPriority = AlertPriority.HIGH,
        sustained_priority: AlertPriority = AlertPriority.MEDIUM,
    ) -> FeverLimits:
        return FeverLimits(
            single_c=self.single_c,
            sustained_c=self.sustained_c,
            sustained_for_s=self.sustained_for.total_seconds(),
            critical_c=self.critical_c,
            clear_c=self.clear_c,
            max_gap_s=self.max_gap.total_seconds(),
            horizon_s=(self.sustained_for + self.max_gap).total_seconds(),
            site_offsets=dict(self.site_offsets),
            single_priority=single_priority,
            sustained_priority=sustained_priority,
            version=self.rule_version(),
        )


# A reading this low does not end a fever: a continuous patch off the skin reads 33-35 °C in the
# middle of a real fever, and a febrile child does not defervesce to below 35.5 °C. Such a
# reading is still a temperature (it is within the plausible range); it just clears nothing.
CLEAR_FLOOR_C = 35.5


@dataclass(frozen=True, slots=True)
class FeverLimits:
    """FeverThresholds compiled for the hot path: seconds and °C as plain floats."""

    single_c: float
    sustained_c: float
    sustained_for_s: float
    critical_c: float
    clear_c: float
    max_gap_s: float
    horizon_s: float
    site_offsets: dict[str, float]
    single_priority: AlertPriority
    sustained_priority: AlertPriority
    version: str


@dataclass(frozen=True, slots=True)
class HighRisk:
    """Why a fever at this time is raised in priority (composite rule), for the evidence."""

    cycle_day: int
    limit_day: int
    reason: str


class Reading(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One reading in a fever window. In a state record it is the array
    ``[t, value, message_id, measured, site]`` (``array_like``)."""

    t: float  # device time
    value: float  # corrected by the site's offset: what the limits are compared with
    message_id: str
    measured: float  # as the thermometer showed it
    site: str


@dataclass(slots=True)
class FeverState:
    """What the rule remembers about one patient's temperatures; encoded and decoded by
    ``msgspec`` as part of the patient's state record (docs/rules.md, "Rule state", says why
    the records that change on every event are slotted dataclasses, not structs)."""

    # Readings sorted by device time and pruned to the span the sustained criterion can look
    # back over.
    window: list[Reading] = field(default_factory=list)
    # The newest device time in the window (never while the window is empty).
    newest: Instant = NEVER
    episode_key: str | None = None
    opened_at: float = 0.0
    escalated: bool = False
    # End of the last closed episode: a late reading from inside it belongs to a fever that
    # was already paged and cleared, and must not open a second one.
    closed_until: float | None = None
    # Message ids of the window; None while the window holds at most one reading (the common
    # case), whose id is then compared directly: a set per patient costs 200 bytes. Written
    # with the window; a record without it (the previous version's) makes it from the window.
    seen: set[str] | None = None

    def __post_init__(self) -> None:
        self.newest = never_if_none(self.newest)
        if self.seen is None and len(self.window) > 1:
            self.seen = {r.message_id for r in self.window}

    @property
    def episode_open(self) -> bool:
        return self.episode_key is not None

    def copy(self) -> FeverState:
        return replace(
            self,
            window=list(self.window),
            seen=set(self.seen) if self.seen is not None else None,
        )


def _temperature_evidence(
    name: str,
    reading: Reading,
    limit: float,
    comparator: str,
    limits: FeverLimits,
) -> tuple[Evidence, ...]:
    when = at(reading.t)
    message_id, site = reading.message_id, reading.site
    first = evidence(name, reading.value, limit, comparator, when, message_id=message_id)
    offset = limits.site_offsets.get(site, 0.0)
    if offset == 0.0:
        return (first,)
    # The reading as the thermometer showed it, against the limit that applies at its site.
    return (
        first,
        evidence(
            f"{name}_as_measured_{site}",
            reading.measured,
            round(limit - offset, 2),
            comparator,
            when,
            message_id=message_id,
        ),
    )


def step(
    state: FeverState,
    obs: ObservationLike,
    limits: FeverLimits,
    high_risk: HighRisk | None = None,
    config_version: str | None = None,
) -> list[Alert]:
    """Fold one temperature observation into ``state`` (in place); return the alerts decided."""
    message_id = obs.message_id
    seen = state.seen
    if seen is None:
        if state.window and state.window[0].message_id == message_id:
            return []
    elif message_id in seen:
        return []
    celsius, site = obs.temperature_c, obs.site
    if celsius is None or site is None:
        raise ValueError(f"temperature {message_id} without its reading or site")
    t = obs.t
    offsets = limits.site_offsets
    value = celsius + offsets[site] if offsets and site in offsets else celsius
    reading = Reading(t, value, message_id, celsius, site)

    # The common case: a normal reading, newest so far, no fever open. Nothing older can make a
    # sustained run that ends after it, so it alone is the window (it still breaks runs for
    # readings that arrive late).
    if state.episode_key is None and value < limits.sustained_c and t >= state.newest:
        state.window = [reading]
        state.seen = None
        state.newest = t
        return []
    return _fold_into_window(state, obs, limits, high_risk, config_version, reading)


def _fold_into_window(
    state: FeverState,
    obs: ObservationLike,
    limits: FeverLimits,
    high_risk: HighRisk | None,
    config_version: str | None,
    reading: Reading,
) -> list[Alert]:
    """``step`` past its common case: ``reading`` (the observation's) joins the
    window and the rule decides. Apart so that the common case's call makes none of the closure
    cells ``make`` needs (one cell per captured variable, on every call)."""
    t, value, message_id, site_name = reading.t, reading.value, reading.message_id, reading.site
    seen = state.seen
    window = state.window
    if seen is None:
        state.seen = {r.message_id for r in window}
    if not window or t >= window[-1].t:
        window.append(reading)
    else:
        window.insert(bisect.bisect_right(window, t, key=_device_time), reading)
    newest = window[-1].t
    state.newest = newest
    horizon = newest - limits.horizon_s
    if window[0].t < horizon:
        window[:] = [r for r in window if r.t >= horizon]
        state.seen = {r.message_id for r in window}
    else:
        assert state.seen is not None
        state.seen.add(message_id)

    # A reading older than the window changes no decision; it is kept in storage, not here.
    if t < horizon:
        return []

    def make(
        phase: AlertPhase,
        code: str,
        title: str,
        priority: AlertPriority,
        found: tuple[Evidence, ...],
    ) -> Alert:
        assert state.episode_key is not None
        if high_risk is not None and phase is not AlertPhase.END:
            found = (
                *found,
                evidence(
                    "cycle_day",
                    high_risk.cycle_day,
                    high_risk.limit_day,
                    "<=",
                    obs.device_time,
                    unit="d",
                ),
            )
            title = f"{title} (cycle day {high_risk.cycle_day}: {high_risk.reason})"
        return build_alert(
            dedup_key=state.episode_key,
            phase=phase,
            patient_id=obs.patient_id,
            device_id=obs.device_id,
            kind=AlertKind.PHYSIOLOGICAL,
            code=code,
            priority=priority,
            title=title,
            device_time=obs.device_time,
            ingest_time=obs.ingest_time,
            evidence=found,
            rule_id=RULE_ID,
            rule_version=limits.version,
            config_version=config_version,
        )

    if state.episode_key is None:
        if state.closed_until is not None and t <= state.closed_until:
            return []
        if value >= limits.single_c:
            critical = value >= limits.critical_c
            state.episode_key = f"{obs.patient_id}:{RULE_ID}:{stamp(t)}"
            state.opened_at = t
            state.escalated = critical
            site = "" if site_name == "unknown" else f" ({site_name})"
            return [
                make(
                    AlertPhase.START,
                    "fever_critical" if critical else "fever_single",
                    f"Fever {value:.1f} °C{site}",
                    _raised(limits.single_priority, high_risk),
                    # A critical reading shows the critical limit it crossed, not the single one.
                    _temperature_evidence(
                        "temperature",
                        reading,
                        limits.critical_c if critical else limits.single_c,
                        ">=",
                        limits,
                    ),
                )
            ]
        run = _sustained_run(window, limits)
        if run is None:
            return []
        first, last = run
        duration = last.t - first.t
        if duration < limits.sustained_for_s:
            return []
        state.episode_key = f"{obs.patient_id}:{RULE_ID}:{stamp(first.t)}"
        state.opened_at = first.t
        state.escalated = False
        peak = max((r for r in window if first.t <= r.t <= last.t), key=_corrected)
        found = _temperature_evidence(
            "temperature_run_start", first, limits.sustained_c, ">=", limits
        ) + _temperature_evidence("temperature", last, limits.sustained_c, ">=", limits)
        if peak is not first and peak is not last:
            found += _temperature_evidence(
                "temperature_peak", peak, limits.sustained_c, ">=", limits
            )
        return [
            make(
                AlertPhase.START,
                "fever_sustained",
                f"Fever ≥ {limits.sustained_c:.1f} °C for {int(duration // 60)} min",
                _raised(limits.sustained_priority, high_risk),
                found,
            )
        ]

    # An episode is open. Out-of-order readings from before it opened do not end or escalate it.
    if t < state.opened_at:
        return []
    if value >= limits.critical_c and not state.escalated:
        state.escalated = True
        return [
            make(
                AlertPhase.ESCALATE,
                "fever_critical",
                f"Fever rising: {value:.1f} °C",
                AlertPriority.HIGH,
                _temperature_evidence("temperature", reading, limits.critical_c, ">=", limits),
            )
        ]
    if CLEAR_FLOOR_C <= value < limits.clear_c and t >= newest:
        alert = make(
            AlertPhase.END,
            "fever_cleared",
            f"All clear: temperature {value:.1f} °C",
            AlertPriority.INFO,
            _temperature_evidence("temperature", reading, limits.clear_c, "<", limits),
        )
        state.episode_key = None
        state.closed_until = t
        state.escalated = False
        return [alert]
    return []


def _device_time(reading: Reading) -> float:
    return reading.t


def _corrected(reading: Reading) -> float:
    return reading.value


def _raised(priority: AlertPriority, high_risk: HighRisk | None) -> AlertPriority:
    if high_risk is None:
        return priority
    ladder = (AlertPriority.INFO, AlertPriority.LOW, AlertPriority.MEDIUM, AlertPriority.HIGH)
    return ladder[min(3, ladder.index(priority) + 1)]


def _sustained_run(window: list[Reading], limits: FeverLimits) -> tuple[Reading, Reading] | None:
    """First and last reading of the unbroken run >= sustained_c that ends at the newest."""
    if not window or window[-1].value < limits.sustained_c:
        return None
    last = window[-1]
    start = last
    for reading in reversed(window[:-1]):
        if reading.value < limits.sustained_c or start.t - reading.t > limits.max_gap_s:
            break
        start = reading
    return start, last


def evaluate_fever(
    state: FeverState, event: Telemetry, thresholds: FeverThresholds
) -> tuple[FeverState, list[Alert]]:
    """The fever rule as a pure function: the given state is left untouched."""
    if event.temperature_c is None:
        return state, []
    twin = state.copy()
    alerts = step(twin, observe(event), thresholds.limits())
    return twin, alerts
