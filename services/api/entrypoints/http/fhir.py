"""The FHIR R4 interface: read and search of readings, devices, alarms and pages, the
CapabilityStatement, and asynchronous bulk export (``Patient/$export``).

Served as its own application under ``/fhir`` (its own OpenAPI document at
``/fhir/openapi.json``), so its errors are FHIR ``OperationOutcome`` resources without changing
how the care-team API answers. Authentication and care-team scoping are the API's: the same
bearer tokens, the same roles, and a patient of another team answers 404 like no patient.
Every read and search is audited.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.adapters.fhir import FhirRepository
from services.api.domain import fhir
from services.api.domain.access import Action, Principal
from services.api.domain.fhir_capability import (
    EXPORT_TYPES,
    capability_statement,
    export_manifest,
)
from services.api.domain.fhir_scopes import PATIENT_READ, USER_READ, fhir_access
from services.api.domain.fhir_search import (
    SearchError,
    date_range,
    observation_kinds,
    reference_id,
)
from services.api.entrypoints.http.deps import Clock, require
from services.api.service_layer.fhir_export import (
    FILE_PIECE,
    MAX_RUNNING_PER_USER,
    ExportJob,
    ExportJobs,
)

FHIR_JSON = "application/fhir+json"
FHIR_NDJSON = "application/fhir+ndjson"
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

router = APIRouter(tags=["fhir"])


@dataclass(frozen=True, slots=True)
class Caller:
    """Who reads through /fhir: the user, the user's care teams and, for a token with only a
    patient-level scope (``patient/*.read``), the one patient it may read."""

    user_id: str
    care_teams: frozenset[str]
    patient: str | None

    def sees(self, patient_id: object) -> bool:
        """Whether a patient of the caller's teams is within the token's scope."""
        return self.patient is None or patient_id == self.patient


def _caller(
    request: Request, principal: Annotated[Principal, Depends(require(Action.READ_PATIENT))]
) -> Caller:
    claims = getattr(request.state, "token_claims", None)
    access = fhir_access(claims.scope, claims.patient) if claims is not None else None
    if access is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"the token has no FHIR read scope ({USER_READ} or {PATIENT_READ})",
        )
    return Caller(principal.user_id, principal.care_teams, access.patient)


Reader = Annotated[Caller, Depends(_caller)]


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _repository(request: Request) -> FhirRepository:
    repository: FhirRepository = request.app.state.fhir_repository
    return repository


def _jobs(request: Request) -> ExportJobs:
    jobs: ExportJobs = request.app.state.fhir_exports
    return jobs


Repository = Annotated[FhirRepository, Depends(_repository)]
Jobs = Annotated[ExportJobs, Depends(_jobs)]


def base_url(request: Request) -> str:
    """The FHIR base (``…/fhir``) as the client reached it. Starlette's ``base_url`` stops at
    the root application; the mount's own prefix is what ``root_path`` adds to it."""
    root = str(request.scope.get("root_path", ""))
    app_root = str(request.scope.get("app_root_path", ""))
    mount = root[len(app_root) :] if root.startswith(app_root) else root
    return str(request.base_url).rstrip("/") + mount


async def _audit(
    request: Request, principal: Caller, action: str, subject: str, **details: Any
) -> None:
    await request.app.state.audit.record(principal.user_id, action, subject, details)


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no such {what}")


async def _patient_id(repository: FhirRepository, principal: Caller, value: str) -> str:
    """The patient a ``patient`` parameter names, if the caller's teams have it (else 404)."""
    try:
        patient_id = reference_id(value, "Patient")
    except SearchError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    if not principal.sees(patient_id):
        raise _not_found("patient")
    if await repository.patient(principal.care_teams, patient_id) is None:
        # 404, not 403: a patient of another team is indistinguishable from no patient.
        raise _not_found("patient")
    return patient_id


def _page_links(request: Request, offset: int, count: int, total: int) -> tuple[str, str | None]:
    self_url = str(request.url)
    if offset + count >= total:
        return self_url, None
    return self_url, str(request.url.include_query_params(_offset=offset + count))


# -- metadata -------------------------------------------------------------------------------


@router.get("/metadata", response_class=FhirResponse)
async def metadata(request: Request, principal: Reader, clock: Clock) -> FhirResponse:
    """The CapabilityStatement: what this server reads, searches and exports."""
    return FhirResponse(capability_statement(base_url(request), clock(), request.app.version))


# -- bulk export (declared before Patient/{id}, which would otherwise take "$export") --------


def _export_types(value: str | None) -> tuple[str, ...]:
    if not value:
        return EXPORT_TYPES
    asked = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in asked if t not in EXPORT_TYPES]
    if unknown:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"cannot export {', '.join(unknown)}")
    return tuple(t for t in EXPORT_TYPES if t in asked)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "_since is not a FHIR instant") from exc
    if at.utcoffset() is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "_since needs a UTC offset")
    return at


async def _kick_off(
    request: Request,
    principal: Caller,
    repository: FhirRepository,
    jobs: ExportJobs,
    prefer: str | None,
    output_format: str | None,
    patients: list[str],
    types: str | None,
    since: str | None,
) -> Response:
    if prefer is None or "respond-async" not in prefer:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "bulk export needs Prefer: respond-async")
    if output_format not in (None, FHIR_NDJSON, "application/ndjson", "ndjson"):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "_outputFormat: only NDJSON")
    wanted_types, since_at = _export_types(types), _since(since)
    if patients:
        patient_ids = [await _patient_id(repository, principal, p) for p in patients]
    else:
        patient_ids = [
            p for p in await repository.patient_ids(principal.care_teams) if principal.sees(p)
        ]
    if await jobs.running_for(principal.user_id) >= MAX_RUNNING_PER_USER:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "too many exports running",
            headers={"Retry-After": "5"},
        )
    job = await jobs.start(
        owner=principal.user_id,
        scope_patient=principal.patient,
        teams=principal.care_teams,
        request_url=str(request.url),
        patient_ids=list(dict.fromkeys(patient_ids)),
        types=wanted_types,
        since=since_at,
    )
    await _audit(
        request,
        principal,
        "fhir.export",
        "patients",
        job_id=job.job_id,
        patients=job.patient_ids,
        types=list(wanted_types),
    )
    return Response(
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Content-Location": f"{base_url(request)}/$export-status/{job.job_id}"},
    )


@router.get("/Patient/$export", status_code=202, response_class=Response)
async def export_kick_off(
    request: Request,
    principal: Reader,
    repository: Repository,
    jobs: Jobs,
    prefer: Annotated[str | None, Header()] = None,
    output_format: Annotated[str | None, Query(alias="_outputFormat")] = None,
    types: Annotated[str | None, Query(alias="_type")] = None,
    since: Annotated[str | None, Query(alias="_since")] = None,
    patient: Annotated[
        list[str] | None,
        Query(
            description="Patients to export (references or ids; commas or repeats). "
            "Default: every patient of the caller's care teams."
        ),
    ] = None,
) -> Response:
    """Bulk Data kick-off: 202 with the status URL in Content-Location."""
    patients = [p for value in patient or [] for p in value.split(",") if p.strip()]
    return await _kick_off(
        request, principal, repository, jobs, prefer, output_format, patients, types, since
    )


@router.post("/Patient/$export", status_code=202, response_class=Response)
async def export_kick_off_post(
    request: Request,
    principal: Reader,
    repository: Repository,
    jobs: Jobs,
    prefer: Annotated[str | None, Header()] = None,
) -> Response:
    """Bulk Data kick-off with a ``Parameters`` body (``patient``, ``_type``, ``_since``,
    ``_outputFormat``)."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the body is not JSON") from exc
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the body must be a Parameters resource")
    patients: list[str] = []
    values: dict[str, str] = {}
    for parameter in body.get("parameter") or []:
        if not isinstance(parameter, dict):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "a parameter must be an object")
        name = parameter.get("name")
        if name == "patient":
            ref = (parameter.get("valueReference") or {}).get("reference")
            if not isinstance(ref, str):
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "patient needs valueReference")
            patients.append(ref)
        elif name in ("_type", "_since", "_outputFormat"):
            value = next((v for k, v in parameter.items() if k.startswith("value")), None)
            if not isinstance(value, str):
                raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{name} needs a value")
            values[name] = value
        else:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"unsupported parameter {name}")
    return await _kick_off(
        request,
        principal,
        repository,
        jobs,
        prefer,
        values.get("_outputFormat"),
        patients,
        values.get("_type"),
        values.get("_since"),
    )


async def _own_job(jobs: ExportJobs, job_id: str, principal: Caller) -> ExportJob:
    job = await jobs.get(job_id, principal.user_id, principal.patient)
    if job is None:
        raise _not_found("export")
    return job


@router.get("/$export-status/{job_id}", response_model=None)
async def export_status(request: Request, job_id: str, principal: Reader, jobs: Jobs) -> Response:
    """202 while the export runs (``X-Progress``), then 200 and the manifest; 500 with an
    OperationOutcome if it failed."""
    job = await _own_job(jobs, job_id, principal)
    if job.storing:
        await jobs.want(job)
    if job.status == "running":
        progress = f"{job.done_patients} of {len(job.patient_ids)} patients"
        return Response(
            status_code=status.HTTP_202_ACCEPTED,
            headers={
                "X-Progress": "storing the files" if job.storing else progress,
                "Retry-After": "1",
            },
        )
    if job.status == "failed":
        return FhirResponse(
            fhir.operation_outcome("exception", job.error or "export failed"),
            status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    base = base_url(request)
    outputs = [
        (t, f"{base}/$export-file/{job.job_id}/{t}.ndjson", job.counts[t])
        for t in EXPORT_TYPES
        if t in job.counts
    ]
    return JSONResponse(export_manifest(job.transaction_time, job.request_url, outputs))


@router.delete("/$export-status/{job_id}", status_code=202, response_class=Response)
async def export_cancel(job_id: str, principal: Reader, jobs: Jobs) -> Response:
    """Cancel a running export or delete a finished one's files."""
    if not await jobs.delete(job_id, principal.user_id, principal.patient):
        raise _not_found("export")
    return Response(status_code=status.HTTP_202_ACCEPTED)


@router.get("/$export-file/{job_id}/{file_name}", response_class=Response)
async def export_file(job_id: str, file_name: str, principal: Reader, jobs: Jobs) -> Response:
    """One NDJSON file of a finished export (``<ResourceType>.ndjson``)."""
    job = await _own_job(jobs, job_id, principal)
    resource_type = file_name.removesuffix(".ndjson")
    if resource_type not in job.counts or not (
        job.status == "complete" or (job.storing and await jobs.wait_stored(job))
    ):
        raise _not_found("export file")
    content = job.files.get(resource_type)
    if content is None:
        # A job another replica ran: its stored file, piece by piece.
        return StreamingResponse(jobs.stored_file(job, resource_type), media_type=FHIR_NDJSON)
    return StreamingResponse(
        _pieces(content),
        media_type=FHIR_NDJSON,
        headers={"Content-Length": str(len(content))},
    )


async def _pieces(content: bytes) -> AsyncIterator[memoryview]:
    # In pieces: handing the server tens of megabytes at once made it copy them whole (once to
    # frame the body, again into the socket's send buffer).
    view = memoryview(content)
    for start in range(0, len(view), FILE_PIECE):
        yield view[start : start + FILE_PIECE]


# -- Patient ----------------------------------------------------------------------------------


@router.get("/Patient/{patient_id}", response_class=FhirResponse)
async def read_patient(
    request: Request, patient_id: str, principal: Reader, repository: Repository
) -> FhirResponse:
    found = principal.sees(patient_id) and await repository.patient(
        principal.care_teams, patient_id
    )
    if not found:
        raise _not_found("patient")
    await _audit(request, principal, "fhir.patient.read", f"patient:{patient_id}")
    return FhirResponse(fhir.patient(patient_id))


@router.get("/Patient", response_class=FhirResponse)
async def search_patients(
    request: Request,
    principal: Reader,
    repository: Repository,
    identifier: Annotated[str, Query(description="system|value or value")],
) -> FhirResponse:
    system, _, value = identifier.rpartition("|")
    found: list[dict[str, Any]] = []
    known_system = system in ("", fhir.PATIENT_IDENTIFIER)
    if (
        known_system
        and value
        and principal.sees(value)
        and await repository.patient(principal.care_teams, value)
    ):
        found.append(fhir.patient(value))
        await _audit(request, principal, "fhir.patient.search", f"patient:{value}")
    return FhirResponse(
        fhir.searchset(
            found,
            self_url=str(request.url),
            next_url=None,
            total=len(found),
            base_url=base_url(request),
        )
    )


# -- Device -----------------------------------------------------------------------------------


@router.get("/Device/{device_id}", response_class=FhirResponse)
async def read_device(
    request: Request, device_id: str, principal: Reader, repository: Repository
) -> FhirResponse:
    if principal.patient is None:
        row = await repository.device(principal.care_teams, device_id)
    elif await repository.patient(principal.care_teams, principal.patient) is None:
        row = None
    else:
        # A patient-level token reads the devices ever bound to its patient, and names no other
        # patient (the newest binding may be someone else's by now).
        row = next(
            (
                d
                for d in await repository.devices_of(principal.patient)
                if d["device_id"] == device_id
            ),
            None,
        )
    if row is None:
        raise _not_found("device")
    await _audit(request, principal, "fhir.device.read", f"device:{device_id}")
    return FhirResponse(fhir.device(row))


@router.get("/Device", response_class=FhirResponse)
async def search_devices(
    request: Request, principal: Reader, repository: Repository, patient: str
) -> FhirResponse:
    patient_id = await _patient_id(repository, principal, patient)
    devices = [fhir.device(r) for r in await repository.devices_of(patient_id)]
    await _audit(request, principal, "fhir.device.search", f"patient:{patient_id}")
    return FhirResponse(
        fhir.searchset(
            devices,
            self_url=str(request.url),
            next_url=None,
            total=len(devices),
            base_url=base_url(request),
        )
    )


# -- Observation ------------------------------------------------------------------------------


def _observation(row: dict[str, Any]) -> dict[str, Any]:
    if row["kind"] == "temperature":
        return fhir.temperature_observation(row)
    return fhir.pump_status_observation(row)


@router.get("/Observation/{observation_id}", response_class=FhirResponse)
async def read_observation(
    request: Request, observation_id: str, principal: Reader, repository: Repository
) -> FhirResponse:
    for prefix, kind in (
        (fhir.TEMPERATURE_PREFIX, "temperature"),
        (fhir.PUMP_STATUS_PREFIX, "pump_status"),
    ):
        if observation_id.startswith(prefix):
            message_id = observation_id.removeprefix(prefix)
            if not _is_uuid(message_id):
                break
            row = await repository.observation(principal.care_teams, kind, message_id)
            if row is None or not principal.sees(row["patient_id"]):
                break
            await _audit(
                request,
                principal,
                "fhir.observation.read",
                f"patient:{row['patient_id']}",
                id=observation_id,
            )
            return FhirResponse(_observation({**row, "kind": kind}))
    raise _not_found("observation")


@router.get("/Observation", response_class=FhirResponse)
async def search_observations(
    request: Request,
    principal: Reader,
    repository: Repository,
    patient: str,
    date: Annotated[list[str] | None, Query()] = None,
    code: Annotated[list[str] | None, Query()] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(alias="_offset", ge=0, le=10_000_000)] = 0,
) -> FhirResponse:
    """Readings of one patient in device-time order: body temperatures and pump statuses."""
    patient_id = await _patient_id(repository, principal, patient)
    try:
        window = date_range(date or [])
        kinds = observation_kinds(code or [])
    except SearchError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    rows, total = await repository.observations(
        patient_id,
        temperature=kinds.temperature,
        pump_status=kinds.pump_status,
        since=window.since,
        until=window.until,
        limit=count,
        offset=offset,
    )
    await _audit(
        request,
        principal,
        "fhir.observation.search",
        f"patient:{patient_id}",
        date=date,
        code=code,
        count=len(rows),
    )
    self_url, next_url = _page_links(request, offset, len(rows), total)
    return FhirResponse(
        fhir.searchset(
            [_observation(r) for r in rows],
            self_url=self_url,
            next_url=next_url,
            total=total,
            base_url=base_url(request),
        )
    )


# -- Flag and Communication -------------------------------------------------------------------


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@router.get("/Flag/{flag_id}", response_class=FhirResponse)
async def read_flag(
    request: Request, flag_id: str, principal: Reader, repository: Repository
) -> FhirResponse:
    if not _is_uuid(flag_id):
        raise _not_found("flag")
    episodes = await repository.episodes(principal.care_teams, alert_id=flag_id)
    if (
        not episodes
        or str(episodes[0]["flag_id"]) != str(uuid.UUID(flag_id))
        or not principal.sees(episodes[0]["patient_id"])
    ):
        raise _not_found("flag")
    episode = episodes[0]
    await _audit(
        request,
        principal,
        "fhir.flag.read",
        f"patient:{episode['patient_id']}",
        dedup_key=episode["dedup_key"],
    )
    return FhirResponse(fhir.flag(episode))


@router.get("/Flag", response_class=FhirResponse)
async def search_flags(
    request: Request, principal: Reader, repository: Repository, patient: str
) -> FhirResponse:
    """The patient's alarms, one Flag per alert episode, oldest first."""
    patient_id = await _patient_id(repository, principal, patient)
    flags = [fhir.flag(e) for e in await repository.episodes(principal.care_teams, patient_id)]
    await _audit(request, principal, "fhir.flag.search", f"patient:{patient_id}", count=len(flags))
    return FhirResponse(
        fhir.searchset(
            flags,
            self_url=str(request.url),
            next_url=None,
            total=len(flags),
            base_url=base_url(request),
        )
    )


async def _communications(
    repository: FhirRepository, principal: Caller, patient_id: str
) -> list[dict[str, Any]]:
    episodes = await repository.episodes(principal.care_teams, patient_id)
    pages = await repository.pages(patient_id, [e["dedup_key"] for e in episodes])
    by_key: dict[str, list[dict[str, Any]]] = {}
    for page in pages:
        by_key.setdefault(page["dedup_key"], []).append(page)
    return [
        resource
        for episode in episodes
        for resource in fhir.episode_communications(episode, by_key.get(episode["dedup_key"], []))
    ]


@router.get("/Communication/{communication_id}", response_class=FhirResponse)
async def read_communication(
    request: Request, communication_id: str, principal: Reader, repository: Repository
) -> FhirResponse:
    patient_id: str | None = None
    if communication_id.startswith(fhir.ACK_PREFIX):
        flag_id = communication_id.removeprefix(fhir.ACK_PREFIX)
        if _is_uuid(flag_id):
            episodes = await repository.episodes(principal.care_teams, alert_id=flag_id)
            patient_id = episodes[0]["patient_id"] if episodes else None
    elif _is_uuid(communication_id):
        found = await repository.page_episode(principal.care_teams, communication_id)
        patient_id = found[0] if found else None
    if patient_id is not None and principal.sees(patient_id):
        for resource in await _communications(repository, principal, patient_id):
            if resource["id"] == communication_id:
                await _audit(
                    request,
                    principal,
                    "fhir.communication.read",
                    f"patient:{patient_id}",
                    id=communication_id,
                )
                return FhirResponse(resource)
    raise _not_found("communication")


@router.get("/Communication", response_class=FhirResponse)
async def search_communications(
    request: Request, principal: Reader, repository: Repository, patient: str
) -> FhirResponse:
    """The pages sent about the patient's alarms and their acknowledgements."""
    patient_id = await _patient_id(repository, principal, patient)
    resources = await _communications(repository, principal, patient_id)
    await _audit(
        request,
        principal,
        "fhir.communication.search",
        f"patient:{patient_id}",
        count=len(resources),
    )
    return FhirResponse(
        fhir.searchset(
            resources,
            self_url=str(request.url),
            next_url=None,
            total=len(resources),
            base_url=base_url(request),
        )
    )


# -- the application --------------------------------------------------------------------------

_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    422: "invalid",
    429: "throttled",
}


def create_fhir_app() -> FastAPI:
    """The FHIR application the API mounts at ``/fhir``; errors as OperationOutcome."""
    app = FastAPI(
        title="Vigil FHIR R4 interface",
        version="1",
        description="Readings, devices, alarms and pages of the caller's care teams as FHIR "
        "R4 resources (docs/fhir.md).",
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> FhirResponse:
        return FhirResponse(
            fhir.operation_outcome(
                _ISSUE_CODES.get(error.status_code, "processing"), str(error.detail)
            ),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> FhirResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return FhirResponse(fhir.operation_outcome("invalid", problems), status_code=400)

    @app.exception_handler(asyncpg.exceptions.DataError)
    async def invalid_input(request: Request, error: asyncpg.exceptions.DataError) -> FhirResponse:
        # Input the database cannot represent (a NUL byte) is the caller's error.
        return FhirResponse(fhir.operation_outcome("invalid", "invalid input"), status_code=400)

    app.include_router(router)
    return app
