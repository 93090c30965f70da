"""Classify page e-mails against a course's ground truth. Pure: no I/O, no clock.

A page is what one e-mail says, read from its headers: ``X-Vigil-Dedup-Key`` (several, comma
separated, in a bundle page), ``X-Vigil-Phase``, ``X-Vigil-Priority``, ``X-Vigil-All-Clear`` and
``Date`` (when notify composed it, on the run's clock). Each page is exactly one of:

- **all clear** (``X-Vigil-All-Clear: yes``);
- **true page** of an event kind: a dedup key's patient had a true event of a kind that key's
  rule speaks of, between ``EARLY`` before its start and ``GRACE`` after its end (buffered data
  is paged when it arrives, up to a dropout later). A fever page during a borderline fever (the
  core within the thermometers' error of the definition, ``vigil_tools.simulator.course``) is true:
  the readings may well have met the definition;
- **false page**: anything else about a patient of the course;
- **other**: not about a patient of the course (the pipeline's self-watch).

**Pages** are the true and false pages; **e-mails** are all of them about patients of the
course, all clears included.

A **night page** is a page composed 22:00-07:00 in the homes' zone, true or false; an all clear
then is counted apart (``night_all_clears``): all clears are information, not pages (they go
only to those the alarm paged, marked as such; docs/notify.md, "All clear at night").
An event is **recalled** when at least one true page of its kind, for its patient, falls in its
window. Recall is measured for the kinds owed a page (``PAGED_KINDS``); borderline fevers are
counted apart (``borderline_fevers``: how many, how many paged), owed nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from vigil_tools.simulator.course import PAGED_KINDS, EventKind, TrueEvent

EARLY = timedelta(minutes=5)
GRACE = timedelta(hours=2)
NIGHT_FROM_HOUR = 22
NIGHT_TO_HOUR = 7

_PUMP_KINDS = (EventKind.OCCLUSION, EventKind.PUMP_STOP, EventKind.LOW_BATTERY)


@dataclass(frozen=True, slots=True)
class Page:
    dedup_keys: tuple[str, ...]
    phase: str
    priority: str
    all_clear: bool
    sent_at: datetime
    repeat: bool = False

    @staticmethod
    def from_headers(headers: dict[str, str]) -> Page:
        from email.utils import parsedate_to_datetime

        keys = tuple(k.strip() for k in (headers.get("X-Vigil-Dedup-Key") or "").split(",") if k)
        return Page(
            dedup_keys=keys,
            phase=headers.get("X-Vigil-Phase") or "",
            priority=headers.get("X-Vigil-Priority") or "",
            all_clear=(headers.get("X-Vigil-All-Clear") or "").lower() == "yes",
            sent_at=parsedate_to_datetime(headers["Date"]),
            repeat=bool(headers.get("X-Vigil-Repeat")),
        )


def rule_of(dedup_key: str) -> str:
    """The rule a dedup key names (``<patient>:<rule>:…``; the fever-unobserved key starts with
    its fever episode's key)."""
    parts = dedup_key.split(":")
    if "fever_unobserved" in parts:
        return "fever_unobserved"
    return parts[1] if len(parts) > 1 else ""


def kinds_for(dedup_key: str) -> tuple[EventKind, ...]:
    """The true event kinds a page of this key can be about."""
    parts = dedup_key.split(":")
    rule = rule_of(dedup_key)
    if rule in ("fever", "fever_unobserved"):
        return (EventKind.FEVER, EventKind.BORDERLINE_FEVER)
    if rule == "pump_alarm":
        code = parts[3] if len(parts) > 3 else ""
        if code.startswith("occlusion"):
            return (EventKind.OCCLUSION,)
        if code.startswith("battery"):
            return (EventKind.LOW_BATTERY,)
        if code == "infusion_stopped":
            return (EventKind.PUMP_STOP, EventKind.OCCLUSION)
        return _PUMP_KINDS
    if rule == "interruption_clock":
        return (EventKind.PUMP_STOP, EventKind.OCCLUSION)
    if rule == "bag_clock":
        return (EventKind.BAG_AT_RISK,)
    # Device silence, sensor fault, 7-day bag: nothing in the course needs them.
    if rule in ("device_silent", "sensor_fault", "seven_day_bag_weight"):
        return ()
    # A rule this classifier does not know yet: judged by the device its key names.
    device = parts[2] if len(parts) > 2 else ""
    if device.startswith("thermo-"):
        return (EventKind.FEVER, EventKind.BORDERLINE_FEVER)
    if device.startswith("pump-"):
        return _PUMP_KINDS
    return ()


def _matches(event: TrueEvent, at: datetime) -> bool:
    return event.start - EARLY <= at <= event.end + GRACE


def classify(
    events: list[TrueEvent],
    pages: list[Page],
    *,
    patients: list[str],
    days: float,
    zone: str,
) -> dict[str, Any]:
    """Counts, rates per patient-day and recall per event kind."""
    tz = ZoneInfo(zone)
    known = set(patients)
    by_patient: dict[str, list[TrueEvent]] = {}
    for event in events:
        by_patient.setdefault(event.patient_id, []).append(event)
    counts: Counter[str] = Counter()
    by_rule: dict[str, Counter[str]] = {}
    true_by_kind: Counter[str] = Counter()
    recalled: set[TrueEvent] = set()
    for page in pages:
        patients_of = {k.split(":")[0] for k in page.dedup_keys}
        if not patients_of & known:
            counts["other"] += 1
            continue
        local = page.sent_at.astimezone(tz)
        at_night = local.hour >= NIGHT_FROM_HOUR or local.hour < NIGHT_TO_HOUR
        if at_night:
            counts["night_all_clear" if page.all_clear else "night"] += 1
        counts["emails"] += 1
        if page.repeat:
            counts["repeats"] += 1
        rules = sorted({rule_of(k) for k in page.dedup_keys})
        label = "+".join(rules)
        if page.all_clear:
            counts["all_clear"] += 1
            by_rule.setdefault(label, Counter())["all_clear"] += 1
            continue
        hit: EventKind | None = None
        for key in page.dedup_keys:
            patient = key.split(":")[0]
            for kind in kinds_for(key):
                for event in by_patient.get(patient, []):
                    if event.kind is kind and _matches(event, page.sent_at):
                        recalled.add(event)
                        hit = hit or kind
        if hit is None:
            counts["false"] += 1
            by_rule.setdefault(label, Counter())["false"] += 1
        else:
            counts["true"] += 1
            true_by_kind[hit.value] += 1
            by_rule.setdefault(label, Counter())["true"] += 1
    patient_days = len(patients) * days

    def per_day(n: int) -> float:
        return round(n / patient_days, 3) if patient_days else 0.0

    recall: dict[str, Any] = {}
    for kind in PAGED_KINDS:
        owed = [e for e in events if e.kind is kind]
        got = sum(1 for e in owed if e in recalled)
        recall[kind.value] = {
            "events": len(owed),
            "paged": got,
            "recall": round(got / len(owed), 3) if owed else None,
        }
    borderline = [e for e in events if e.kind is EventKind.BORDERLINE_FEVER]
    return {
        "patient_days": round(patient_days, 3),
        "emails": counts["emails"],
        "pages": counts["true"] + counts["false"],
        "true_pages": counts["true"],
        "false_pages": counts["false"],
        "all_clears": counts["all_clear"],
        "night_pages": counts["night"],
        "night_all_clears": counts["night_all_clear"],
        "repeat_pages": counts["repeats"],
        "other_pages": counts["other"],
        "emails_per_patient_day": per_day(counts["emails"]),
        "pages_per_patient_day": per_day(counts["true"] + counts["false"]),
        "false_pages_per_patient_day": per_day(counts["false"]),
        "all_clears_per_patient_day": per_day(counts["all_clear"]),
        "night_pages_per_patient_night": per_day(counts["night"]),
        "night_all_clears_per_patient_night": per_day(counts["night_all_clear"]),
        "true_pages_by_kind": dict(sorted(true_by_kind.items())),
        "recall": recall,
        "borderline_fevers": {
            "events": len(borderline),
            "paged": sum(1 for e in borderline if e in recalled),
        },
        "by_rule": {k: dict(sorted(v.items())) for k, v in sorted(by_rule.items())},
    }
