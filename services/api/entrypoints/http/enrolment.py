"""Enrolment and device onboarding: enrol a patient, change their weight, register a device (its
registry entry, MQTT account and binding in one step), bind, unbind and swap devices, rotate or
revoke a device's credential, and read a device's history.

Changes need ``manage_patients`` (charge nurse, admin); reading a device's history needs
``read_patient``. A patient or device outside the caller's care teams is answered 404, as
everywhere in this API. The use cases are ``services.api.service_layer.enrolment``.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.api.domain.access import Action, Principal
from services.api.entrypoints.http.deps import require
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem, Responses, invalid
from services.api.service_layer.enrolment import (
    Actor,
    BindingRecord,
    BrokerUnavailable,
    Conflict,
    DeviceConfiguration,
    DeviceRecord,
    Enrolment,
    EnrolmentError,
    EnrolmentService,
    Invalid,
    NewDevice,
    NotFound,
    PatientView,
)

router = APIRouter(prefix="/api", tags=["enrolment"], responses=AUTHENTICATED)
Manager = Annotated[Principal, Depends(require(Action.MANAGE_PATIENTS))]
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PatientId = Annotated[str, Field(pattern=ID_PATTERN, description="1-64 of A-Z a-z 0-9 _ . -")]
DeviceId = Annotated[
    str,
    Field(
        pattern=ID_PATTERN,
        description="The device's MQTT username and client id: 1-64 of A-Z a-z 0-9 _ . -, "
        "not starting with `vigil-` (docs/mqtt.md 1.1).",
    ),
]


def _errors(*codes: int) -> Responses:
    described = {
        404: "No such patient, device or care team in the caller's care teams: one of another "
        "team answers the same as one that does not exist.",
        409: "The registry does not allow it as it stands (an id in use, an overlapping "
        "binding, a device not bound then).",
        503: "This API process has no access to the broker's device accounts; nothing was written.",
    }
    return {code: {"model": Problem, "description": described[code]} for code in codes}


def get_enrolment(request: Request) -> EnrolmentService:
    service: EnrolmentService = request.app.state.enrolment
    return service


Service = Annotated[EnrolmentService, Depends(get_enrolment)]


def _actor(principal: Principal) -> Actor:
    return Actor(principal.user_id, principal.care_teams)


def _http(error: EnrolmentError) -> Exception:
    if isinstance(error, Invalid):
        # Answered in FastAPI's validation shape, like every other 422 of this API.
        return invalid(error.field, str(error), where="body")
    if isinstance(error, NotFound):
        code = status.HTTP_404_NOT_FOUND
    elif isinstance(error, Conflict):
        code = status.HTTP_409_CONFLICT
    elif isinstance(error, BrokerUnavailable):
        code = status.HTTP_503_SERVICE_UNAVAILABLE
    else:  # pragma: no cover - every subclass is mapped above
        code = status.HTTP_400_BAD_REQUEST
    return HTTPException(code, str(error))


# -- models --------------------------------------------------------------------------------


class PatientEnrolment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: PatientId
    care_team_id: str = Field(description="One of the caller's care teams.")
    weight_kg: float = Field(gt=0, lt=1000)
    birth_date: date | None = Field(
        default=None, description="The date of birth; give this or age_years, not both."
    )
    age_years: int | None = Field(default=None, ge=0, le=130)
    cycle_start: AwareDatetime = Field(
        description="Start of the current blinatumomab cycle (day 1), with a UTC offset. "
        "The rules read it as the patient's current cycle."
    )
    step_up_day: int | None = Field(
        default=None, ge=1, description="The day of the dose step-up (8 in the usual schedule)."
    )


class WeightChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight_kg: float = Field(gt=0, lt=1000)


class CycleOut(BaseModel):
    cycle_start: datetime
    step_up_day: int | None


class PatientOut(BaseModel):
    patient_id: str
    care_team_id: str
    weight_kg: float | None
    birth_date: date | None
    age_years: int | None
    cycle: CycleOut | None = Field(description="The current cycle.")


class DeviceRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: DeviceId
    kind: Literal["pump", "thermometer"]
    model: str | None = Field(default=None, max_length=200)
    reporting: Literal["continuous", "spot_check"] = Field(
        default="continuous",
        description="How a thermometer reports: `continuous` (a patch, a monitor) or "
        "`spot_check` (read by a caregiver a few times a day). Pumps are continuous.",
    )
    care_team_id: str | None = Field(
        default=None, description="The care team the device is for; default: the patient's."
    )
    patient_id: str | None = Field(default=None, description="Bind the device to this patient.")
    bound_from: AwareDatetime | None = Field(
        default=None, description="Start of the binding (device time); default: now."
    )


class DeviceOut(BaseModel):
    device_id: str
    kind: str
    model: str | None
    reporting: str
    care_team_id: str | None


class BindingOut(BaseModel):
    device_id: str
    patient_id: str | None = Field(description="None: a patient of another care team.")
    valid_from: datetime
    valid_to: datetime | None = Field(description="None: open-ended.")


class Configuration(BaseModel):
    """What the device must be configured with (docs/mqtt.md). The password is shown here once
    and stored nowhere else; rotate the credential when it is lost."""

    client_id: str
    username: str
    password: str
    host: str | None = Field(description="The broker's host (None: not known to this process).")
    port: int | None
    tls: bool | None
    ca_certificate: str | None = Field(description="Where the CA the device must trust is.")
    topic_prefix: str = Field(description="Publish under this prefix, e.g. `<prefix>temperature`.")
    channels: list[str]


class Registered(BaseModel):
    device: DeviceOut
    binding: BindingOut | None
    configuration: Configuration


class Bind(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str
    valid_from: AwareDatetime | None = Field(default=None, description="Default: now.")
    valid_to: AwareDatetime | None = Field(default=None, description="Default: open-ended.")


class Unbind(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: AwareDatetime | None = Field(
        default=None, description="When the binding in force then ends; default: now."
    )


class Swap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    old_device_id: str
    new_device_id: str
    at: AwareDatetime | None = Field(
        default=None, description="When the new device takes over; default: now."
    )


class Swapped(BaseModel):
    ended: BindingOut
    started: BindingOut


class CredentialEventOut(BaseModel):
    action: str
    at: datetime


class HistoryOut(BaseModel):
    device: DeviceOut
    bindings: list[BindingOut] = Field(description="Oldest first.")
    credential_events: list[CredentialEventOut]


def _patient(view: PatientView) -> PatientOut:
    p = view.patient
    cycle = view.cycle
    return PatientOut(
        patient_id=p.patient_id,
        care_team_id=p.care_team_id,
        weight_kg=p.weight_kg,
        birth_date=p.birth_date,
        age_years=p.age_years,
        cycle=CycleOut(cycle_start=cycle.cycle_start, step_up_day=cycle.step_up_day)
        if cycle
        else None,
    )


def _device(d: DeviceRecord) -> DeviceOut:
    return DeviceOut(
        device_id=d.device_id,
        kind=d.kind,
        model=d.model,
        reporting=d.reporting,
        care_team_id=d.care_team_id,
    )


def _binding(b: BindingRecord) -> BindingOut:
    return BindingOut(
        device_id=b.device_id,
        patient_id=b.patient_id or None,
        valid_from=b.valid_from,
        valid_to=b.valid_to,
    )


def _configuration(c: DeviceConfiguration) -> Configuration:
    return Configuration(
        client_id=c.client_id,
        username=c.username,
        password=c.password,
        host=c.host,
        port=c.port,
        tls=c.tls,
        ca_certificate=c.ca_certificate,
        topic_prefix=c.topic_prefix,
        channels=list(c.channels),
    )


# -- routes --------------------------------------------------------------------------------


@router.post(
    "/patients",
    response_model=PatientOut,
    status_code=status.HTTP_201_CREATED,
    responses=_errors(404, 409),
)
async def enrol(body: PatientEnrolment, principal: Manager, service: Service) -> PatientOut:
    """Enrol a child: care team, weight, date of birth or age, and the current cycle."""
    try:
        view = await service.enrol(
            _actor(principal),
            Enrolment(
                patient_id=body.patient_id,
                care_team_id=body.care_team_id,
                weight_kg=body.weight_kg,
                cycle_start=body.cycle_start,
                step_up_day=body.step_up_day,
                birth_date=body.birth_date,
                age_years=body.age_years,
            ),
        )
    except EnrolmentError as error:
        raise _http(error) from None
    return _patient(view)


@router.put("/patients/{patient_id}/weight", response_model=PatientOut, responses=_errors(404))
async def change_weight(
    patient_id: str, body: WeightChange, principal: Manager, service: Service
) -> PatientOut:
    try:
        view = await service.set_weight(_actor(principal), patient_id, body.weight_kg)
    except EnrolmentError as error:
        raise _http(error) from None
    return _patient(view)


@router.post("/patients/{patient_id}/swap", response_model=Swapped, responses=_errors(404, 409))
async def swap(patient_id: str, body: Swap, principal: Manager, service: Service) -> Swapped:
    """Replace one of the patient's devices by another of the same kind (a pump at a bag
    change): the old binding ends at the instant the new one begins."""
    try:
        ended, started = await service.swap(
            _actor(principal), patient_id, body.old_device_id, body.new_device_id, body.at
        )
    except EnrolmentError as error:
        raise _http(error) from None
    return Swapped(ended=_binding(ended), started=_binding(started))


@router.post(
    "/devices",
    response_model=Registered,
    status_code=status.HTTP_201_CREATED,
    responses=_errors(404, 409, 503),
)
async def register_device(
    body: DeviceRegistration, principal: Manager, service: Service
) -> Registered:
    """Register a device in one step: its registry entry, its MQTT account and (with
    `patient_id`) its binding, all or nothing. The answer holds the password, once."""
    try:
        done = await service.register_device(
            _actor(principal),
            NewDevice(
                device_id=body.device_id,
                kind=body.kind,
                model=body.model,
                reporting=body.reporting,
                care_team_id=body.care_team_id,
                patient_id=body.patient_id,
                bound_from=body.bound_from,
            ),
        )
    except EnrolmentError as error:
        raise _http(error) from None
    return Registered(
        device=_device(done.device),
        binding=_binding(done.binding) if done.binding else None,
        configuration=_configuration(done.configuration),
    )


@router.post(
    "/devices/{device_id}/bindings",
    response_model=BindingOut,
    status_code=status.HTTP_201_CREATED,
    responses=_errors(404, 409),
)
async def bind(device_id: str, body: Bind, principal: Manager, service: Service) -> BindingOut:
    """Bind the device to a patient for a period that overlaps none of its other bindings."""
    try:
        binding = await service.bind(
            _actor(principal), device_id, body.patient_id, body.valid_from, body.valid_to
        )
    except EnrolmentError as error:
        raise _http(error) from None
    return _binding(binding)


@router.post("/devices/{device_id}/unbind", response_model=BindingOut, responses=_errors(404, 409))
async def unbind(device_id: str, body: Unbind, principal: Manager, service: Service) -> BindingOut:
    """End the device's binding in force at `at`; readings it takes later are not accepted."""
    try:
        binding = await service.unbind(_actor(principal), device_id, body.at)
    except EnrolmentError as error:
        raise _http(error) from None
    return _binding(binding)


