"""Caregiver contacts of a patient, the care team's 24-hour number and the first-response
guidance for families (docs/caregivers.md).

Reading needs ``read_patient`` (contacts: audited, ``caregivers.read``); changes of contacts and
of the number need ``manage_patients`` (charge nurse, admin); guidance is proposed and approved
by two different people who may change thresholds (``change_thresholds``: charge nurse). A
patient or care team outside the caller's care teams is answered 404. The use cases are
``services.api.service_layer.caregivers`` and ``caregiver_guidance``.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import Repository, require
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem, invalid, not_found
from services.api.entrypoints.http.sign_off import (
    DECIDED,
    Limit,
    Status,
    StatusFilter,
    decide,
    person,
)
from services.api.service_layer.caregiver_guidance import (
    GuidanceChanges,
    GuidanceProposal,
    InvalidGuidance,
)
from services.api.service_layer.caregivers import (
    CaregiverContacts,
    Contact,
    ContactFields,
    Invalid,
    Refused,
)

router = APIRouter(prefix="/api", tags=["caregivers"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]
Manager = Annotated[Principal, Depends(require(Action.MANAGE_PATIENTS))]

Language = Literal["en", "fr", "es"]
Phone = Annotated[str, Field(max_length=16, description="International form: + and 7-15 digits.")]
Email = Annotated[str, Field(max_length=254)]


class ContactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sms: Phone | None = Field(default=None, description="SMS number (+ and digits).")
    email: Email | None = None
    language: Language = Field(description="The language of every message to this contact.")
    consent_note: str | None = Field(
        default=None,
        max_length=500,
        description="How consent was given (e.g. 'signed form at discharge'); the caller is "
        "recorded as who recorded it, now as when. No names of the child.",
    )
    preferred_from: time | None = Field(
        default=None,
        description="Start of the preferred hours for messages that are not urgent (the "
        "acknowledgement and the all clear), in the care team's time zone.",
    )
    preferred_until: time | None = None


class ContactChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sms: Phone | None = None
    email: Email | None = None
    language: Language | None = None
    preferred_from: time | None = None
    preferred_until: time | None = None


class ContactView(BaseModel):
    contact_id: UUID
    patient_id: str
    sms: str | None
    email: str | None
    language: str
    consent: Literal["given", "withdrawn"]
    consent_by: str
    consent_at: datetime
    consent_note: str | None
    withdrawn_by: str | None
    withdrawn_at: datetime | None
    preferred_from: time | None
    preferred_until: time | None
    updated_by: str
    updated_at: datetime


class UnitPhone(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit_phone: Phone = Field(description="The unit's 24-hour number families are told to call.")


class UnitPhoneView(BaseModel):
    care_team_id: str
    unit_phone: str | None
    updated_by: str | None
    updated_at: datetime | None


def _view(c: Contact) -> ContactView:
    return ContactView(
        contact_id=c.contact_id,
        patient_id=c.patient_id,
        sms=c.sms,
        email=c.email,
        language=c.language,
        consent="given" if c.consented else "withdrawn",
        consent_by=c.consent_by,
        consent_at=c.consent_at,
        consent_note=c.consent_note,
        withdrawn_by=c.withdrawn_by,
        withdrawn_at=c.withdrawn_at,
        preferred_from=c.preferred_from,
        preferred_until=c.preferred_until,
        updated_by=c.updated_by,
        updated_at=c.updated_at,
    )


def _service(request: Request) -> CaregiverContacts:
    service: CaregiverContacts = request.app.state.caregivers
    return service


async def _patient_team(repository: Repository, principal: Principal, patient_id: str) -> str:
    patient = await repository.patient(principal.care_teams, patient_id)
    if patient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
    return str(patient["care_team_id"])


async def _contact(
    request: Request,
    repository: Repository,
    principal: Principal,
    patient_id: str,
    contact_id: UUID,
) -> Contact:
    """A contact of one of the caller's patients; 404 for another patient's or none."""
    await _patient_team(repository, principal, patient_id)
    contact = await request.app.state.caregiver_store.get(patient_id, contact_id)
    if contact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such caregiver contact")
    assert isinstance(contact, Contact)
    return contact


CHANGED = {
    **not_found("patient or caregiver contact"),
    409: {"model": Problem, "description": "Consent was withdrawn (or already withdrawn)."},
}


@router.get(
    "/patients/{patient_id}/caregivers",
    response_model=list[ContactView],
    responses=not_found("patient"),
)
async def list_contacts(
    request: Request, patient_id: str, principal: Reader, repository: Repository
) -> list[ContactView]:
    """The patient's caregiver contacts, withdrawn ones included (marked so)."""
    await _patient_team(repository, principal, patient_id)
    contacts = await request.app.state.caregiver_store.of_patient(patient_id)
    await request.app.state.audit.record(
        principal.user_id, "caregivers.read", f"patient:{patient_id}", {}
    )
    return [_view(c) for c in contacts]


