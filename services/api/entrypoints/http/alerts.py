"""Alerts of the caller's care teams: list, timeline, acknowledge, snooze, resolve, and a live
stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from services.api.domain.access import Action, Principal
from services.api.domain.timeline import timeline
from services.api.entrypoints.http.deps import Clock, Repository, require_patient
from services.api.entrypoints.http.responses import AUTHENTICATED, not_found

router = APIRouter(prefix="/api/alerts", tags=["alerts"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require_patient(Action.READ_PATIENT))]
Acknowledger = Annotated[Principal, Depends(require_patient(Action.ACKNOWLEDGE))]
Resolver = Annotated[Principal, Depends(require_patient(Action.RESOLVE))]


class AlertPage(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


class ActionResult(BaseModel):
    dedup_key: str
    status: str
    changed: bool


async def _episode_or_404(repository: Any, principal: Principal, dedup_key: str) -> dict[str, Any]:
    episode = await repository.alert_episode(principal.care_teams, dedup_key)
    if episode is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such alert")
    return dict(episode)


@router.get("", response_model=AlertPage)
async def list_alerts(
    request: Request,
    principal: Reader,
    repository: Repository,
    state: Literal["open", "acknowledged", "resolved"] | None = None,
    priority: Literal["high", "medium", "low", "info"] | None = None,
    patient_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> AlertPage:
    items, total = await repository.alert_episodes(
        principal.care_teams,
        state=state,
        priority=priority,
        patient_id=patient_id,
        limit=limit,
        offset=offset,
        monitored_only=principal.covered_teams,
    )
    await request.app.state.audit.record(
        principal.user_id,
        "alerts.list",
        "alerts",
        {"state": state, "priority": priority, "patient_id": patient_id, "count": len(items)},
    )
    return AlertPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/stream")
async def stream(request: Request, principal: Reader, repository: Repository) -> StreamingResponse:
    """Server-sent events: one ``alerts`` event whenever an alert of the caller's teams changes."""
    poll_s: float = request.app.state.settings.stream_poll_s

    async def events() -> AsyncIterator[bytes]:
        first = True
        last: datetime | None = None
        yield b"retry: 2000\n\n"
        while not await request.is_disconnected():
            latest = await repository.latest_alert_received_at(principal.care_teams)
            # The first event tells a new subscriber it is live, even with no alerts yet.
            if first or latest != last:
                first = False
                last = latest
                payload = json.dumps({"updated_at": latest.isoformat() if latest else None})
                yield f"event: alerts\ndata: {payload}\n\n".encode()
            else:
                yield b": keep-alive\n\n"
            await asyncio.sleep(poll_s)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@router.get("/{dedup_key}", responses=not_found("alert"))
async def get_alert(
    request: Request, dedup_key: str, principal: Reader, repository: Repository
) -> dict[str, Any]:
    episode = await _episode_or_404(repository, principal, dedup_key)
    episode["phases"] = await repository.alert_phases(dedup_key)
    episode["pages"] = await repository.pages_for(dedup_key)
    for page in episode["pages"]:
        if isinstance(page.get("attempts"), str):
            page["attempts"] = json.loads(page["attempts"])
    for phase in episode["phases"]:
        if isinstance(phase.get("evidence"), str):
            phase["evidence"] = json.loads(phase["evidence"])
    await request.app.state.audit.record(
        principal.user_id,
        "alert.read",
        f"patient:{episode['patient_id']}",
        {"dedup_key": dedup_key},
    )
    return episode


class TimelineEntry(BaseModel):
    at: datetime
    kind: str = Field(
        description="alert_start/alert_update/alert_end, delivery, or notify's event kind."
    )
    text: str = Field(
        description="What happened, worded from the record; times in the team's zone."
    )


class AlertTimeline(BaseModel):
    dedup_key: str
    patient_id: str
    timezone: str
    status: str = Field(description="open, acknowledged or resolved (as in the alert list).")
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    entries: list[TimelineEntry]


async def alert_timeline(
    request: Request, principal: Principal, repository: Any, dedup_key: str
) -> AlertTimeline:
    """The episode's timeline: the rules' phases, notify's escalation events and every
    delivery attempt, in time order. Audited as a read of the patient's alert."""
    episode = await _episode_or_404(repository, principal, dedup_key)
    zone = episode.get("timezone") or "UTC"
    phases = await repository.alert_phases(dedup_key)
    notify = await request.app.state.alert_timelines.timeline(dedup_key)
    teams = await _cover_team_names(request, notify)
    await request.app.state.audit.record(
        principal.user_id,
        "alert.timeline",
        f"patient:{episode['patient_id']}",
        {"dedup_key": dedup_key},
    )
    return AlertTimeline(
        dedup_key=dedup_key,
        patient_id=episode["patient_id"],
        timezone=zone,
        status=episode["status"],
        acknowledged_by=episode.get("acknowledged_by"),
        acknowledged_at=episode.get("acknowledged_at"),
        entries=[
            TimelineEntry(at=e.at, kind=e.kind, text=e.text)
            for e in timeline(phases, notify, zone, teams)
        ],
    )


