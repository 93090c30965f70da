"""An alert's timeline for the care team: what the rules raised, who was paged when and by which
channel, what each provider answered, who acknowledged, when it ended.

Pure: in come the alert's phases (as the rules published them) and the escalation's timeline as
notify records it (its events and its delivery attempts); out come entries in time order, each
worded from the record alone. Notify's own ``attempt`` events repeat its delivery attempts and
its ``phase`` events the alert's phases: the attempts and phases are used, not the repeats. An
event kind this module does not know is still shown, by its name and details, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.api.domain.clocks import local_time

# Notify's events that repeat what the phases and the delivery attempts already show.
_REPEATS = frozenset({"attempt", "phase"})


@dataclass(frozen=True, slots=True)
class Entry:
    at: datetime
    kind: str
    text: str


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _people(values: Any) -> str:
    names = [str(v) for v in values or ()]
    return ", ".join(names) if names else "nobody"


def _event_text(
    kind: str, detail: Mapping[str, Any], zone: str, teams: Mapping[str, str] | None = None
) -> str:
    if kind in ("paged_under_cover", "handed_back"):
        return _cover_text(kind, detail, zone, teams or {})
    if kind == "opened":
        return f"Escalation opened under policy {detail.get('policy_id', '?')}"
    if kind == "step_fired":
        text = (
            f"Step {int(detail.get('step', 0)) + 1} of the escalation (pass "
            f"{int(detail.get('pass', 0)) + 1}): paging {_people(detail.get('recipients'))}"
        )
        if detail.get("fallback"):
            text += f"; fallback: {_people(detail.get('fallback'))}"
        return text
    if kind == "exhausted":
        return f"Escalation exhausted after {detail.get('passes', '?')} passes: nobody acknowledged"
    if kind == "acknowledged":
        return f"Acknowledged by {detail.get('by', '?')} (via {detail.get('via', '?')})"
    if kind == "ack_repeated":
        return f"Acknowledged again by {detail.get('by', '?')} (via {detail.get('via', '?')})"
    if kind == "snoozed":
        until = _when(detail.get("until"))
        shown = local_time(until, zone) if until else str(detail.get("until"))
        return f"Snoozed by {detail.get('by', '?')} until {shown}"
    if kind == "resolved":
        return f"Resolved; all clear to {_people(detail.get('all_clear_to'))}"
    if kind == "worsened":
        return f"Worsened; told {_people(detail.get('told'))}"
    if kind == "receipt":
        return f"Provider receipt for the {detail.get('channel', '?')} page: {detail.get('status')}"
    if kind == "held_for_quiet_hours":
        return "Held for the care team's quiet hours"
    if kind == "released_from_quiet_hours":
        return f"Released from quiet hours ({detail.get('reason', '?')})"
    if kind == "released_from_technical_hold":
        return f"Released from the technical hold ({detail.get('reason', '?')})"
    if kind == "held_technical":
        return "Held to see whether the technical alarm outlasts the technical hold"
    if kind == "technical_hold_ended":
        paged = "paged" if detail.get("paged") else "ended before anyone was paged"
        return f"Technical hold over after {detail.get('open_s', '?')} s: {paged}"
    if kind == "not_paged":
        return f"Not paged: {detail.get('reason', '?')}"
    if kind == "bundled":
        others = len(detail.get("dedup_keys") or ())
        return f"Bundled into one page with the patient's other alerts ({others} in the bundle)"
    if kind == "quiet_digest":
        return "Sent in the morning digest of alerts held through quiet hours"
    if kind == "bundle_window_opened":
        return "Later alerts of this patient are bundled into one follow-up page"
    if kind == "fallback":
        return f"Fallback address paged ({detail.get('reason', 'no one on call')})"
    if kind == "upstream_sync_failed":
        return f"Could not tell PagerDuty: {detail.get('reason', '?')}"
    if kind == "caregiver_told":
        what = _FAMILY.get(str(detail.get("kind")), str(detail.get("kind")))
        channels = " and ".join(str(c) for c in detail.get("channels") or ()) or "?"
        return f"Family told {what} by {channels}"
    if kind == "caregiver_not_told":
        what = _FAMILY.get(str(detail.get("kind")), str(detail.get("kind")))
        return f"Family contact not told {what}: {detail.get('reason', '?')}"
    shown = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()))
    return f"{kind}" + (f": {shown}" if shown else "")


def _cover_text(kind: str, detail: Mapping[str, Any], zone: str, teams: Mapping[str, str]) -> str:
    """Regional cover's entries (docs/regional-cover.md): paged under cover, handed back."""

    def team(key: str) -> str:
        value = detail.get(key)
        return teams.get(str(value), str(value)) if value else "?"

    if kind == "paged_under_cover":
        until = _when(detail.get("window_ends"))
        shown = local_time(until, zone) if until else "the end of the window"
        return (
            f"Paged {team('care_team_id')} under cover for {team('covered_team_id')} "
            f"(agreement v{detail.get('agreement_version', '?')}) until {shown}"
        )
    if detail.get("repaged"):
        return f"Handed back to {team('to_team')}; home on-call paged again"
    who = detail.get("acknowledged_by")
    stays = f"{who} ({team('from_team')})" if who else team("from_team")
    return f"Handed back to {team('to_team')}: acknowledged overnight, stays with {stays}"