@router.post(
    "/patients/{patient_id}/caregivers",
    status_code=status.HTTP_201_CREATED,
    response_model=ContactView,
    responses=not_found("patient"),
)
async def add_contact(
    request: Request,
    patient_id: str,
    body: ContactIn,
    principal: Manager,
    repository: Repository,
) -> ContactView:
    """Add a contact with its consent recorded (by the caller, now)."""
    team = await _patient_team(repository, principal, patient_id)
    try:
        contact = await _service(request).add(
            by_user_id=principal.user_id,
            by_username=principal.username,
            patient_id=patient_id,
            care_team_id=team,
            fields=ContactFields(
                sms=body.sms,
                email=body.email,
                language=body.language,
                preferred_from=body.preferred_from,
                preferred_until=body.preferred_until,
            ),
            consent_note=body.consent_note,
        )
    except Invalid as error:
        raise invalid(error.field, str(error), where="body") from None
    return _view(contact)


@router.patch(
    "/patients/{patient_id}/caregivers/{contact_id}",
    response_model=ContactView,
    responses=CHANGED,
)
async def change_contact(
    request: Request,
    patient_id: str,
    contact_id: UUID,
    body: ContactChange,
    principal: Manager,
    repository: Repository,
) -> ContactView:
    """Change a contact's addresses, language or preferred hours (fields left out stay)."""
    contact = await _contact(request, repository, principal, patient_id, contact_id)
    try:
        changed = await _service(request).change(
            by_user_id=principal.user_id,
            by_username=principal.username,
            contact=contact,
            fields=ContactFields(**body.model_dump(exclude_unset=True)),
        )
    except Invalid as error:
        raise invalid(error.field, str(error), where="body") from None
    except Refused as refused:
        raise HTTPException(status.HTTP_409_CONFLICT, str(refused)) from None
    return _view(changed)


@router.post(
    "/patients/{patient_id}/caregivers/{contact_id}/withdraw-consent",
    response_model=ContactView,
    responses=CHANGED,
)
async def withdraw_consent(
    request: Request,
    patient_id: str,
    contact_id: UUID,
    principal: Manager,
    repository: Repository,
) -> ContactView:
    """Consent withdrawn: nothing is sent to this contact from now on (the record stays)."""
    contact = await _contact(request, repository, principal, patient_id, contact_id)
    try:
        withdrawn = await _service(request).withdraw(
            by_user_id=principal.user_id, by_username=principal.username, contact=contact
        )
    except Refused as refused:
        raise HTTPException(status.HTTP_409_CONFLICT, str(refused)) from None
    return _view(withdrawn)


@router.get(
    "/care-teams/{care_team_id}/unit-phone",
    response_model=UnitPhoneView,
    responses=not_found("care team"),
)
async def unit_phone(request: Request, care_team_id: str, principal: Reader) -> UnitPhoneView:
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    row = await request.app.state.caregiver_store.unit_phone(care_team_id)
    return UnitPhoneView(
        care_team_id=care_team_id,
        unit_phone=None if row is None else row["unit_phone"],
        updated_by=None if row is None else row["updated_by"],
        updated_at=None if row is None else row["updated_at"],
    )


@router.put(
    "/care-teams/{care_team_id}/unit-phone",
    response_model=UnitPhoneView,
    responses=not_found("care team"),
)
async def set_unit_phone(
    request: Request, care_team_id: str, body: UnitPhone, principal: Manager
) -> UnitPhoneView:
    """Set the unit's 24-hour number a family is told to call when nobody acknowledged."""
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    try:
        at = await _service(request).set_unit_phone(
            by_user_id=principal.user_id,
            by_username=principal.username,
            care_team_id=care_team_id,
            phone=body.unit_phone,
        )
    except Invalid as error:
        raise invalid(error.field, str(error), where="body") from None
    return UnitPhoneView(
        care_team_id=care_team_id,
        unit_phone=body.unit_phone,
        updated_by=principal.username,
        updated_at=at,
    )


# -- first-response guidance, under two sign-offs --------------------------------------------

