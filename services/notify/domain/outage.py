"""After a pipeline outage: what a care team is told, and which alerts wait for their end.

Pure: the outage window, the team's alert episodes as the data now show them and the time of
composition go in; the summary text comes out. No clock, no I/O. Times shown are in the care
team's zone, the zone named (``message.clock_time``), like every page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.events import AlertPriority
from services.notify.domain.message import clock_time, short_time

#: Priorities never held for their end after an outage: paged at once, like any other time.
NEVER_HELD = frozenset({AlertPriority.HIGH})

_RANK = {
    AlertPriority.HIGH: 0,
    AlertPriority.MEDIUM: 1,
    AlertPriority.LOW: 2,
    AlertPriority.INFO: 3,
}


@dataclass(frozen=True, slots=True)
class OutageWindow:
    """When Vigil was not watching: from the last heartbeat before the silence to the first one
    back (device times of the heartbeats)."""

    started_at: datetime
    ended_at: datetime

    def __post_init__(self) -> None:
        if self.started_at.tzinfo is None or self.ended_at.tzinfo is None:
            raise ValueError("outage times must be timezone-aware")
        if self.ended_at < self.started_at:
            raise ValueError("an outage cannot end before it starts")

    def covers(self, device_time: datetime) -> bool:
        """Whether an alert stamped ``device_time`` began while nobody was watching."""
        if device_time.tzinfo is None:
            raise ValueError("device_time must be timezone-aware")
        return self.started_at <= device_time <= self.ended_at

    @property
    def length(self) -> timedelta:
        return self.ended_at - self.started_at


@dataclass(frozen=True, slots=True)
class Episode:
    """One alert episode (dedup key) of a patient, as the stored phases show it now.

    ``began_at`` / ``ended_at`` are device times of its first start and of its end phase (None:
    no end received). ``paged``: an escalation was opened for it (its own pages went out or are
    going out). ``acknowledged_by``: who acknowledged it, if anyone.
    """

    patient_id: str
    dedup_key: str
    title: str
    priority: AlertPriority
    began_at: datetime
    ended_at: datetime | None = None
    paged: bool = False
    acknowledged_by: str | None = None

    @property
    def open(self) -> bool:
        return self.ended_at is None

    @property
    def needs_action(self) -> bool:
        return self.open and self.acknowledged_by is None


@dataclass(frozen=True, slots=True)
class OutageSummary:
    subject: str
    body: str
    short_text: str  # SMS, PagerDuty summary line
    needs_action: int
    during: int


def should_hold(priority: AlertPriority) -> bool:
    """Whether a start phase that began inside an outage just ended may wait (at most the
    bundling window) for its end, to be folded into the summary. HIGH never waits."""
    return priority not in NEVER_HELD


def _order(episode: Episode) -> tuple[str, int, datetime, str]:
    return (episode.patient_id, _RANK.get(episode.priority, 9), episode.began_at, episode.dedup_key)


def _line(episode: Episode, zone: str) -> str:
    began = clock_time(episode.began_at, zone)
    head = f"  - [{episode.priority.value.upper()}] {episode.title}: "
    if episode.ended_at is not None:
        told = (
            "paged separately, with its all clear"
            if episode.paged
            else "not paged: reported here only"
        )
        return f"{head}began {began}, ended {clock_time(episode.ended_at, zone)} ({told})"
    if episode.acknowledged_by is not None:
        return f"{head}STILL OPEN since {began}, acknowledged by {episode.acknowledged_by}"
    if episode.paged:
        return f"{head}STILL OPEN since {began}, paged separately"
    return f"{head}STILL OPEN since {began}"


def compose_summary(
    window: OutageWindow,
    *,
    team_name: str,
    zone: str,
    patients: Sequence[str],
    during: Sequence[Episode],
    open_before: Sequence[Episode] = (),
    composed_at: datetime,
) -> OutageSummary:
    """One care team's account of an outage.

    ``during``: the team's episodes whose first start (device time) lies inside ``window``.
    ``open_before``: episodes that began before it and are still open and unacknowledged (they
    are part of "what needs action now"). ``patients``: the team's monitored patients; those
    with nothing during the window are named as such, so no patient is left out.
    """
    if composed_at.tzinfo is None:
        raise ValueError("composed_at must be timezone-aware")
    start, end = clock_time(window.started_at, zone), clock_time(window.ended_at, zone)
    minutes = max(1, round(window.length.total_seconds() / 60))
    inside = sorted((e for e in during if window.covers(e.began_at)), key=_order)
    before = sorted((e for e in open_before if e.needs_action), key=_order)
    action = [e for e in inside if e.needs_action] + before
    ended = [e for e in inside if not e.open]

    lines = [
        f"Care team: {team_name}",
        "",
        f"Vigil was not watching from {start} to {end} (about {minutes} min): no data reached "
        "the rules in that time, so nothing that happened then could be paged when it happened.",
        "The data the devices kept and sent once the pipeline was back have now been checked.",
        "",
        "During the outage, as far as the data now show:",
    ]
    by_patient: dict[str, list[Episode]] = {}
    for episode in inside:
        by_patient.setdefault(episode.patient_id, []).append(episode)
    for patient in sorted(by_patient):
        lines.append(f"Patient {patient}:")
        lines.extend(_line(e, zone) for e in by_patient[patient])
    quiet = sorted(set(patients) - set(by_patient))
    if not by_patient:
        lines.append("  No alarms for any patient of this team.")
    if quiet and by_patient:
        lines.append(f"No alarms: {', '.join(quiet)}.")
    lines += ["", "Needs action now:"]
    if action:
        for episode in action:
            since = clock_time(episode.began_at, zone)
            lines.append(
                f"  - Patient {episode.patient_id}: {episode.title}, open since {since}, "
                "unacknowledged (paged separately; acknowledge from that page)"
                if episode.paged
                else f"  - Patient {episode.patient_id}: {episode.title}, open since {since}, "
                "unacknowledged"
            )
    else:
        lines.append("  Nothing from this account. Alarms still active are paged on their own.")
    lines += [
        "",
        "A device that has not reported since the pipeline came back is paged as silent by the "
        "usual rules.",
        f"Status as of {clock_time(composed_at, zone)} by Vigil's clock.",
    ]
    alarms = (
        "no alarms"
        if not inside
        else f"{len(inside)} alarm{'s' if len(inside) != 1 else ''}"
        + (f", {len(action)} need{'s' if len(action) == 1 else ''} action" if action else "")
    )
    subject = (
        f"[VIGIL] Not watching {clock_time(window.started_at, zone, seconds=False)} to "
        f"{clock_time(window.ended_at, zone, seconds=False)}: {alarms}"
    )
    short = (
        f"VIGIL: not watching {short_time(window.started_at, zone)}-"
        f"{short_time(window.ended_at, zone)}. During it: {alarms}"
        f"{'' if not ended else f' ({len(ended)} already ended)'}."
        + (f" Needs action now: {len(action)} open, paged separately." if action else "")
    )
    return OutageSummary(
        subject=subject,
        body="\n".join(lines) + "\n",
        short_text=short,
        needs_action=len(action),
        during=len(inside),
    )
