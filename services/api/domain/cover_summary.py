"""The morning summary of a night of regional cover, decided without I/O: for each of the covered
team's patients, the alerts opened during the window, who was paged (which team), who
acknowledged and when, what was done before the window ended (the escalation's timeline
entries), and which alerts were still open when the patients were handed back."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class NightAlert:
    """One escalation of a covered patient, as notify recorded it."""

    dedup_key: str
    patient_id: str
    code: str | None
    title: str | None
    opened_at: datetime
    paged_team_id: str
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    events: tuple[tuple[datetime, str], ...] = ()  # (at, kind), oldest first


@dataclass(frozen=True, slots=True)
class AlertSummary:
    dedup_key: str
    code: str | None
    title: str | None
    opened_at: datetime
    paged_team_id: str
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    open_at_handback: bool  # not resolved when the window ended: back with the home team
    done: tuple[tuple[datetime, str], ...]  # timeline entries before the window ended


@dataclass(frozen=True, slots=True)
class PatientSummary:
    patient_id: str
    alerts: list[AlertSummary] = field(default_factory=list)

    @property
    def handed_back(self) -> int:
        return sum(1 for a in self.alerts if a.open_at_handback)


def summarise(
    starts: datetime, ends: datetime, alerts: Iterable[NightAlert]
) -> list[PatientSummary]:
    """The summary of the window [starts, ends): alerts opened in it, grouped by patient (by id),
    each patient's alerts oldest first. An alert acknowledged after the window counts as not
    acknowledged overnight."""
    by_patient: dict[str, list[AlertSummary]] = {}
    for alert in sorted(alerts, key=lambda a: (a.opened_at, a.dedup_key)):
        if not starts <= alert.opened_at < ends:
            continue
        overnight_ack = alert.acknowledged_at is not None and alert.acknowledged_at < ends
        resolved = alert.resolved_at if alert.resolved_at and alert.resolved_at < ends else None
        by_patient.setdefault(alert.patient_id, []).append(
            AlertSummary(
                dedup_key=alert.dedup_key,
                code=alert.code,
                title=alert.title,
                opened_at=alert.opened_at,
                paged_team_id=alert.paged_team_id,
                acknowledged_by=alert.acknowledged_by if overnight_ack else None,
                acknowledged_at=alert.acknowledged_at if overnight_ack else None,
                resolved_at=resolved,
                open_at_handback=resolved is None,
                done=tuple((at, kind) for at, kind in alert.events if at < ends),
            )
        )
    return [PatientSummary(p, by_patient[p]) for p in sorted(by_patient)]
