"""Request and answer bodies of the notify API: care teams, people, schedules, policies, acks.

Internal contracts (the API is used by the care team's tools, not by devices), so they are not in
the device JSON Schema export. Times are timezone-aware; time zones are IANA names.
"""

from __future__ import annotations

from datetime import date, time
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc
    return name


class CareTeamIn(_Body):
    care_team_id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1)
    oncall_email: str = Field(description="Fallback address when nobody else can be paged.")
    timezone: str = "UTC"

    _check_zone = field_validator("timezone")(_zone)


class ContactMethodIn(_Body):
    channel: Literal["email", "sms", "webhook"]
    address: str = Field(
        min_length=1,
        description="E-mail address, E.164 phone number, or PagerDuty routing key for webhook.",
    )


class PersonIn(_Body):
    person_id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1)
    care_team_id: str | None = None
    contact_methods: tuple[ContactMethodIn, ...] = Field(
        description="Tried in this order; the next one is used when one fails."
    )


class ScheduleIn(_Body):
    schedule_id: str = Field(min_length=1, max_length=100)
    care_team_id: str
    name: str
    timezone: str
    start_date: date
    handoff_time: time = Field(description="Local wall-clock time of the daily hand-off.")
    shift_days: int = Field(default=1, ge=1)
    participants: tuple[str, ...] = Field(min_length=1)

    _check_zone = field_validator("timezone")(_zone)


class OverrideIn(_Body):
    person_id: str
    starts_at: AwareDatetime
    ends_at: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> OverrideIn:
        if self.ends_at <= self.starts_at:
            raise ValueError("an override ends after it starts")
        return self


class TargetIn(_Body):
    kind: Literal["person", "schedule", "email"]
    ref: str = Field(min_length=1)


class StepIn(_Body):
    targets: tuple[TargetIn, ...] = Field(min_length=1)
    wait_minutes: float = Field(ge=0, description="Wait for an acknowledgement before the next.")


class EscalationPolicyIn(_Body):
    policy_id: str = Field(min_length=1, max_length=100)
    name: str
    steps: tuple[StepIn, ...] = Field(min_length=1)
    repeat_count: int = Field(default=0, ge=0, le=100)


class EarlyCycleEscalationIn(_Body):
    """A care team's early-cycle escalation: how a fever in the cytokine-release-syndrome window
    (cycle day 1-3, the dose step-up day or the day after) is escalated instead of the team's
    usual chain. Sets a shorter acknowledgement wait, extra targets paged at once, or both."""

    ack_wait_minutes: float | None = Field(
        default=None,
        gt=0,
        le=24 * 60,
        description="Caps the wait of every step of the usual chain (a shorter step keeps its "
        "own); the chain then repeats so that it pages at least as long as the usual one.",
    )
    extra_targets: tuple[TargetIn, ...] = Field(
        default=(), description="Paged with the first step, at once, e.g. the on-call physician."
    )
    changed_by: str = Field(min_length=1, description="Who sets it, e.g. person:lead-nurse.")

    @model_validator(mode="after")
    def _changes_something(self) -> EarlyCycleEscalationIn:
        if self.ack_wait_minutes is None and not self.extra_targets:
            raise ValueError("set ack_wait_minutes, extra_targets or both")
        if self.ack_wait_minutes is not None and self.ack_wait_minutes * 60 < 1:
            raise ValueError("ack_wait_minutes is at least one second")
        return self


class EarlyCycleEscalationOut(BaseModel):
    care_team_id: str
    ack_wait_minutes: float | None
    extra_targets: tuple[TargetIn, ...]
    updated_at: AwareDatetime
    updated_by: str


class AcknowledgeIn(_Body):
    by: str = Field(min_length=1, description="Who acknowledges, e.g. person:nurse-1.")


class SnoozeIn(_Body):
    by: str = Field(min_length=1)
    minutes: float = Field(gt=0, le=24 * 60)


class AckOut(BaseModel):
    outcome: str
    escalation_id: str | None = None
    detail: str | None = None


class OnCallOut(BaseModel):
    schedule_id: str
    at: AwareDatetime
    person_id: str | None