_COVER_TEAM_KEYS = {
    "paged_under_cover": ("care_team_id", "covered_team_id"),
    "handed_back": ("from_team", "to_team"),
}


async def _cover_team_names(request: Request, notify: Any) -> dict[str, str]:
    """The names of the care teams the timeline's regional cover entries name (none: no
    look-up)."""
    wanted = sorted(
        {
            str((event.get("detail") or {}).get(key))
            for event in (notify or {}).get("events") or ()
            for key in _COVER_TEAM_KEYS.get(str(event.get("kind")), ())
            if (event.get("detail") or {}).get(key)
        }
    )
    if not wanted:
        return {}
    store = getattr(request.app.state, "cover_store", None)
    if store is None:
        return {}
    known = await store.teams(wanted)
    return {team: str(row["name"]) for team, row in known.items() if row.get("name")}


@router.get("/{dedup_key}/timeline", response_model=AlertTimeline, responses=not_found("alert"))
async def get_alert_timeline(
    request: Request, dedup_key: str, principal: Reader, repository: Repository
) -> AlertTimeline:
    """Who was paged when, by which channel, what each provider answered, who acknowledged."""
    return await alert_timeline(request, principal, repository, dedup_key)


@router.post("/{dedup_key}/ack", response_model=ActionResult, responses=not_found("alert"))
async def acknowledge(
    request: Request,
    dedup_key: str,
    principal: Acknowledger,
    repository: Repository,
    clock: Clock,
) -> ActionResult:
    episode = await _episode_or_404(repository, principal, dedup_key)
    changed = await request.app.state.alert_actions.acknowledge(
        dedup_key, principal.username, clock()
    )
    await request.app.state.audit.record(
        principal.user_id,
        "alert.acknowledge",
        f"patient:{episode['patient_id']}",
        {"dedup_key": dedup_key, "changed": changed},
    )
    after = await _episode_or_404(repository, principal, dedup_key)
    return ActionResult(dedup_key=dedup_key, status=after["status"], changed=changed)


class SnoozeRequest(BaseModel):
    minutes: float = Field(gt=0, le=24 * 60, description="How long the chain pauses.")


class SnoozeResult(BaseModel):
    dedup_key: str
    snoozed_until: datetime = Field(description="When the chain goes on paging if nobody acts.")


@router.post(
    "/{dedup_key}/snooze",
    response_model=SnoozeResult,
    responses=not_found("alert, or no escalation for it"),
)
async def snooze(
    request: Request,
    dedup_key: str,
    body: SnoozeRequest,
    principal: Acknowledger,
    repository: Repository,
) -> SnoozeResult:
    """Pause the alert's escalation for ``minutes``: no further step is paged until then, and
    the timeline records who snoozed it. Needs ``acknowledge``; audited."""
    episode = await _episode_or_404(repository, principal, dedup_key)
    until = await request.app.state.alert_actions.snooze(
        dedup_key, principal.username, body.minutes
    )
    if until is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no escalation for this alert")
    await request.app.state.audit.record(
        principal.user_id,
        "alert.snooze",
        f"patient:{episode['patient_id']}",
        {"dedup_key": dedup_key, "minutes": body.minutes, "until": until.isoformat()},
    )
    return SnoozeResult(dedup_key=dedup_key, snoozed_until=until)


@router.post("/{dedup_key}/resolve", response_model=ActionResult, responses=not_found("alert"))
async def resolve(
    request: Request, dedup_key: str, principal: Resolver, repository: Repository, clock: Clock
) -> ActionResult:
    episode = await _episode_or_404(repository, principal, dedup_key)
    changed = await request.app.state.alert_actions.resolve(dedup_key, principal.username, clock())
    await request.app.state.audit.record(
        principal.user_id,
        "alert.resolve",
        f"patient:{episode['patient_id']}",
        {"dedup_key": dedup_key, "changed": changed},
    )
    after = await _episode_or_404(repository, principal, dedup_key)
    return ActionResult(dedup_key=dedup_key, status=after["status"], changed=changed)
