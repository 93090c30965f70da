"""FeverRule: a fever that must reach a clinician, decided on device time.

Paging criteria (IDSA febrile neutropenia definition, configurable per care-team protocol):
one reading at or above ``single_c`` (38.3 °C), or readings at or above ``sustained_c`` (38.0 °C)
without a break for ``sustained_for`` (60 min). A reading at or above ``critical_c`` escalates.

One fever is one *episode* with one dedup key: it opens with a ``start`` alert, may ``escalate``
once, and closes with an ``end`` ("all clear") when a reading falls below ``clear_c``. The gap
between ``single_c``/``sustained_c`` and ``clear_c`` is the hysteresis that keeps a reading
bouncing around a threshold from paging again and again.

Readings may arrive out of order: the rule keeps the readings of the recent window sorted by
device time and evaluates the sustained criterion over that order, not over arrival order. A
reading already seen (same message id) changes nothing.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    Evidence,
    Telemetry,
)
from services.rules.domain.identity import alert_id_for

RULE_ID = "fever"
RULE_LOGIC_VERSION = "1.0.0"


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

    def __post_init__(self) -> None:
        if not self.clear_c < self.sustained_c <= self.single_c <= self.critical_c:
            raise ValueError(
                "fever thresholds must satisfy clear_c < sustained_c <= single_c <= critical_c"
            )
        if self.sustained_for <= timedelta(0) or self.max_gap <= timedelta(0):
            raise ValueError("sustained_for and max_gap must be positive")

    def fingerprint(self) -> str:
        """Short digest of the values, so an alert names the exact threshold set it used."""
        text = (
            f"{self.single_c}|{self.sustained_c}|{self.sustained_for.total_seconds()}|"
            f"{self.critical_c}|{self.clear_c}|{self.max_gap.total_seconds()}"
        )
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def rule_version(self) -> str:
        return f"{RULE_LOGIC_VERSION}+{self.fingerprint()}"


@dataclass(frozen=True, slots=True)
class _Reading:
    device_time: datetime
    value_c: float
    message_id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class _Episode:
    dedup_key: str
    opened_at: datetime
    escalated: bool = False


@dataclass(frozen=True, slots=True)
class FeverState:
    """What the rule remembers about one patient. Immutable: each event returns a new one."""

    # Sorted by device time; pruned to the window the sustained criterion can look back over.
    window: tuple[_Reading, ...] = ()
    episode: _Episode | None = None
    # The device-time span of the last closed episode: a late reading from inside it belongs to
    # a fever that was already paged and cleared, and must not open a second one.
    closed_span: tuple[datetime, datetime] | None = None
    seen: frozenset[str] = field(default_factory=frozenset)


def _sustained_run_start(
    window: tuple[_Reading, ...], thresholds: FeverThresholds
) -> datetime | None:
    """Device time where the unbroken run of readings >= sustained_c ending at the newest began."""
    if not window or window[-1].value_c < thresholds.sustained_c:
        return None
    start = window[-1]
    for reading in reversed(window[:-1]):
        if reading.value_c < thresholds.sustained_c:
            break
        if start.device_time - reading.device_time > thresholds.max_gap:
            break
        start = reading
    return start.device_time


def _evidence(
    name: str, reading: _Reading, limit: float, comparator: str, unit: str = "Cel"
) -> Evidence:
    return Evidence(
        name=name,
        value=reading.value_c,
        unit=unit,
        limit=limit,
        comparator=comparator,
        device_time=reading.device_time,
        message_id=reading.message_id,
    )


def evaluate_fever(
    state: FeverState, event: Telemetry, thresholds: FeverThresholds
) -> tuple[FeverState, list[Alert]]:
    """Fold one telemetry event into a patient's fever state; return the alerts it decides."""
    if event.temperature_c is None:
        return state, []
    message_id = str(event.message.message_id)
    if message_id in state.seen:
        return state, []

    reading = _Reading(event.device_time, event.temperature_c, message_id, event.device_id)
    window = list(state.window)
    position = bisect.bisect_right([r.device_time for r in window], reading.device_time)
    window.insert(position, reading)
    newest = window[-1].device_time
    horizon = newest - (thresholds.sustained_for + thresholds.max_gap)
    kept = tuple(r for r in window if r.device_time >= horizon)
    seen = frozenset(r.message_id for r in kept)
    state = replace(state, window=kept, seen=seen)

    # A reading older than the window changes no decision; it is kept in storage, not here.
    if reading.device_time < horizon:
        return state, []

    latest = kept[-1]
    alerts: list[Alert] = []
    version = thresholds.rule_version()

    def make(
        episode: _Episode, phase: AlertPhase, code: str, title: str, evidence: tuple[Evidence, ...]
    ) -> Alert:
        active = phase is not AlertPhase.END
        return Alert(
            alert_id=alert_id_for(episode.dedup_key, phase.value),
            dedup_key=episode.dedup_key,
            patient_id=event.patient_id,
            device_id=event.device_id,
            kind=AlertKind.PHYSIOLOGICAL,
            code=code,
            priority=AlertPriority.HIGH if active else AlertPriority.INFO,
            phase=phase,
            state=AlertState.ACTIVE if active else AlertState.INACTIVE,
            title=title,
            device_time=event.device_time,
            ingest_time=event.ingest_time,
            evidence=evidence,
            rule_id=RULE_ID,
            rule_version=version,
        )

    episode = state.episode
    if episode is None:
        if state.closed_span is not None and reading.device_time <= state.closed_span[1]:
            return state, alerts
        run_start = _sustained_run_start(kept, thresholds)
        peak = max(
            (r for r in kept if run_start is not None and r.device_time >= run_start),
            key=lambda r: r.value_c,
            default=None,
        )
        if reading.value_c >= thresholds.single_c:
            trigger: tuple[str, str, tuple[Evidence, ...]] | None = (
                "fever_critical" if reading.value_c >= thresholds.critical_c else "fever_single",
                f"Fever {reading.value_c:.1f} °C",
                (_evidence("temperature", reading, thresholds.single_c, ">="),),
            )
            opened_at = reading.device_time
        elif run_start is not None and latest.device_time - run_start >= thresholds.sustained_for:
            first = next(r for r in kept if r.device_time == run_start)
            trigger = (
                "fever_sustained",
                f"Fever ≥ {thresholds.sustained_c:.1f} °C for "
                f"{int((latest.device_time - run_start).total_seconds() // 60)} min",
                (
                    _evidence("temperature_run_start", first, thresholds.sustained_c, ">="),
                    _evidence("temperature", latest, thresholds.sustained_c, ">="),
                )
                + (
                    (_evidence("temperature_peak", peak, thresholds.sustained_c, ">="),)
                    if peak is not None and peak not in (first, latest)
                    else ()
                ),
            )
            opened_at = run_start
        else:
            trigger = None
        if trigger is not None:
            code, title, evidence = trigger
            episode = _Episode(
                dedup_key=f"{event.patient_id}:{RULE_ID}:{opened_at.isoformat()}",
                opened_at=opened_at,
                escalated=code == "fever_critical",
            )
            alerts.append(make(episode, AlertPhase.START, code, title, evidence))
            return replace(state, episode=episode), alerts
        return state, alerts

    # An episode is open. Out-of-order readings from before it opened do not end or escalate it.
    if reading.device_time < episode.opened_at:
        return state, alerts
    if reading.value_c >= thresholds.critical_c and not episode.escalated:
        episode = replace(episode, escalated=True)
        alerts.append(
            make(
                episode,
                AlertPhase.ESCALATE,
                "fever_critical",
                f"Fever rising: {reading.value_c:.1f} °C",
                (_evidence("temperature", reading, thresholds.critical_c, ">="),),
            )
        )
        return replace(state, episode=episode), alerts
    if reading.value_c < thresholds.clear_c and reading.device_time >= latest.device_time:
        alerts.append(
            make(
                episode,
                AlertPhase.END,
                "fever_cleared",
                f"All clear: temperature {reading.value_c:.1f} °C",
                (_evidence("temperature", reading, thresholds.clear_c, "<"),),
            )
        )
        return (
            replace(state, episode=None, closed_span=(episode.opened_at, reading.device_time)),
            alerts,
        )
    return state, alerts
