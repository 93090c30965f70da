"""End of infusion and discharge: ``POST /api/patients/{id}/end-infusion``, ``POST
/api/patients/{id}/discharge`` and ``GET /api/discharged``.

The two changes need ``manage_patients`` (charge nurse, admin); the list needs
``read_patient``. A patient outside the caller's care teams is answered 404, as everywhere in
this API. Both changes are idempotent: the same request again answers the same record (200)
and changes nothing; another time or reason for what is already recorded is 409. The use cases
are ``services.api.service_layer.discharge``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import require
from services.api.entrypoints.http.enrolment import _actor, _http
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem, Responses
from services.api.service_layer.discharge import (
    MAX_REASON,
    CourseRecord,
    DischargeService,
    Outcome,
)
from services.api.service_layer.enrolment import EnrolmentError

router = APIRouter(prefix="/api", tags=["discharge"], responses=AUTHENTICATED)
Manager = Annotated[Principal, Depends(require(Action.MANAGE_PATIENTS))]
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]

ERRORS: Responses = {
    404: {
        "model": Problem,
        "description": "No such patient in the caller's care teams: one of another team answers "
        "the same as one that does not exist.",
    },
    409: {
        "model": Problem,
        "description": "Already recorded otherwise: the infusion ended or the patient was "
        "discharged at another time (or for another reason); an end of infusion asked after "
        "the discharge; a device bound to the patient only from that time on (unbind it "
        "first).",
    },
}


def get_discharge(request: Request) -> DischargeService:
    service: DischargeService = request.app.state.discharge
    return service


Service = Annotated[DischargeService, Depends(get_discharge)]


class EndInfusion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: AwareDatetime | None = Field(
        default=None,
        description="When the bag course ended (the pump was disconnected), with a UTC "
        "offset; default: now. Not in the future.",
    )


class Discharge(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=1,
        max_length=MAX_REASON,
        description="Why the patient is discharged (course completed, admitted, transferred…).",
    )
    at: AwareDatetime | None = Field(
        default=None,
        description="When the patient was discharged, with a UTC offset; default: now. Not in "
        "the future, not before a recorded end of infusion.",
    )


class UnboundOut(BaseModel):
    device_id: str
    kind: str
    valid_from: datetime
    valid_to: datetime = Field(description="The binding's new end: the time given.")


class CourseOut(BaseModel):
    patient_id: str
    care_team_id: str
    status: Literal["monitored", "infusion_ended", "discharged"]
    infusion_ended_at: datetime | None
    discharged_at: datetime | None
    discharge_reason: str | None
    discharged_by: str | None


class OutcomeOut(BaseModel):
    patient: CourseOut
    devices_unbound: list[UnboundOut] = Field(
        description="The bindings this call ended (none when it repeated an earlier call)."
    )
    escalations_closed: int = Field(
        description="Notify's escalations this call resolved (reason `discharged`, or "
        "`infusion ended` for the pumps' alerts)."
    )
    changed: bool = Field(description="False: it was already recorded so; nothing changed.")


def _course(r: CourseRecord) -> CourseOut:
    return CourseOut(
        patient_id=r.patient_id,
        care_team_id=r.care_team_id,
        status=r.status,
        infusion_ended_at=r.infusion_ended_at,
        discharged_at=r.discharged_at,
        discharge_reason=r.discharge_reason,
        discharged_by=r.discharged_by,
    )


def _outcome(o: Outcome) -> OutcomeOut:
    return OutcomeOut(
        patient=_course(o.record),
        devices_unbound=[
            UnboundOut(
                device_id=b.device_id, kind=b.kind, valid_from=b.valid_from, valid_to=b.valid_to
            )
            for b in o.ended
            if b.valid_to is not None
        ],
        escalations_closed=o.escalations_closed,
        changed=o.changed,
    )


@router.post("/patients/{patient_id}/end-infusion", response_model=OutcomeOut, responses=ERRORS)
async def end_infusion(
    patient_id: str, body: EndInfusion, principal: Manager, service: Service
) -> OutcomeOut:
    """The bag course is over: the patient's pumps are unbound at `at`, the infusion rules
    (pump alarms, pump silent, bag and interruption clocks) page nothing about them from then
    on and open escalations of the pumps' alerts are resolved. The thermometers stay bound:
    fever monitoring goes on until discharge."""
    try:
        done = await service.end_infusion(_actor(principal), patient_id, body.at)
    except EnrolmentError as error:
        raise _http(error) from None
    return _outcome(done)


@router.post("/patients/{patient_id}/discharge", response_model=OutcomeOut, responses=ERRORS)
async def discharge(
    patient_id: str, body: Discharge, principal: Manager, service: Service
) -> OutcomeOut:
    """Discharge the patient: every device binding still open ends at `at`, no rule pages for
    them from then on (a device going quiet is not paged, a reading taken later is not
    evaluated), every open escalation of theirs is resolved with the reason `discharged`. The
    record, readings, alerts and timelines stay readable; the patient leaves the roster and is
    listed by `GET /api/discharged`."""
    try:
        done = await service.discharge(_actor(principal), patient_id, body.reason, body.at)
    except EnrolmentError as error:
        raise _http(error) from None
    return _outcome(done)


@router.get("/discharged", response_model=list[CourseOut])
async def discharged(principal: Reader, service: Service) -> list[CourseOut]:
    """The discharged patients of the caller's care teams, most recently discharged first."""
    return [_course(r) for r in await service.discharged(_actor(principal))]
