"""Diffing two sets of alert decisions: recorded against replayed, or one config against another.

Pure. Alerts are matched first on their identity, ``(dedup_key, phase)``: the same episode phase
decided by both sides. Equal device time is ``same``; a different device time is ``timing``; the
same time with a different code, priority, title or evidence is ``changed``. What is left is then
paired by episode: same patient, rule and phase, nearest device time within a window (a threshold
change moves an episode's start, and with it its dedup key, so it would otherwise look like one
missing and one extra alert). Whatever still has no partner is ``missing`` (left only: recorded
but not reproduced, or no longer fired by the candidate) or ``extra`` (right only).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from schemas.events import Alert


class Outcome(StrEnum):
    SAME = "same"
    TIMING = "timing"
    CHANGED = "changed"
    MISSING = "missing"
    EXTRA = "extra"


@dataclass(frozen=True, slots=True)
class AlertDiff:
    """One decision compared: the left alert, the right alert, or both, and how they differ."""

    outcome: Outcome
    left: Alert | None
    right: Alert | None
    matched_by: str | None = None  # "key" or "episode"
    differences: tuple[str, ...] = ()

    @property
    def delta(self) -> timedelta | None:
        """Right device time minus left: negative means the right side fired earlier."""
        if self.left is None or self.right is None:
            return None
        return self.right.device_time - self.left.device_time

    @property
    def any_alert(self) -> Alert:
        alert = self.left or self.right
        assert alert is not None  # a diff always has at least one side
        return alert

    def as_dict(self) -> dict[str, Any]:
        delta = self.delta
        alert = self.any_alert
        return {
            "outcome": self.outcome.value,
            "matched_by": self.matched_by,
            "patient_id": alert.patient_id,
            "rule_id": alert.rule_id,
            "phase": alert.phase.value,
            "left_dedup_key": self.left.dedup_key if self.left else None,
            "right_dedup_key": self.right.dedup_key if self.right else None,
            "left_code": self.left.code if self.left else None,
            "right_code": self.right.code if self.right else None,
            "left_device_time": self.left.device_time.isoformat() if self.left else None,
            "right_device_time": self.right.device_time.isoformat() if self.right else None,
            "delta_s": delta.total_seconds() if delta is not None else None,
            "left_rule_version": self.left.rule_version if self.left else None,
            "right_rule_version": self.right.rule_version if self.right else None,
            "differences": list(self.differences),
        }


@dataclass(frozen=True, slots=True)
class AlertDiffReport:
    left_label: str
    right_label: str
    items: tuple[AlertDiff, ...]

    def counts(self) -> dict[str, int]:
        counted = Counter(item.outcome.value for item in self.items)
        return {outcome.value: counted.get(outcome.value, 0) for outcome in Outcome}

    @property
    def identical(self) -> bool:
        return all(item.outcome is Outcome.SAME for item in self.items)

    def as_dict(self) -> dict[str, Any]:
        return {
            "left": self.left_label,
            "right": self.right_label,
            "counts": self.counts(),
            "identical": self.identical,
            "items": [item.as_dict() for item in self.items],
        }


def _content_differences(left: Alert, right: Alert, *, compare_rule_version: bool) -> list[str]:
    fields = ["code", "priority", "state", "kind", "device_id", "title", "evidence"]
    if compare_rule_version:
        fields.append("rule_version")
        # The alerts table predates config versions: a side that does not know it, does not
        # contradict the other.
        if left.config_version is not None and right.config_version is not None:
            fields.append("config_version")
    return [name for name in fields if getattr(left, name) != getattr(right, name)]


def diff_alerts(
    left: Sequence[Alert],
    right: Sequence[Alert],
    *,
    left_label: str = "recorded",
    right_label: str = "replayed",
    episode_window: timedelta = timedelta(hours=6),
    compare_rule_version: bool = True,
) -> AlertDiffReport:
    """Compare two alert sets (``compare_rule_version=False`` when versions differ on purpose)."""
    left_by_key = {(a.dedup_key, a.phase): a for a in left}
    right_by_key = {(a.dedup_key, a.phase): a for a in right}
    items: list[AlertDiff] = []
    for key, left_alert in left_by_key.items():
        right_alert = right_by_key.get(key)
        if right_alert is None:
            continue
        differences = _content_differences(
            left_alert, right_alert, compare_rule_version=compare_rule_version
        )
        if left_alert.device_time != right_alert.device_time:
            outcome = Outcome.TIMING
            differences = ["device_time", *differences]
        elif differences:
            outcome = Outcome.CHANGED
        else:
            outcome = Outcome.SAME
        items.append(AlertDiff(outcome, left_alert, right_alert, "key", tuple(differences)))

    left_rest = [a for k, a in left_by_key.items() if k not in right_by_key]
    right_rest = [a for k, a in right_by_key.items() if k not in left_by_key]
    items.extend(_pair_episodes(left_rest, right_rest, episode_window, compare_rule_version))
    items.sort(key=lambda d: (d.any_alert.patient_id, d.any_alert.device_time, d.outcome.value))
    return AlertDiffReport(left_label, right_label, tuple(items))


def _pair_episodes(
    left: Iterable[Alert],
    right: Iterable[Alert],
    window: timedelta,
    compare_rule_version: bool,
) -> list[AlertDiff]:
    groups: dict[tuple[str, str, str], list[Alert]] = defaultdict(list)
    for alert in right:
        groups[(alert.patient_id, alert.rule_id, alert.phase.value)].append(alert)
    items: list[AlertDiff] = []
    for left_alert in sorted(left, key=lambda a: a.device_time):
        candidates = groups.get((left_alert.patient_id, left_alert.rule_id, left_alert.phase.value))
        best: Alert | None = None
        if candidates:
            best = min(candidates, key=lambda a: abs(a.device_time - left_alert.device_time))
            if abs(best.device_time - left_alert.device_time) > window:
                best = None
        if best is None:
            items.append(AlertDiff(Outcome.MISSING, left_alert, None))
            continue
        assert candidates is not None
        candidates.remove(best)
        differences = _content_differences(
            left_alert, best, compare_rule_version=compare_rule_version
        )
        moved = best.device_time != left_alert.device_time
        items.append(
            AlertDiff(
                Outcome.TIMING if moved else Outcome.CHANGED,
                left_alert,
                best,
                "episode",
                (*(("device_time",) if moved else ()), "dedup_key", *differences),
            )
        )
    for remaining in groups.values():
        items.extend(AlertDiff(Outcome.EXTRA, None, alert) for alert in remaining)
    return items
