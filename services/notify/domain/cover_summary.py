"""The morning summary of a night of regional cover, decided without I/O: for each of the covered
team's patients, the alerts opened during the window, who was paged (which team), who
acknowledged and when, what was done before the window ended (the escalation's timeline
entries), and which alerts were still open when the patients were handed back.

The care-team API answers it (``GET /api/care-teams/{id}/cover-summary``) and notify e-mails it
to the covered team once per window (``compose_summary_mail``, keyed by ``summary_key``); both
take the window from ``nights_to_tell``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.notify.domain.cover import CoverHours, last_window, window_at
from services.notify.domain.message import clock_time


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
    # The hand-back (notify's ``handed_back`` entry): when, and whether the home team's on-call
    # was paged again (not when it had been acknowledged by then).
    handed_back_at: datetime | None = None
    repaged: bool = False


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
    handed_back_at: datetime | None = None
    repaged: bool = False


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
                handed_back_at=alert.handed_back_at,
                repaged=alert.repaged,
            )
        )
    return [PatientSummary(p, by_patient[p]) for p in sorted(by_patient)]


# -- the e-mail ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revocation:
    """An agreement's revocation, as its revoked version records it: when, by whom (a manager
    of ``side_team_id``) and why."""

    at: datetime
    by: str | None = None
    side_team_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class NightToTell:
    """A window of cover to tell of: ``ends`` is the window's end, or the revocation that cut it
    short (``revocation`` set)."""

    starts: datetime
    ends: datetime
    revocation: Revocation | None = None


def nights_to_tell(
    hours: CoverHours,
    signed_off_at: datetime,
    now: datetime,
    since: datetime,
    revocation: Revocation | None = None,
) -> list[NightToTell]:
    """The windows of an agreement version to tell of at ``now``, ended no earlier than
    ``since``, oldest first: its latest window that had ended (before the revocation, if any),
    when the version was signed off before that end; and the window a revocation cut short,
    from its start to the revocation, from the revocation on (a revocation at a window's very
    start cut nothing short). Notify e-mails them (``since``: the last day); the care-team API
    answers the latest (``since``: the last eight days), so both tell the same night."""
    found = []
    until = now if revocation is None else min(now, revocation.at)
    window = last_window(hours, until)
    if window is not None and window.ends >= since and signed_off_at < window.ends:
        found.append(NightToTell(window.starts, window.ends))
    if revocation is not None and since <= revocation.at <= now:
        cut = window_at(hours, revocation.at)
        if cut is not None and cut.starts < revocation.at and signed_off_at < revocation.at:
            found.append(NightToTell(cut.starts, revocation.at, revocation))
    return found


@dataclass(frozen=True, slots=True)
class CoverNight:
    """The window a summary tells of and the agreement version it was covered under;
    ``revocation`` when the revocation cut it short (``ends`` is then the revocation)."""

    agreement_id: str
    version: int
    covering_team_id: str
    covered_team_id: str
    timezone: str  # the agreement's: the zone its hours are in, as the dashboard shows them
    starts: datetime
    ends: datetime
    revocation: Revocation | None = None


@dataclass(frozen=True, slots=True)
class SummaryMail:
    subject: str
    body: str
    patients: int
    alerts: int
    still_open: int


def summary_key(agreement_id: str, window_ends: datetime) -> str:
    """What makes a summary e-mail once per window: the agreement and the window's end (UTC)."""
    if window_ends.tzinfo is None:
        raise ValueError("window_ends must be timezone-aware")
    return f"cover-summary:{agreement_id}:{window_ends.astimezone(UTC).isoformat()}"


# The timeline's entries as the summary words them; any other by its name.
_DONE = {
    "opened": "escalation opened",
    "paged_under_cover": "paged under cover",
    "step_fired": "paged",
    "acknowledged": "acknowledged",
    "ack_repeated": "acknowledged again",
    "snoozed": "snoozed",
    "resolved": "resolved",
    "exhausted": "every step paged without an acknowledgement",
    "fallback": "fallback address paged",
    "caregiver_told": "family told",
}