Changer = Annotated[Principal, Depends(require(Action.CHANGE_THRESHOLDS))]


class GuidanceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(
        max_length=2000,
        description="What the family is told to do meanwhile (1-200 characters once spaces are "
        "collapsed); no names.",
    )


class GuidanceVersion(BaseModel):
    alarm: str
    language: str
    version: int
    text: str
    proposed_by: str
    signed_off_by: str
    signed_off_at: datetime


class GuidanceProposalView(BaseModel):
    proposal_id: UUID
    care_team_id: str
    alarm: str
    language: str
    text: str
    based_on_version: int = Field(description="The newest version when it was proposed (0: none).")
    proposed_by: str
    proposed_at: datetime
    status: Status
    decided_by: str | None
    decided_at: datetime | None
    version: int | None = Field(description="The version its approval wrote.")


def _proposal_view(p: GuidanceProposal) -> GuidanceProposalView:
    return GuidanceProposalView(
        proposal_id=p.proposal_id,
        care_team_id=p.care_team_id,
        alarm=p.alarm,
        language=p.language,
        text=p.text,
        based_on_version=p.based_on,
        proposed_by=p.proposed_by,
        proposed_at=p.proposed_at,
        status=p.status,
        decided_by=p.decided_by,
        decided_at=p.decided_at,
        version=p.version,
    )


def _guidance(request: Request) -> GuidanceChanges:
    changes: GuidanceChanges = request.app.state.guidance_changes
    return changes


@router.get(
    "/care-teams/{care_team_id}/caregiver-guidance",
    response_model=list[GuidanceVersion],
    responses=not_found("care team"),
)
async def guidance_in_force(
    request: Request, care_team_id: str, principal: Reader
) -> list[GuidanceVersion]:
    """The newest signed-off version of each alarm and language of the team."""
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    rows = await request.app.state.guidance_store.current(care_team_id)
    return [GuidanceVersion(**row) for row in rows]


@router.put(
    "/care-teams/{care_team_id}/caregiver-guidance/{alarm}/{language}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=GuidanceProposalView,
    responses=not_found("care team"),
)
async def propose_guidance(
    request: Request,
    care_team_id: str,
    alarm: str,
    language: str,
    body: GuidanceIn,
    principal: Changer,
) -> GuidanceProposalView:
    """Propose the next version of the guidance for ``alarm`` (``fever``, ``pump_alarm``,
    ``device_silent``, ``data_lost``, or one alert code such as ``pump_occlusion_downstream``)
    in ``language``; it replaces a pending proposal and takes effect when a second person
    approves it."""
    if not principal.sees_team(care_team_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    try:
        proposal = await _guidance(request).propose(
            person(principal), care_team_id, alarm, language, body.text
        )
    except InvalidGuidance as error:
        where = "body" if error.field == "text" else "path"
        raise invalid(error.field, str(error), where=where) from None
    return _proposal_view(proposal)


@router.get("/caregiver-guidance-proposals", response_model=list[GuidanceProposalView])
async def guidance_proposals(
    request: Request,
    principal: Reader,
    status_: StatusFilter = "pending",
    limit: Limit = 100,
) -> list[GuidanceProposalView]:
    """Guidance proposals of the caller's care teams, newest first (default: pending ones)."""
    store = request.app.state.guidance_store
    return [_proposal_view(p) for p in await store.listed(principal.care_teams, status_, limit)]


async def _decide_guidance(
    request: Request, proposal_id: UUID, principal: Principal, approve: bool
) -> GuidanceProposalView:
    store = request.app.state.guidance_store
    return _proposal_view(await decide(store, _guidance(request), proposal_id, principal, approve))


@router.post(
    "/caregiver-guidance-proposals/{proposal_id}/approve",
    response_model=GuidanceProposalView,
    responses=DECIDED,
)
async def approve_guidance(
    request: Request, proposal_id: UUID, principal: Changer
) -> GuidanceProposalView:
    """The second sign-off: someone other than the proposer, who may change thresholds,
    approves; the text becomes the next version. 403 for the proposer."""
    return await _decide_guidance(request, proposal_id, principal, approve=True)


@router.post(
    "/caregiver-guidance-proposals/{proposal_id}/reject",
    response_model=GuidanceProposalView,
    responses=DECIDED,
)
async def reject_guidance(
    request: Request, proposal_id: UUID, principal: Changer
) -> GuidanceProposalView:
    """Reject a pending proposal (``withdrawn`` when its proposer does it)."""
    return await _decide_guidance(request, proposal_id, principal, approve=False)
