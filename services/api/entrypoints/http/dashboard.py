"""The dashboard: server-rendered pages with a little JavaScript, authenticated by cookie.

Every time is shown in the care team's zone with the zone named, inside a ``<time>`` element
whose ``datetime`` is the instant in ISO 8601 (``team_time``). The forms (enrol a patient,
register and bind a device, swap a device) post JSON to the API's own routes with ``fetch``:
the session cookie and the ``X-Requested-By`` header, as the acknowledge button does, so the
same use cases, checks, audit entries and CSRF defence apply as for any other caller.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from services.api.domain.access import Action, Principal
from services.api.domain.clocks import PumpReport, infusion_clocks, local_time, team_zone
from services.api.domain.course import CourseWindow, course_window, reading_text
from services.api.entrypoints.http.alerts import alert_timeline
from services.api.entrypoints.http.deps import SESSION_COOKIE, cover_scope, get_principal

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).resolve().parents[2] / "templates"))


def team_time(at: datetime, zone: str, *, seconds: bool = False) -> Markup:
    """``<time datetime="2026-12-07T02:12:00+00:00">07 Dec 03:12 (Europe/Oslo)</time>``: the
    time as ``local_time`` words it, the instant kept in the element's ``datetime``."""
    local = at.astimezone(team_zone(zone)).isoformat(timespec="seconds")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        escape(at.isoformat()), escape(local), local_time(at, zone, seconds=seconds)
    )


templates.env.globals["team_time"] = team_time
templates.env.globals["local_time"] = local_time
templates.env.globals["Action"] = Action

PLOT_W, PLOT_H, PAD = 760, 240, 36


async def _principal_or_none(request: Request) -> Principal | None:
    if SESSION_COOKIE not in request.cookies:
        return None
    try:
        return await get_principal(
            request, request.app.state.settings, request.app.state.repository, None
        )
    except HTTPException:
        return None


def temperature_plot(
    readings: list[dict[str, Any]], start: datetime, end: datetime, thresholds: dict[str, float]
) -> dict[str, Any]:
    """SVG coordinates for a temperature line over [start, end] with threshold lines."""
    low, high = 35.0, 41.0
    span = (end - start).total_seconds() or 1.0

    def x(at: datetime) -> float:
        return PAD + (PLOT_W - 2 * PAD) * (at - start).total_seconds() / span

    def y(celsius: float) -> float:
        clamped = min(max(celsius, low), high)
        return PLOT_H - PAD - (PLOT_H - 2 * PAD) * (clamped - low) / (high - low)

    points = " ".join(f"{x(r['device_time']):.1f},{y(r['value_c']):.1f}" for r in readings)
    dots = [
        {
            "x": x(r["device_time"]),
            "y": y(r["value_c"]),
            "value": r["value_c"],
            "text": reading_text(r),
            "at": r["device_time"],
        }
        for r in readings
    ]
    lines = [{"name": name, "value": value, "y": y(value)} for name, value in thresholds.items()]
    ticks = [{"y": y(t), "label": f"{t:.0f}"} for t in range(36, 42)]
    hours = [{"x": x(start + timedelta(hours=h)), "label": f"-{24 - h}h"} for h in range(0, 25, 6)]
    return {
        "width": PLOT_W,
        "height": PLOT_H,
        "pad": PAD,
        "points": points,
        "dots": dots,
        "lines": lines,
        "ticks": ticks,
        "hours": hours,
    }


def course_plot(
    hours: list[dict[str, Any]], window: CourseWindow, thresholds: dict[str, float]
) -> dict[str, Any]:
    """SVG coordinates for the whole-course plot over the window: for each hour with readings a
    min-max bar one hour wide, the hourly means joined while the hours are consecutive (a gap in
    the readings stays a gap), threshold lines, and day ticks (course days from the cycle start
    when the window starts there, else days back from now)."""
    low, high = 35.0, 41.0
    start, end = window.since, window.until
    span = (end - start).total_seconds() or 1.0
    hour = timedelta(hours=1)

    def x(at: datetime) -> float:
        at = min(max(at, start), end)
        return PAD + (PLOT_W - 2 * PAD) * (at - start).total_seconds() / span

    def y(celsius: float) -> float:
        clamped = min(max(celsius, low), high)
        return PLOT_H - PAD - (PLOT_H - 2 * PAD) * (clamped - low) / (high - low)

    bars = []
    runs: list[list[str]] = []
    previous: datetime | None = None
    for h in hours:
        bucket: datetime = h["bucket"]
        x0, x1 = x(bucket), x(bucket + hour)
        top, bottom = y(h["max_c"]), y(h["min_c"])
        bars.append(
            {
                "x": x0,
                "width": max(x1 - x0, 1.0),
                "y": top,
                "height": max(bottom - top, 1.0),
                "at": bucket,
                "readings": h["readings"],
                "min_c": h["min_c"],
                "max_c": h["max_c"],
                "mean_c": h["mean_c"],
            }
        )
        point = f"{(x0 + x1) / 2:.1f},{y(h['mean_c']):.1f}"
        if previous is not None and bucket - previous == hour:
            runs[-1].append(point)
        else:
            runs.append([point])
        previous = bucket
    lines = [{"name": name, "value": value, "y": y(value)} for name, value in thresholds.items()]
    ticks = [{"y": y(t), "label": f"{t:.0f}"} for t in range(36, 42)]
    days = []
    for n in range(0, 29, 7):
        if window.basis == "cycle_start" and not window.capped:
            at, label = start + timedelta(days=n), f"day {n + 1}"
        else:
            at, label = end - timedelta(days=n), f"-{n}d" if n else "now"
        if start <= at <= end:
            days.append({"x": x(at), "label": label})
    return {
        "width": PLOT_W,
        "height": PLOT_H,
        "pad": PAD,
        "bars": bars,
        "means": [" ".join(run) for run in runs],
        "lines": lines,
        "ticks": ticks,
        "days": days,
    }


