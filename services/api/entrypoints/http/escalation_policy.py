"""How a care team is paged: its escalation policy, its quiet hours and its early-cycle
escalation (how a fever in the cytokine-release-syndrome window is escalated).

Reading needs ``read_patient`` (every role of the team); changes need ``manage_team`` (charge
nurse, admin). Policy changes are audited here; quiet hours and the early-cycle escalation are
audited by notify's use cases in the transaction of the change, with the caller as the actor. A
team that is not one of the caller's answers 404, and a policy may name only the team's own
people and schedules. Read and written through ``services.notify.public.TeamRegistry``.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.notify import EarlyCycleEscalationIn, EscalationPolicyIn, StepIn, TargetIn
from services.api.domain.access import Action, Principal
from services.api.domain.oncall import unknown_refs
from services.api.entrypoints.http.deps import require
from services.api.entrypoints.http.oncall import audit, registry, team_or_404, zone_name
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem, invalid, not_found

router = APIRouter(prefix="/api/care-teams", tags=["escalation"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]
Manager = Annotated[Principal, Depends(require(Action.MANAGE_TEAM))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Body):
    kind: Literal["person", "schedule", "email"] = Field(
        description="One of the team's people, whoever is on call on one of its schedules, or "
        "an e-mail address."
    )
    ref: str = Field(min_length=1, max_length=320)


class Step(_Body):
    targets: list[Target] = Field(min_length=1, max_length=20)
    wait_minutes: float = Field(
        ge=0, le=7 * 24 * 60, description="Wait for an acknowledgement before the next step."
    )


class TargetView(BaseModel):
    kind: str
    ref: str


class StepView(BaseModel):
    targets: list[TargetView]
    wait_minutes: float


class PolicyBody(_Body):
    policy_id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=200)
    steps: list[Step] = Field(min_length=1, max_length=20)
    repeat_count: int = Field(default=0, ge=0, le=100, description="Passes after the first.")


class PolicyView(BaseModel):
    care_team_id: str
    policy_id: str
    name: str
    steps: list[StepView]
    repeat_count: int
    updated_at: datetime


class QuietHoursBody(_Body):
    """LOW and INFO alerts arriving between ``start`` and ``end`` (local wall-clock time in
    ``timezone``; across midnight when start > end) are held and paged as one digest when they
    end. HIGH and MEDIUM are never held."""

    timezone: str = Field(description="IANA time zone, e.g. Europe/Berlin.")
    start: time = Field(description="Local time quiet hours begin, e.g. 22:00.")
    end: time = Field(description="Local time they end, e.g. 07:00.")

    _zone = field_validator("timezone")(zone_name)

    @model_validator(mode="after")
    def _window(self) -> QuietHoursBody:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("start and end are local times in timezone, without an offset")
        if self.start == self.end:
            raise ValueError("quiet hours start and end at different times")
        return self


class QuietHoursView(BaseModel):
    care_team_id: str
    timezone: str
    start: time
    end: time
    updated_at: datetime
    updated_by: str


class EarlyCycleBody(_Body):
    """How the team's fevers in the CRS window (cycle day 1-3, the dose step-up day or the day
    after) are escalated instead of the usual chain: a shorter wait, extra targets, or both."""

    ack_wait_minutes: float | None = Field(
        default=None,
        gt=0,
        le=24 * 60,
        description="Caps the wait of every step of the usual chain; the chain then repeats "
        "so that it pages at least as long as the usual one.",
    )
    extra_targets: list[Target] = Field(
        default=[], max_length=20, description="Paged with the first step, at once."
    )

    @model_validator(mode="after")
    def _changes_something(self) -> EarlyCycleBody:
        if self.ack_wait_minutes is None and not self.extra_targets:
            raise ValueError("set ack_wait_minutes, extra_targets or both")
        if self.ack_wait_minutes is not None and self.ack_wait_minutes * 60 < 1:
            raise ValueError("ack_wait_minutes is at least one second")
        return self


class EarlyCycleView(BaseModel):
    care_team_id: str
    ack_wait_minutes: float | None
    extra_targets: list[TargetView]
    updated_at: datetime
    updated_by: str


async def check_targets(
    request: Request, care_team_id: str, field: str, targets: list[Target]
) -> None:
    """422 when a target names a person or schedule that is not the team's."""
    people = [p["person_id"] for p in await registry(request).people(care_team_id)]
    schedules = await registry(request).schedule_ids(care_team_id)
    unknown = unknown_refs(((t.kind, t.ref) for t in targets), people, schedules)
    if unknown:
        raise invalid(field, "not the team's: " + ", ".join(unknown), where="body")


@router.get(
    "/{care_team_id}/escalation-policy",
    response_model=PolicyView,
    responses=not_found("care team, or no policy of its own (its on-call address is paged)"),
)
async def get_policy(request: Request, care_team_id: str, principal: Reader) -> PolicyView:
    await team_or_404(request, principal, care_team_id)
    policy = await registry(request).policy(care_team_id)
    if policy is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no policy: the on-call address is paged")
    return PolicyView(
        care_team_id=care_team_id,
        policy_id=policy["policy_id"],
        name=policy["name"],
        steps=[
            StepView(
                targets=[TargetView(kind=t["kind"], ref=t["ref"]) for t in step["targets"]],
                wait_minutes=step["wait_s"] / 60,
            )
            for step in policy["steps"]
        ],
        repeat_count=policy["repeat_count"],
        updated_at=policy["updated_at"],
    )


