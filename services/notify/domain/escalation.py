"""The escalation engine: a pure state machine from alert events and clock ticks to page commands.

``advance(snapshot, state, event)`` returns the next state, the people or addresses to page, and
the timeline entries to record; it never reads a clock, a database or a socket. The shell stores
``state.due_at`` in PostgreSQL and sends a ``Tick`` when it falls due, so a restart continues
where it stopped. The policy is a ``PolicySnapshot`` frozen when the alert opened: later edits
to the policy or its schedules do not change an escalation already running.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Any, Literal

from services.notify.domain.routing import PagePurpose
from services.notify.domain.schedule import Override, Rotation, on_call_at

TargetKind = Literal["person", "schedule", "email"]

# The recipient of a ``NotifyFallback``: the care team's fallback address, resolved by the shell.
FALLBACK_RECIPIENT = "fallback:"


@dataclass(frozen=True, slots=True)
class Target:
    """Whom a step pages: a person, whoever a schedule has on call, or a bare e-mail address."""

    kind: TargetKind
    ref: str


@dataclass(frozen=True, slots=True)
class StepSnapshot:
    """Page ``targets``, then wait ``wait_s`` seconds for an acknowledgement before going on."""

    targets: tuple[Target, ...]
    wait_s: int


@dataclass(frozen=True, slots=True)
class EarlyCycle:
    """Why an escalation runs the early-cycle variant of its team's chain, frozen with it.

    Set on a snapshot opened for an alert in the cytokine-release-syndrome window (cycle day 1-3,
    the step-up day or the day after: the rules' ``cycle_day`` evidence); ``domain.early_cycle``
    builds it. ``overridden`` is False when the team has no early-cycle override: the usual
    chain runs unchanged and only the page says which day of the cycle it is.
    """

    cycle_day: int
    usual_policy_id: str
    overridden: bool
    # The acknowledgement wait the override caps every step at (None: the usual waits).
    ack_wait_s: int | None = None
    # Paged with the first step, at once, on every pass of the chain.
    extra_targets: tuple[Target, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """An escalation policy as it was when the alert opened, with the schedules it names.

    The whole chain runs ``1 + repeat_count`` times before it is exhausted. ``early_cycle`` is
    set when the policy was chosen for an alert in the CRS window (see ``EarlyCycle``).
    """

    policy_id: str
    steps: tuple[StepSnapshot, ...]
    repeat_count: int
    schedules: dict[str, Rotation] = field(default_factory=dict)
    early_cycle: EarlyCycle | None = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a policy needs at least one step")
        if self.repeat_count < 0:
            raise ValueError("repeat_count cannot be negative")
        for step in self.steps:
            if step.wait_s < 0:
                raise ValueError("a step cannot wait a negative time")
            for target in step.targets:
                if target.kind == "schedule" and target.ref not in self.schedules:
                    raise ValueError(f"schedule {target.ref} is not in the snapshot")


#: The chain of a team without a policy of its own, and of an alert nobody's policy covers (an
#: unregistered patient): one address, paged again every five minutes, four times in all, until
#: someone acknowledges.
DEFAULT_POLICY_WAIT_S = 300
DEFAULT_POLICY_REPEATS = 3
#: The address paged when nobody else can be (``VIGIL_NOTIFY_FALLBACK_EMAIL`` overrides it).
DEFAULT_FALLBACK_EMAIL = "vigil-oncall-fallback@localhost"


def page_until_acknowledged(
    policy_id: str,
    address: str,
    *,
    wait_s: int = DEFAULT_POLICY_WAIT_S,
    repeats: int = DEFAULT_POLICY_REPEATS,
) -> PolicySnapshot:
    """A one-step policy paging ``address`` every ``wait_s`` seconds, ``1 + repeats`` times,
    until acknowledged: the default policy of a team and the fallback chain of an unroutable
    alert are both this, so neither can page once and never again."""
    return PolicySnapshot(
        policy_id=policy_id,
        steps=(StepSnapshot(targets=(Target("email", address),), wait_s=wait_s),),
        repeat_count=repeats,
    )


class EscalationStatus(StrEnum):
    OPEN = "open"
    EXHAUSTED = "exhausted"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class EscalationState:
    status: EscalationStatus
    step_index: int
    pass_no: int
    due_at: datetime | None
    paged: tuple[str, ...] = ()
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    resolved_at: datetime | None = None
    snoozed_until: datetime | None = None
    # How many snoozes restarted the chain: the pages of each round are told apart by it.
    round_no: int = 0


def opened(at: datetime) -> EscalationState:
    """A fresh escalation whose first step is due at once."""
    _aware(at)
    return EscalationState(status=EscalationStatus.OPEN, step_index=0, pass_no=0, due_at=at)


# -- events in ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    now: datetime


@dataclass(frozen=True, slots=True)
class Acknowledge:
    by: str
    at: datetime
    via: str


@dataclass(frozen=True, slots=True)
class Resolve:
    at: datetime
    # Why, when it is not the alert's own end or a person's resolve (e.g. "discharged"):
    # written on the timeline's resolved entry.
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Snooze:
    """Hold the chain until ``until``; then it pages again from the first step."""

    until: datetime
    at: datetime
    by: str


@dataclass(frozen=True, slots=True)
class Worsen:
    """The alert's escalate phase arrived: tell whoever was already paged."""

    at: datetime


EscalationEvent = Tick | Acknowledge | Resolve | Snooze | Worsen

# -- commands and timeline out ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotifyRecipient:
    """Page ``recipient`` (``person:<id>`` or ``email:<address>``)."""

    recipient: str
    purpose: PagePurpose
    step_index: int
    pass_no: int


@dataclass(frozen=True, slots=True)
class NotifyFallback:
    """A schedule had nobody on call: page the care team's fallback address instead."""

    reason: str
    step_index: int
    pass_no: int


PageCommand = NotifyRecipient | NotifyFallback


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    kind: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Transition:
    state: EscalationState
    commands: tuple[PageCommand, ...] = ()
    timeline: tuple[TimelineEntry, ...] = ()

    @property
    def stopped(self) -> bool:
        return self.state.due_at is None


def advance(snapshot: PolicySnapshot, state: EscalationState, event: EscalationEvent) -> Transition:
    """The one transition function of an escalation."""
    if isinstance(event, Tick):
        return _tick(snapshot, state, event.now)
    if isinstance(event, Acknowledge):
        return _acknowledge(state, event)
    if isinstance(event, Resolve):
        return _resolve(state, event)
    if isinstance(event, Snooze):
        return _snooze(state, event)
    return _worsen(state, event)


def _tick(snapshot: PolicySnapshot, state: EscalationState, now: datetime) -> Transition:
    _aware(now)
    if state.status is not EscalationStatus.OPEN or state.due_at is None or now < state.due_at:
        return Transition(state)
    step = snapshot.steps[state.step_index]
    commands: list[PageCommand] = []
    seen: set[str] = set()
    purpose = PagePurpose.ALERT
    for target in step.targets:
        recipient: str | None
        if target.kind == "person":
            recipient = f"person:{target.ref}"
        elif target.kind == "email":
            recipient = f"email:{target.ref}"
        else:
            person = on_call_at(snapshot.schedules[target.ref], now)
            recipient = None if person is None else f"person:{person}"
            if recipient is None:
                commands.append(
                    NotifyFallback(
                        reason=f"schedule {target.ref} has nobody on call",
                        step_index=state.step_index,
                        pass_no=state.pass_no,
                    )
                )
                continue
        if recipient in seen:
            continue
        seen.add(recipient)
        commands.append(
            NotifyRecipient(
                recipient=recipient,
                purpose=purpose,
                step_index=state.step_index,
                pass_no=state.pass_no,
            )
        )
    if not step.targets:
        commands.append(
            NotifyFallback(
                reason="escalation step names nobody",
                step_index=state.step_index,
                pass_no=state.pass_no,
            )
        )

    if any(isinstance(c, NotifyFallback) for c in commands):
        # The fallback address was paged too, so it is owed the all-clear like anyone else.
        seen.add(FALLBACK_RECIPIENT)
    paged = state.paged + tuple(r for r in sorted(seen) if r not in state.paged)
    next_index, next_pass = state.step_index + 1, state.pass_no
    if next_index >= len(snapshot.steps):
        next_index, next_pass = 0, state.pass_no + 1
    fired = TimelineEntry(
        "step_fired",
        {
            "step": state.step_index,
            "pass": state.pass_no,
            "recipients": [c.recipient for c in commands if isinstance(c, NotifyRecipient)],
            "fallback": [c.reason for c in commands if isinstance(c, NotifyFallback)],
        },
    )
    if next_pass > snapshot.repeat_count:
        new_state = replace(state, status=EscalationStatus.EXHAUSTED, due_at=None, paged=paged)
        return Transition(
            new_state,
            tuple(commands),
            (fired, TimelineEntry("exhausted", {"passes": next_pass})),
        )
    # The wait runs from when the step actually fired, so a late tick never shortens the time a
    # person has to answer.
    new_state = replace(
        state,
        step_index=next_index,
        pass_no=next_pass,
        due_at=now + timedelta(seconds=step.wait_s),
        paged=paged,
        snoozed_until=None,
    )
    return Transition(new_state, tuple(commands), (fired,))


def _acknowledge(state: EscalationState, event: Acknowledge) -> Transition:
    _aware(event.at)
    if state.acknowledged_by is not None:
        return Transition(
            state, timeline=(TimelineEntry("ack_repeated", {"by": event.by, "via": event.via}),)
        )
    status = state.status
    if status in (EscalationStatus.OPEN, EscalationStatus.EXHAUSTED):
        status = EscalationStatus.ACKNOWLEDGED
    new_state = replace(
        state,
        status=status,
        due_at=None,
        acknowledged_by=event.by,
        acknowledged_at=event.at,
    )
    return Transition(
        new_state, timeline=(TimelineEntry("acknowledged", {"by": event.by, "via": event.via}),)
    )


def _resolve(state: EscalationState, event: Resolve) -> Transition:
    _aware(event.at)
    if state.status is EscalationStatus.RESOLVED:
        return Transition(state)
    new_state = replace(state, status=EscalationStatus.RESOLVED, due_at=None, resolved_at=event.at)
    commands = tuple(
        NotifyRecipient(
            recipient=r, purpose=PagePurpose.ALL_CLEAR, step_index=-1, pass_no=state.pass_no
        )
        for r in state.paged
    )
    detail: dict[str, Any] = {"all_clear_to": list(state.paged)}
    if event.reason is not None:
        detail["reason"] = event.reason
    return Transition(new_state, commands, (TimelineEntry("resolved", detail),))


def _snooze(state: EscalationState, event: Snooze) -> Transition:
    _aware(event.at)
    _aware(event.until)
    if event.until <= event.at:
        raise ValueError("a snooze ends after it starts")
    if state.status not in (EscalationStatus.OPEN, EscalationStatus.EXHAUSTED):
        return Transition(state)
    new_state = replace(
        state,
        status=EscalationStatus.OPEN,
        step_index=0,
        pass_no=0,
        due_at=event.until,
        snoozed_until=event.until,
        round_no=state.round_no + 1,
    )
    return Transition(
        new_state,
        timeline=(TimelineEntry("snoozed", {"by": event.by, "until": event.until.isoformat()}),),
    )


def _worsen(state: EscalationState, event: Worsen) -> Transition:
    _aware(event.at)
    if state.status is EscalationStatus.RESOLVED:
        return Transition(state)
    commands = tuple(
        NotifyRecipient(
            recipient=r, purpose=PagePurpose.ESCALATION, step_index=-2, pass_no=state.pass_no
        )
        for r in state.paged
    )
    return Transition(state, commands, (TimelineEntry("worsened", {"told": list(state.paged)}),))


def _aware(at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError("times must be timezone-aware")


# -- the snapshot as stored in escalations.snapshot ---------------------------------------------


def snapshot_to_json(snapshot: PolicySnapshot) -> dict[str, Any]:
    data: dict[str, Any] = {
        "policy_id": snapshot.policy_id,
        "repeat_count": snapshot.repeat_count,
        "steps": [
            {"wait_s": s.wait_s, "targets": [{"kind": t.kind, "ref": t.ref} for t in s.targets]}
            for s in snapshot.steps
        ],
        "schedules": {
            key: {
                "timezone": r.timezone,
                "start_date": r.start_date.isoformat(),
                "handoff_time": r.handoff_time.isoformat(),
                "shift_days": r.shift_days,
                "participants": list(r.participants),
                "overrides": [
                    {
                        "person_id": o.person_id,
                        "starts_at": o.starts_at.isoformat(),
                        "ends_at": o.ends_at.isoformat(),
                    }
                    for o in r.overrides
                ],
            }
            for key, r in snapshot.schedules.items()
        },
    }
    if snapshot.early_cycle is not None:
        data["early_cycle"] = early_cycle_to_json(snapshot.early_cycle)
    return data


def early_cycle_to_json(early: EarlyCycle) -> dict[str, Any]:
    return {
        "cycle_day": early.cycle_day,
        "usual_policy_id": early.usual_policy_id,
        "overridden": early.overridden,
        "ack_wait_s": early.ack_wait_s,
        "extra_targets": [{"kind": t.kind, "ref": t.ref} for t in early.extra_targets],
    }


def early_cycle_from_json(data: dict[str, Any] | None) -> EarlyCycle | None:
    """The ``early_cycle`` of a stored snapshot; None for a snapshot without one (every snapshot
    frozen before early-cycle policies existed)."""
    if not data:
        return None
    wait = data.get("ack_wait_s")
    return EarlyCycle(
        cycle_day=int(data["cycle_day"]),
        usual_policy_id=str(data["usual_policy_id"]),
        overridden=bool(data["overridden"]),
        ack_wait_s=None if wait is None else int(wait),
        extra_targets=tuple(
            Target(kind=t["kind"], ref=str(t["ref"])) for t in data.get("extra_targets", ())
        ),
    )


def snapshot_from_json(data: dict[str, Any]) -> PolicySnapshot:
    return PolicySnapshot(
        policy_id=str(data["policy_id"]),
        repeat_count=int(data["repeat_count"]),
        steps=tuple(
            StepSnapshot(
                wait_s=int(s["wait_s"]),
                targets=tuple(Target(kind=t["kind"], ref=str(t["ref"])) for t in s["targets"]),
            )
            for s in data["steps"]
        ),
        schedules={
            key: Rotation(
                schedule_id=key,
                timezone=str(r["timezone"]),
                start_date=date.fromisoformat(r["start_date"]),
                handoff_time=time.fromisoformat(r["handoff_time"]),
                shift_days=int(r["shift_days"]),
                participants=tuple(r["participants"]),
                overrides=tuple(
                    Override(
                        person_id=o["person_id"],
                        starts_at=datetime.fromisoformat(o["starts_at"]),
                        ends_at=datetime.fromisoformat(o["ends_at"]),
                    )
                    for o in r["overrides"]
                ),
            )
            for key, r in data.get("schedules", {}).items()
        },
        early_cycle=early_cycle_from_json(data.get("early_cycle")),
    )
