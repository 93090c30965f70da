"""RulesEngine: routes each telemetry event to the rules and keeps per-patient state.

Pure and synchronous. The state is a plain mapping from patient to immutable rule state, so a
snapshot is a copy of the mapping and a restore is handing it back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from schemas.events import Alert, Telemetry
from services.rules.domain.fever import FeverState, FeverThresholds, evaluate_fever

ThresholdsFor = Callable[[str], FeverThresholds]


class RulesEngine:
    def __init__(self, fever_thresholds_for: ThresholdsFor) -> None:
        self._fever_thresholds_for = fever_thresholds_for
        self._fever: dict[str, FeverState] = {}

    def on_telemetry(self, event: Telemetry) -> list[Alert]:
        if event.temperature_c is None:
            return []
        state = self._fever.get(event.patient_id, FeverState())
        state, alerts = evaluate_fever(state, event, self._fever_thresholds_for(event.patient_id))
        self._fever[event.patient_id] = state
        return alerts

    @property
    def fever_states(self) -> Mapping[str, FeverState]:
        return self._fever