@router.put(
    "/{care_team_id}/escalation-policy",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={
        **not_found("care team"),
        409: {"model": Problem, "description": "The policy_id is another care team's policy's."},
    },
)
async def put_policy(
    request: Request, care_team_id: str, body: PolicyBody, principal: Manager
) -> Response:
    """Replace the team's escalation policy. Alerts already escalating keep the policy they
    opened with; new alerts use this one."""
    await team_or_404(request, principal, care_team_id)
    await check_targets(request, care_team_id, "steps", [t for s in body.steps for t in s.targets])
    before = await registry(request).policy(care_team_id)
    policy = EscalationPolicyIn(
        policy_id=body.policy_id,
        name=body.name,
        steps=tuple(
            StepIn(
                targets=tuple(TargetIn(kind=t.kind, ref=t.ref) for t in step.targets),
                wait_minutes=step.wait_minutes,
            )
            for step in body.steps
        ),
        repeat_count=body.repeat_count,
    )
    if not await registry(request).put_policy(care_team_id, policy):
        raise HTTPException(status.HTTP_409_CONFLICT, "policy_id is in use by another care team")
    await audit(
        request,
        principal,
        "care_team.escalation_policy_changed",
        care_team_id,
        {
            "before": None
            if before is None
            else {k: before[k] for k in ("policy_id", "name", "steps", "repeat_count")},
            "after": body.model_dump(),
        },
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{care_team_id}/quiet-hours",
    response_model=QuietHoursView,
    responses=not_found("care team, or no quiet hours (every alert pages at once)"),
)
async def get_quiet_hours(request: Request, care_team_id: str, principal: Reader) -> QuietHoursView:
    await team_or_404(request, principal, care_team_id)
    quiet = await registry(request).quiet_hours(care_team_id)
    if quiet is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no quiet hours: every alert pages now")
    return QuietHoursView(care_team_id=care_team_id, **quiet)


@router.put(
    "/{care_team_id}/quiet-hours",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=not_found("care team"),
)
async def put_quiet_hours(
    request: Request, care_team_id: str, body: QuietHoursBody, principal: Manager
) -> Response:
    """Set the team's quiet hours; a digest already pending is paged no later than their new
    end. Audited with the old and new hours."""
    await team_or_404(request, principal, care_team_id)
    if not await registry(request).set_quiet_hours(
        care_team_id, timezone=body.timezone, start=body.start, end=body.end, by=principal.user_id
    ):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/{care_team_id}/quiet-hours",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=not_found("care team, or no quiet hours"),
)
async def delete_quiet_hours(request: Request, care_team_id: str, principal: Manager) -> Response:
    """Remove the team's quiet hours; a pending digest is paged at once. Audited."""
    await team_or_404(request, principal, care_team_id)
    if not await registry(request).remove_quiet_hours(care_team_id, by=principal.user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no quiet hours")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{care_team_id}/early-cycle-escalation",
    response_model=EarlyCycleView,
    responses=not_found("care team, or no early-cycle escalation (the usual chain pages)"),
)
async def get_early_cycle(request: Request, care_team_id: str, principal: Reader) -> EarlyCycleView:
    await team_or_404(request, principal, care_team_id)
    override = await registry(request).early_cycle(care_team_id)
    if override is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "no early-cycle escalation: early-cycle fevers page the usual chain",
        )
    wait = override["ack_wait_s"]
    return EarlyCycleView(
        care_team_id=care_team_id,
        ack_wait_minutes=None if wait is None else wait / 60,
        extra_targets=[TargetView(kind=t["kind"], ref=t["ref"]) for t in override["extra_targets"]],
        updated_at=override["updated_at"],
        updated_by=override["updated_by"],
    )


@router.put(
    "/{care_team_id}/early-cycle-escalation",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=not_found("care team"),
)
async def put_early_cycle(
    request: Request, care_team_id: str, body: EarlyCycleBody, principal: Manager
) -> Response:
    """Set how the team's early-cycle fevers are escalated. Audited with the old and new
    setting."""
    await team_or_404(request, principal, care_team_id)
    await check_targets(request, care_team_id, "extra_targets", body.extra_targets)
    setting = EarlyCycleEscalationIn(
        ack_wait_minutes=body.ack_wait_minutes,
        extra_targets=tuple(TargetIn(kind=t.kind, ref=t.ref) for t in body.extra_targets),
        changed_by=principal.user_id,
    )
    if not await registry(request).set_early_cycle(care_team_id, setting):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/{care_team_id}/early-cycle-escalation",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=not_found("care team, or no early-cycle escalation"),
)
async def delete_early_cycle(request: Request, care_team_id: str, principal: Manager) -> Response:
    """Remove the override: early-cycle fevers page the usual chain again. Audited."""
    await team_or_404(request, principal, care_team_id)
    if not await registry(request).remove_early_cycle(care_team_id, by=principal.user_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no early-cycle escalation")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