async def _fever_lines(repository: Any, patient: dict[str, Any]) -> dict[str, float]:
    """The fever thresholds this patient is judged by: defaults, then the care team's newest
    protocol version, then the patient's newest override (the order the rules service uses)."""
    import json

    from services.rules.public import Thresholds, layered_thresholds

    layers: list[dict[str, Any]] = []
    for rows in (
        await repository.protocol_versions(patient["care_team_id"]),
        await repository.override_versions(patient["patient_id"]),
    ):
        if rows:
            latest = rows[-1]["overrides"]
            layers.append(json.loads(latest) if isinstance(latest, str) else dict(latest))
    merged = layered_thresholds(Thresholds(), *layers)
    return {"single": merged.fever_single_c, "sustained": merged.fever_sustained_c}


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {})


@router.get("/", response_class=HTMLResponse)
async def dashboard(request: Request) -> Response:
    principal = await _principal_or_none(request)
    if principal is None:
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    return templates.TemplateResponse(
        request,
        "dashboard.html",
        {"principal": principal, "can_ack": principal.may(Action.ACKNOWLEDGE)},
    )


@router.get("/roster", response_class=HTMLResponse)
async def roster_page(request: Request) -> Response:
    """The roster; its rows come from ``GET /api/roster``, redrawn on every alert and every 30 s."""
    principal = await _principal_or_none(request)
    if principal is None:
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    return templates.TemplateResponse(request, "roster.html", {"principal": principal})


@router.get("/alerts/{dedup_key}", response_class=HTMLResponse)
async def alert_page(request: Request, dedup_key: str) -> Response:
    """One alert: its timeline (raised, paged whom by which channel and what the provider said,
    acknowledged by whom, ended), from ``GET /api/alerts/{dedup_key}/timeline``'s use case."""
    principal = await _principal_or_none(request)
    if principal is None:
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    if not principal.may(Action.READ_PATIENT):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "role may not read patients")
    principal = await cover_scope(request, principal, Action.READ_PATIENT, request.app.state.clock)
    found = await alert_timeline(request, principal, request.app.state.repository, dedup_key)
    return templates.TemplateResponse(
        request,
        "alert.html",
        {
            "principal": principal,
            "t": found,
            "now": request.app.state.clock(),
            "local_time": local_time,
            "can_ack": principal.may(Action.ACKNOWLEDGE),
        },
    )


async def _manager_page(request: Request, template: str, **context: Any) -> Response:
    """A page of forms for those who may enrol patients and onboard devices; the care teams
    (id, name, zone) are what the forms offer and the zone their times are entered in."""
    principal = await _principal_or_none(request)
    if principal is None:
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    if not principal.may(Action.MANAGE_PATIENTS):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "role may not manage patients")
    teams = [
        {"care_team_id": t["care_team_id"], "name": t["name"], "timezone": t["timezone"]}
        for t in await request.app.state.repository.care_teams(principal.care_teams)
    ]
    return templates.TemplateResponse(
        request, template, {"principal": principal, "teams": teams, **context}
    )


@router.get("/enrol", response_class=HTMLResponse)
async def enrol_page(request: Request) -> Response:
    """Enrol a child: the form posts to ``POST /api/patients``."""
    return await _manager_page(request, "enrol.html")


@router.get("/devices", response_class=HTMLResponse)
async def device_page(request: Request, patient: str | None = None) -> Response:
    """Register a device (``POST /api/devices``, its one-time configuration shown) or bind a
    registered one to a patient (``POST /api/devices/{id}/bindings``)."""
    return await _manager_page(request, "device.html", patient_id=patient or "")


@router.get("/patients/{patient_id}", response_class=HTMLResponse)
async def patient_page(request: Request, patient_id: str) -> Response:
    principal = await _principal_or_none(request)
    if principal is None:
        return RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    repository = request.app.state.repository
    if principal.may(Action.READ_PATIENT):
        principal = await cover_scope(
            request, principal, Action.READ_PATIENT, request.app.state.clock
        )
    patient = await repository.patient(principal.care_teams, patient_id)
    if patient is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such patient")
    now: datetime = request.app.state.clock()
    start = now - timedelta(hours=24)
    readings = await repository.temperatures(patient_id, start, 5_000)
    reports = await repository.pump_reports(patient_id, start)
    clocks = infusion_clocks(
        [
            PumpReport(r["device_time"], r["state"], r["rate_ml_h"], r["volume_remaining_ml"])
            for r in reports
        ]
    )
    thresholds = await _fever_lines(repository, patient)
    window = course_window(
        now, requested=None, cycle_start=await repository.current_cycle_start(patient_id, now)
    )
    hourly = await repository.temperature_hourly(patient_id, window.since, now)
    await request.app.state.audit.record(
        principal.user_id, "patient.dashboard", f"patient:{patient_id}", {}
    )
    return templates.TemplateResponse(
        request,
        "patient.html",
        {
            "principal": principal,
            "patient": patient,
            "devices": await repository.devices(patient_id),
            "plot": temperature_plot(readings, start, now, thresholds),
            "course": course_plot(hourly, window, thresholds),
            "window": window,
            "reading_text": reading_text,
            "latest": readings[-1] if readings else None,
            "pump": reports[-1] if reports else None,
            "clocks": clocks,
            "events": await repository.pump_events(patient_id, start, 20),
            "discharge": await repository.discharge_of(patient_id),
            "now": now,
            "zone": patient.get("timezone") or "UTC",
            "local_time": local_time,
        },
    )