def compose_summary_mail(
    night: CoverNight,
    patients: Sequence[PatientSummary],
    *,
    team_names: Mapping[str, str],
    covering_centre: str | None,
    dashboard_path: str,
) -> SummaryMail:
    """The covered team's e-mail of the night: per patient (by id, as the dashboard lists them)
    each alert opened in the window, whose on-call was paged, who acknowledged and when, what
    was done before the end, and what was still open: handed back to the team (its on-call
    paged again), or acknowledged and left with who acknowledged it. A night with no alert says
    so in one line. ``team_names``: team id to name (the id alone when missing)."""
    zone = night.timezone

    def name(team: str) -> str:
        shown = team_names.get(team)
        return f"{shown} ({team})" if shown and shown != team else team

    def at(moment: datetime) -> str:
        return clock_time(moment, zone, seconds=False)

    covered = name(night.covered_team_id)
    alerts = [a for p in patients for a in p.alerts]
    still_open = [a for a in alerts if a.open_at_handback]
    revoked = night.revocation
    lines = [
        f"Care team: {covered}",
        f"Covered by: {name(night.covering_team_id)}, "
        f"{covering_centre or 'centre not recorded'}, under cover agreement "
        f"{night.agreement_id} version {night.version}",
        f"Window: {at(night.starts)} to {at(night.ends)}",
    ]
    if revoked is not None:
        by = ""
        if revoked.by:
            by = f" by {revoked.by}" + (
                f" of {name(revoked.side_team_id)}" if revoked.side_team_id else ""
            )
        why = f" Reason given: {revoked.reason}." if revoked.reason else ""
        lines.append(
            f"The cover was revoked at {at(revoked.at)}{by}, cutting the window short: from "
            f"then on {covered} was paged for its own patients.{why}"
        )
    lines.append("")
    if not alerts:
        lines.append(
            "A quiet night: no alert was opened for any of your patients in the window."
            if revoked is None
            else "No alert was opened for any of your patients while they were covered."
        )
    for patient in patients:
        lines.append(f"Patient {patient.patient_id}:")
        for alert in patient.alerts:
            what = alert.title or alert.code or alert.dedup_key
            lines.append(
                f"  - {what}, opened {at(alert.opened_at)}; paged: "
                f"{name(alert.paged_team_id)}'s on-call"
            )
            if alert.acknowledged_by and alert.acknowledged_at:
                lines.append(
                    f"    Acknowledged by {alert.acknowledged_by} at {at(alert.acknowledged_at)}."
                )
            else:
                lines.append("    Not acknowledged during the window.")
            lines.append(f"    {_outcome(alert, covered, at)}")
            if alert.done:
                done = ", ".join(
                    f"{_DONE.get(kind, kind.replace('_', ' '))} {at(when)}"
                    for when, kind in alert.done
                )
                lines.append(f"    Done: {done}.")
        lines.append("")
    if alerts:
        lines.pop()
    lines += ["", f"The same summary is on the dashboard: {dashboard_path} (the Overnight card)."]
    covering_name = team_names.get(night.covering_team_id) or night.covering_team_id
    told = (
        ("a quiet night" if revoked is None else "no alert")
        if not alerts
        else f"{len(alerts)} alert{'' if len(alerts) == 1 else 's'}"
        + (f", {len(still_open)} still open at the end" if still_open else "")
    )
    subject = (
        f"[VIGIL] Overnight cover by {covering_name}, {at(night.starts)} to "
        f"{at(night.ends)}{' (revoked)' if revoked is not None else ''}: {told}"
    )
    return SummaryMail(
        subject=subject,
        body="\n".join(lines) + "\n",
        patients=len(patients),
        alerts=len(alerts),
        still_open=len(still_open),
    )


def _outcome(alert: AlertSummary, covered: str, at: Callable[[datetime], str]) -> str:
    if alert.resolved_at is not None:
        return f"Resolved at {at(alert.resolved_at)}."
    if alert.handed_back_at is not None and alert.repaged:
        return (
            f"Still open at the end of the window: handed back to {covered} at "
            f"{at(alert.handed_back_at)}, whose on-call was paged again."
        )
    if alert.handed_back_at is not None:
        return (
            "Still open at the end of the window; acknowledged before the hand-back, it stays "
            "with who acknowledged it."
        )
    return "Still open at the end of the window."