def _phase_text(phase: Mapping[str, Any], zone: str) -> str:
    device = phase.get("device_time")
    at = f" (device time {local_time(device, zone)})" if isinstance(device, datetime) else ""
    name = phase.get("phase")
    title = phase.get("title", "")
    priority = phase.get("priority") or ""
    if name == "start":
        return f"Raised by the rules: {title} [{priority}]{at}"
    if name == "end":
        return f"Ended by the rules: {title}{at}"
    return f"Updated by the rules: {title} [{priority}]{at}"


# What a caregiver message (docs/caregivers.md) told the family, by its kind.
_FAMILY = {
    "paged": "that the care team was alerted",
    "acknowledged": "that the care team has seen it and will call",
    "exhausted": "to call the unit's 24-hour number",
    "all_clear": "that the alert is over",
}

_PURPOSES = {
    "alert": "Page",
    "escalation": "Escalation page",
    "all_clear": "All clear",
    "quiet_digest": "Morning digest",
    "upstream_acknowledge": "Acknowledgement passed to PagerDuty",
    "upstream_resolve": "Resolution passed to PagerDuty",
    "caregiver": "Family message",
}


def _attempt_text(attempt: Mapping[str, Any]) -> str:
    recipient = attempt.get("recipient") or attempt.get("recipient_ref") or "?"
    what = _PURPOSES.get(str(attempt.get("purpose")), "Message")
    status = attempt.get("status")
    text = f"{what} to {recipient} by {attempt.get('channel', '?')}: {status}"
    detail = attempt.get("detail")
    if detail and status not in ("sent", "accepted", "delivered"):
        text += f" ({detail})"
    return text


def timeline(
    phases: Sequence[Mapping[str, Any]],
    notify: Mapping[str, Any] | None,
    zone: str,
    teams: Mapping[str, str] | None = None,
) -> list[Entry]:
    """Entries in time order (phases at the time notify received them, events and attempts at
    the time notify recorded them), to the second: within one second (notify takes an alert,
    opens its escalation and pages in one step) the phase comes first, then the events, then
    the attempts, each in recorded order. ``teams``: care team id to name, for the entries of
    regional cover (a team missing is named by its id)."""
    entries: list[tuple[datetime, int, int, Entry]] = []
    for n, phase in enumerate(phases):
        at = _when(phase.get("received_at")) or _when(phase.get("device_time"))
        if at is not None:
            kind = f"alert_{phase.get('phase')}"
            entries.append((at, 0, n, Entry(at, kind, _phase_text(phase, zone))))
    if notify is not None:
        for n, event in enumerate(notify.get("events") or ()):
            kind = str(event.get("kind"))
            at = _when(event.get("at"))
            if kind in _REPEATS or at is None:
                continue
            text = _event_text(kind, event.get("detail") or {}, zone, teams)
            entries.append((at, 1, n, Entry(at, kind, text)))
        for n, attempt in enumerate(notify.get("attempts") or ()):
            at = _when(attempt.get("at"))
            if at is not None:
                entries.append((at, 2, n, Entry(at, "delivery", _attempt_text(attempt))))
    entries.sort(key=lambda e: (e[0].replace(microsecond=0), e[1], e[2]))
    return [e[3] for e in entries]
