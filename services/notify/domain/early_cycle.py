"""Which chain a fever in the cytokine-release-syndrome window is escalated on: pure selection.

The rules mark a fever on cycle day 1-3, or on the dose step-up day or the day after, with a
``cycle_day`` evidence item (value: the cycle day; ``services/rules/domain/fever.py``). Such a
fever may be grade-1 CRS and must reach a clinician faster than the same fever on day 15, so a
care team can set an **early-cycle override** of its escalation (``EarlyCycleOverride``): an
acknowledgement wait that caps every step's wait, and extra targets (e.g. the on-call physician)
paged with the first step, at once. ``select_policy`` applies it to the team's usual chain when
the alert opens; the result is frozen on the escalation like any policy (``PolicySnapshot.
early_cycle`` says why, for the audit and for the page's words, ``crs_note``).

Without an override the usual chain runs unchanged; the snapshot still records the cycle day,
and the page still says it. No clock, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from schemas.events import Alert, AlertPhase
from services.notify.domain.escalation import EarlyCycle, PolicySnapshot, StepSnapshot, Target
from services.notify.domain.schedule import Rotation

#: The evidence item the rules' early-cycle composite adds to a fever.
CYCLE_DAY_EVIDENCE = "cycle_day"
#: The suffix of ``policy_id`` of a chain the override changed.
EARLY_CYCLE_POLICY_SUFFIX = "+early-cycle"
#: The most passes an override may add to keep the chain paging as long as the usual one.
MAX_REPEATS = 100


@dataclass(frozen=True, slots=True)
class EarlyCycleOverride:
    """A care team's early-cycle escalation, with the schedules its targets name.

    ``ack_wait_s`` caps the wait of every step of the usual chain (a step that already waits
    less keeps its wait: the override never slows a chain down); ``extra_targets`` are paged
    with the first step. At least one of the two is set.
    """

    ack_wait_s: int | None
    extra_targets: tuple[Target, ...] = ()
    schedules: dict[str, Rotation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ack_wait_s is None and not self.extra_targets:
            raise ValueError("an early-cycle override sets an ack wait, extra targets or both")
        if self.ack_wait_s is not None and self.ack_wait_s < 1:
            raise ValueError("an early-cycle ack wait is at least one second")
        for target in self.extra_targets:
            if target.kind == "schedule" and target.ref not in self.schedules:
                raise ValueError(f"schedule {target.ref} is not in the override")


def crs_cycle_day(alert: Alert) -> int | None:
    """The cycle day of an alert the rules put in the CRS window, None for any other alert.

    An ``end`` phase never carries it (an all clear is not escalated)."""
    if alert.phase is AlertPhase.END:
        return None
    for item in alert.evidence:
        if item.name == CYCLE_DAY_EVIDENCE:
            return int(item.value)
    return None


def select_policy(
    usual: PolicySnapshot, override: EarlyCycleOverride | None, alert: Alert
) -> PolicySnapshot:
    """The policy to freeze for ``alert``: ``usual`` for an alert outside the CRS window; in
    it, ``usual`` changed by the team's ``override`` (or unchanged when it has none), with the
    reason recorded in ``early_cycle``."""
    day = crs_cycle_day(alert)
    if day is None:
        return usual
    if override is None:
        return replace(
            usual,
            early_cycle=EarlyCycle(
                cycle_day=day, usual_policy_id=usual.policy_id, overridden=False
            ),
        )
    steps = tuple(
        StepSnapshot(
            targets=_with_extra(step.targets, override.extra_targets if index == 0 else ()),
            wait_s=step.wait_s
            if override.ack_wait_s is None
            else min(step.wait_s, override.ack_wait_s),
        )
        for index, step in enumerate(usual.steps)
    )
    return PolicySnapshot(
        policy_id=f"{usual.policy_id}{EARLY_CYCLE_POLICY_SUFFIX}",
        steps=steps,
        repeat_count=_repeats_to_page_as_long(usual, steps),
        schedules={**usual.schedules, **override.schedules},
        early_cycle=EarlyCycle(
            cycle_day=day,
            usual_policy_id=usual.policy_id,
            overridden=True,
            ack_wait_s=override.ack_wait_s,
            extra_targets=override.extra_targets,
        ),
    )


def _with_extra(targets: tuple[Target, ...], extra: tuple[Target, ...]) -> tuple[Target, ...]:
    return targets + tuple(t for t in extra if t not in targets)


def last_page_after_s(steps: tuple[StepSnapshot, ...], repeat_count: int) -> int:
    """Seconds from the first step to the last page of an unanswered chain: it is exhausted
    when the last step of its last pass fires, without waiting after it."""
    cycle = sum(s.wait_s for s in steps)
    return repeat_count * cycle + cycle - steps[-1].wait_s


def _repeats_to_page_as_long(usual: PolicySnapshot, steps: tuple[StepSnapshot, ...]) -> int:
    """The passes of the shorter-waiting chain: at least the usual number, and enough that an
    unanswered early-cycle fever is paged for at least as long as the usual chain pages (a
    shorter wait must not end the paging sooner). Capped at ``MAX_REPEATS``."""
    cycle = sum(s.wait_s for s in steps)
    if cycle == 0:
        return usual.repeat_count
    span = last_page_after_s(usual.steps, usual.repeat_count)
    needed = math.ceil((span - (cycle - steps[-1].wait_s)) / cycle)
    return min(MAX_REPEATS, max(usual.repeat_count, needed))


def _wait_text(seconds: int) -> str:
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _target_text(target: Target) -> str:
    if target.kind == "schedule":
        return f"whoever is on call on schedule {target.ref}"
    return f"{target.kind} {target.ref}" if target.ref else "the care team's fallback address"


def crs_note(early: EarlyCycle) -> str:
    """What the page says about the CRS window and how this escalation differs for it, e.g.
    ``ESCALATION: cycle day 2: CRS window (cytokine release syndrome risk). Early-cycle
    policy: acknowledge within 2 min; also paged at once: person dr-ward.``"""
    head = f"ESCALATION: cycle day {early.cycle_day}: CRS window (cytokine release syndrome risk)."
    if not early.overridden:
        return f"{head} Paged on the care team's usual chain (no early-cycle policy set)."
    parts = []
    if early.ack_wait_s is not None:
        parts.append(f"acknowledge within {_wait_text(early.ack_wait_s)}")
    if early.extra_targets:
        parts.append(
            "also paged at once: " + ", ".join(_target_text(t) for t in early.extra_targets)
        )
    return f"{head} Early-cycle policy of the care team: {'; '.join(parts)}."


def crs_sms_note(early: EarlyCycle) -> str:
    """The same for an SMS, short: ``Cycle day 2: CRS window.``"""
    return f"Cycle day {early.cycle_day}: CRS window."
