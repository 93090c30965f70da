"""Patients of the caller's care teams: profile, devices, recent readings, pump and clocks."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from services.api.domain.access import Action, Principal
from services.api.domain.clocks import PumpReport, infusion_clocks
from services.api.domain.course import Basis, course_window
from services.api.entrypoints.http.deps import Clock, Repository, require_patient
from services.api.entrypoints.http.responses import AUTHENTICATED, invalid, not_found

router = APIRouter(prefix="/api/patients", tags=["patients"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require_patient(Action.READ_PATIENT))]


class PageOf(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


class PumpView(BaseModel):
    """The pump's clocks as of its newest status (the pump's own clock, ``latest.device_time``):
    never counted against the server's clock, which the pump's may be ahead of or behind."""

    state: str | None
    bag_empty_at: datetime | None = Field(description="Predicted on the pump's clock.")
    interrupted_minutes: float | None = Field(
        description="Minutes not flowing up to the newest status (device time), not up to now."
    )
    latest: dict[str, Any] | None
    events: list[dict[str, Any]]


class TemperatureHour(BaseModel):
    bucket: datetime = Field(description="Start of the UTC hour (device time).")
    readings: int
    min_c: float
    max_c: float
    mean_c: float


class TemperatureHourly(BaseModel):
    """Hourly temperature over a course window, from the ``temperature_hourly`` aggregate."""

    patient_id: str
    timezone: str = Field(description="The care team's zone, for showing the hours.")
    since: datetime = Field(description="Start of the first hour served (on the hour).")
    until: datetime = Field(description="The server's time when the window was taken.")
    basis: Basis = Field(
        description="Where `since` came from: the `since` asked for, the current cycle's "
        "start, or 28 days back (course_length) when the patient has no cycle recorded."
    )
    capped: bool = Field(
        description="The start lay more than 28 days before the current hour and was moved "
        "up to it."
    )
    hours: list[TemperatureHour] = Field(description="Hours with readings, oldest first.")


async def _audit(
    request: Request, principal: Principal, action: str, subject: str, **details: Any
) -> None:
    await request.app.state.audit.record(principal.user_id, action, subject, details)


async def _patient_or_404(repository: Any, principal: Principal, patient_id: str) -> dict[str, Any]:
    patient = await repository.patient(principal.care_teams, patient_id)
    if patient is None:
        # 404, not 403: a patient of another team is indistinguishable from no patient.
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
    return dict(patient)


@router.get("", response_model=PageOf)
async def list_patients(
    request: Request,
    principal: Reader,
    repository: Repository,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> PageOf:
    items, total = await repository.patients(
        principal.care_teams, limit, offset, monitored_only=principal.covered_teams
    )
    await _audit(request, principal, "patients.list", "patients", count=len(items))
    return PageOf(items=items, total=total, limit=limit, offset=offset)


@router.get("/{patient_id}", responses=not_found("patient"))
async def get_patient(
    request: Request, patient_id: str, principal: Reader, repository: Repository
) -> dict[str, Any]:
    patient = await _patient_or_404(repository, principal, patient_id)
    patient["devices"] = await repository.devices(patient_id)
    await _audit(request, principal, "patient.read", f"patient:{patient_id}")
    return patient


@router.get("/{patient_id}/readings", response_model=PageOf, responses=not_found("patient"))
async def readings(
    request: Request,
    patient_id: str,
    principal: Reader,
    repository: Repository,
    clock: Clock,
    hours: Annotated[float, Query(gt=0, le=24 * 30)] = 24,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 2_000,
) -> PageOf:
    await _patient_or_404(repository, principal, patient_id)
    since = clock() - timedelta(hours=hours)
    items = await repository.temperatures(patient_id, since, limit)
    await _audit(request, principal, "patient.readings", f"patient:{patient_id}", hours=hours)
    return PageOf(items=items, total=len(items), limit=limit, offset=0)


@router.get(
    "/{patient_id}/temperature-hourly",
    response_model=TemperatureHourly,
    responses=not_found("patient"),
)
async def temperature_hourly(
    request: Request,
    patient_id: str,
    principal: Reader,
    repository: Repository,
    clock: Clock,
    since: Annotated[
        datetime | None,
        Query(
            description="With a UTC offset, not after now. Default: the current cycle's "
            "start, or 28 days back without one. Taken to the start of its UTC hour; a start "
            "more than 28 days before the current hour is moved up to it (`capped`)."
        ),
    ] = None,
) -> TemperatureHourly:
    """Hourly min, max and mean of the patient's temperature (°C) over the course: the
    dashboard's whole-course plot. Hours without a reading are absent."""
    if since is not None and since.utcoffset() is None:
        raise invalid("since", "since needs a UTC offset, e.g. Z or +01:00")
    patient = await _patient_or_404(repository, principal, patient_id)
    now = clock()
    cycle_start = None if since else await repository.current_cycle_start(patient_id, now)
    try:
        window = course_window(now, requested=since, cycle_start=cycle_start)
    except ValueError as exc:  # a since after now
        raise invalid("since", str(exc)) from exc
    hours = await repository.temperature_hourly(patient_id, window.since, now)
    await _audit(
        request,
        principal,
        "patient.temperature_hourly",
        f"patient:{patient_id}",
        since=window.since.isoformat(),
        hours=len(hours),
    )
    return TemperatureHourly(
        patient_id=patient_id,
        timezone=patient.get("timezone") or "UTC",
        since=window.since,
        until=window.until,
        basis=window.basis,
        capped=window.capped,
        hours=[TemperatureHour(**h) for h in hours],
    )


@router.get("/{patient_id}/pump", response_model=PumpView, responses=not_found("patient"))
async def pump(
    request: Request, patient_id: str, principal: Reader, repository: Repository, clock: Clock
) -> PumpView:
    await _patient_or_404(repository, principal, patient_id)
    now = clock()
    rows = await repository.pump_reports(patient_id, now - timedelta(hours=24))
    reports = [
        PumpReport(r["device_time"], r["state"], r["rate_ml_h"], r["volume_remaining_ml"])
        for r in rows
    ]
    clocks = infusion_clocks(reports)
    events = await repository.pump_events(patient_id, now - timedelta(hours=24), 50)
    await _audit(request, principal, "patient.pump", f"patient:{patient_id}")
    return PumpView(
        state=clocks.state,
        bag_empty_at=clocks.bag_empty_at,
        interrupted_minutes=(
            clocks.interrupted_for.total_seconds() / 60 if clocks.interrupted_for else None
        ),
        latest=rows[-1] if rows else None,
        events=events,
    )