@router.post(
    "/devices/{device_id}/credentials/rotate",
    response_model=Configuration,
    responses=_errors(404, 503),
)
async def rotate(device_id: str, principal: Manager, service: Service) -> Configuration:
    """A new password for the device (shown once); the old one stops working."""
    try:
        configuration = await service.rotate_credential(_actor(principal), device_id)
    except EnrolmentError as error:
        raise _http(error) from None
    return _configuration(configuration)


@router.delete(
    "/devices/{device_id}/credentials",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_errors(404, 503),
)
async def revoke(device_id: str, principal: Manager, service: Service) -> Response:
    """Delete the device's MQTT account: it is disconnected and cannot connect again."""
    try:
        await service.revoke_credential(_actor(principal), device_id)
    except EnrolmentError as error:
        raise _http(error) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/devices/{device_id}/history", response_model=HistoryOut, responses=_errors(404))
async def history(device_id: str, principal: Reader, service: Service) -> HistoryOut:
    """The device, its bindings and its credential events (issued, rotated, revoked)."""
    try:
        found = await service.device_history(_actor(principal), device_id)
    except EnrolmentError as error:
        raise _http(error) from None
    return HistoryOut(
        device=_device(found.device),
        bindings=[_binding(b) for b in found.bindings],
        credential_events=[
            CredentialEventOut(action=e.action, at=e.at) for e in found.credential_events
        ],
    )
