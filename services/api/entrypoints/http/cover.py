"""Regional cover: agreements under two sign-offs (one manager of each team) and the caller's
cover now (docs/regional-cover.md)."""

from __future__ import annotations

import uuid
from datetime import date, datetime, time
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from pydantic import BaseModel, Field

from services.api.domain.access import Action, Principal, Role
from services.api.entrypoints.http.deps import Clock, CurrentPrincipal, require
from services.api.entrypoints.http.responses import AUTHENTICATED, Problem, invalid, not_found
from services.api.service_layer.cover import (
    CoverAgreements,
    CoverRefused,
    Manager,
    Version,
    in_force,
    night_to_summarise,
)
from services.notify.public import CoverHours, grants

router = APIRouter(prefix="/api", tags=["regional cover"], responses=AUTHENTICATED)
Reader = Annotated[Principal, Depends(require(Action.READ_PATIENT))]
TeamManager = Annotated[Principal, Depends(require(Action.MANAGE_TEAM))]

_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "Decided already, revoked, or changed meanwhile."}
}
_SIGN_OFF: dict[int | str, dict[str, Any]] = {
    403: {
        "model": Problem,
        "description": "The role may not manage a team, the caller proposed this version, or "
        "the caller is not a manager of the other team.",
    }
}


class CoverTerms(BaseModel):
    covering_team_id: str = Field(max_length=64, description="The team that acts in cover.")
    covered_team_id: str = Field(max_length=64, description="The team whose patients it covers.")
    timezone: str = Field(max_length=64, description="IANA zone of the hours, e.g. Europe/Paris.")
    days: list[Annotated[int, Field(ge=0, le=6)]] = Field(
        min_length=1,
        max_length=7,
        description="The days a window starts on: 0 Monday to 6 Sunday.",
    )
    starts: time = Field(description="Local start, e.g. 20:00.")
    ends: time = Field(
        description="Local end; not after `starts`: the next day (20:00-08:00 runs overnight); "
        "equal to it: 24 hours."
    )
    exceptions: list[date] = Field(
        default_factory=list, max_length=366, description="Local dates no window starts on."
    )
    reason: str | None = Field(default=None, max_length=500)


class Revocation(BaseModel):
    reason: str | None = Field(default=None, max_length=500)


class VersionView(BaseModel):
    agreement_id: uuid.UUID
    version: int
    covering_team_id: str
    covered_team_id: str
    timezone: str
    days: list[int]
    starts: time
    ends: time
    exceptions: list[date]
    revoked: bool
    reason: str | None
    proposed_by: str
    proposed_side: str = Field(description="The proposer's team; the other team signs off.")
    proposed_at: datetime
    status: Literal["pending", "approved", "rejected", "withdrawn"]
    decided_by: str | None
    decided_at: datetime | None


class AgreementView(BaseModel):
    agreement_id: uuid.UUID
    covering_team_id: str
    covered_team_id: str
    in_force: VersionView | None = Field(
        description="The newest approved version (revoked: the agreement has ended)."
    )
    versions: list[VersionView] = Field(description="Every version, oldest first.")


class CoverNow(BaseModel):
    covered_team_id: str
    covered_team_name: str | None
    covered_centre: str | None = Field(description="The covered team's centre (organisation).")
    unit_phone: str | None = Field(description="The covered team's 24-hour number.")
    timezone: str = Field(description="The covered team's zone, for showing `until`.")
    agreement_id: uuid.UUID
    version: int
    until: datetime = Field(description="When this window ends and the patients go back.")


def _view(v: Version) -> VersionView:
    hours = v.hours
    return VersionView(
        agreement_id=v.agreement_id,
        version=v.version,
        covering_team_id=v.covering_team_id,
        covered_team_id=v.covered_team_id,
        timezone=hours.timezone,
        days=sorted(hours.days),
        starts=hours.starts,
        ends=hours.ends,
        exceptions=sorted(hours.exceptions),
        revoked=v.revoked,
        reason=v.reason,
        proposed_by=v.proposed_by,
        proposed_side=v.proposed_side,
        proposed_at=v.proposed_at,
        status=v.status,
        decided_by=v.decided_by,
        decided_at=v.decided_at,
    )


def _agreement(versions: list[Version]) -> AgreementView:
    current = in_force(versions)
    return AgreementView(
        agreement_id=versions[0].agreement_id,
        covering_team_id=versions[0].covering_team_id,
        covered_team_id=versions[0].covered_team_id,
        in_force=_view(current) if current else None,
        versions=[_view(v) for v in versions],
    )


def _manager(principal: Principal) -> Manager:
    return Manager(principal.user_id, principal.username, principal.own_teams)


def _service(request: Request) -> CoverAgreements:
    service: CoverAgreements = request.app.state.cover_agreements
    return service


def _refused(error: CoverRefused) -> HTTPException:
    return HTTPException(error.status, str(error))


def _hours(terms: CoverTerms) -> CoverHours:
    try:
        return CoverHours(
            terms.timezone,
            frozenset(terms.days),
            terms.starts.replace(tzinfo=None),
            terms.ends.replace(tzinfo=None),
            frozenset(terms.exceptions),
        )
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise invalid("timezone", f"not a time zone: {error}", where="body") from None


async def _teams_exist(request: Request, terms: CoverTerms) -> None:
    known = await request.app.state.cover_store.teams(
        [terms.covering_team_id, terms.covered_team_id]
    )
    for field in ("covering_team_id", "covered_team_id"):
        if getattr(terms, field) not in known:
            raise invalid(field, "no such care team", where="body")


@router.get("/cover-agreements", response_model=list[AgreementView])
async def list_agreements(request: Request, principal: Reader) -> list[AgreementView]:
    """Every cover agreement one of the caller's own teams is a side of, with its versions."""
    versions = await request.app.state.cover_store.of_teams(principal.own_teams)
    by_id: dict[uuid.UUID, list[Version]] = {}
    for version in versions:
        by_id.setdefault(version.agreement_id, []).append(version)
    return [_agreement(sorted(vs, key=lambda v: v.version)) for vs in by_id.values()]


@router.get(
    "/cover-agreements/{agreement_id}",
    response_model=AgreementView,
    responses=not_found("cover agreement"),
)
async def get_agreement(
    request: Request, agreement_id: uuid.UUID, principal: Reader
) -> AgreementView:
    try:
        versions = await _service(request).versions_seen_by(_manager(principal), agreement_id)
    except CoverRefused as error:
        raise _refused(error) from None
    return _agreement(versions)


@router.post(
    "/cover-agreements",
    response_model=VersionView,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**not_found("care team"), **_CONFLICT},
)
async def propose_agreement(
    request: Request, terms: CoverTerms, principal: TeamManager
) -> VersionView:
    """Propose a new agreement: pending until a manager of the other team approves it."""
    hours = _hours(terms)
    if not {terms.covering_team_id, terms.covered_team_id} & principal.own_teams:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "neither team is one of the caller's")
    await _teams_exist(request, terms)
    try:
        version = await _service(request).propose(
            _manager(principal),
            terms.covering_team_id,
            terms.covered_team_id,
            hours,
            terms.reason,
        )
    except CoverRefused as error:
        raise _refused(error) from None
    return _view(version)


@router.put(
    "/cover-agreements/{agreement_id}",
    response_model=VersionView,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**not_found("cover agreement"), **_CONFLICT},
)
async def change_agreement(
    request: Request, agreement_id: uuid.UUID, terms: CoverTerms, principal: TeamManager
) -> VersionView:
    """Propose new terms for an agreement (same teams): the next version, pending the other
    team's sign-off; the version in force stays in force until then."""
    hours = _hours(terms)
    try:
        version = await _service(request).propose(
            _manager(principal),
            terms.covering_team_id,
            terms.covered_team_id,
            hours,
            terms.reason,
            agreement_id=agreement_id,
        )
    except CoverRefused as error:
        raise _refused(error) from None
    return _view(version)


@router.post(
    "/cover-agreements/{agreement_id}/versions/{version}/approve",
    response_model=VersionView,
    responses={**not_found("cover agreement"), **_CONFLICT, **_SIGN_OFF},
)
async def approve_version(
    request: Request, agreement_id: uuid.UUID, version: int, principal: TeamManager
) -> VersionView:
    """Sign off a pending version as a manager of the team that did not propose it."""
    try:
        return _view(await _service(request).approve(_manager(principal), agreement_id, version))
    except CoverRefused as error:
        raise _refused(error) from None


@router.post(
    "/cover-agreements/{agreement_id}/versions/{version}/reject",
    response_model=VersionView,
    responses={**not_found("cover agreement"), **_CONFLICT},
)
async def reject_version(
    request: Request, agreement_id: uuid.UUID, version: int, principal: TeamManager
) -> VersionView:
    """Reject a pending version (the proposer's own rejection is a withdrawal)."""
    try:
        return _view(await _service(request).reject(_manager(principal), agreement_id, version))
    except CoverRefused as error:
        raise _refused(error) from None


@router.post(
    "/cover-agreements/{agreement_id}/revoke",
    response_model=VersionView,
    responses={**not_found("cover agreement"), **_CONFLICT},
)
async def revoke_agreement(
    request: Request, agreement_id: uuid.UUID, body: Revocation, principal: TeamManager
) -> VersionView:
    """End the agreement now, by a manager of either team, without a second sign-off: cover
    ends at once and the covered team alone sees and is paged."""
    try:
        return _view(await _service(request).revoke(_manager(principal), agreement_id, body.reason))
    except CoverRefused as error:
        raise _refused(error) from None


@router.get("/cover", response_model=list[CoverNow])
async def cover_now(request: Request, principal: Reader, clock: Clock) -> list[CoverNow]:
    """The teams the caller's teams cover at this moment: whose patients they are (team and
    centre), the covered team's 24-hour number and when the window ends."""
    store = request.app.state.cover_store
    teams = principal.own_teams
    found = grants(teams, await store.in_force_covering(teams), clock())
    known = await store.teams([g.covered_team_id for g in found])
    answer = []
    for grant in found:
        team = known.get(grant.covered_team_id, {})
        answer.append(
            CoverNow(
                covered_team_id=grant.covered_team_id,
                covered_team_name=team.get("name"),
                covered_centre=team.get("centre"),
                unit_phone=team.get("unit_phone"),
                timezone=team.get("timezone") or "UTC",
                agreement_id=uuid.UUID(grant.agreement_id),
                version=grant.version,
                until=grant.ends,
            )
        )
    return answer


class DoneView(BaseModel):
    at: datetime
    kind: str = Field(description="The escalation timeline's entry: paged, acknowledged, ...")


class NightAlertView(BaseModel):
    dedup_key: str
    code: str | None
    title: str | None
    opened_at: datetime
    paged_team_id: str = Field(description="The team whose on-call was paged.")
    acknowledged_by: str | None = Field(description="Who acknowledged before the window ended.")
    acknowledged_at: datetime | None
    resolved_at: datetime | None = Field(description="Resolved before the window ended.")
    open_at_handback: bool = Field(description="Still open when the window ended.")
    done: list[DoneView]


class NightPatientView(BaseModel):
    patient_id: str
    handed_back: int = Field(description="Alerts still open at the end of the window.")
    alerts: list[NightAlertView]


class RevocationView(BaseModel):
    at: datetime = Field(description="When the agreement was revoked: the window's end.")
    by: str | None = Field(description="Who revoked it (the revoked version's decided_by).")
    care_team_id: str | None = Field(description="The team of who revoked it.")
    care_team_name: str | None
    reason: str | None = Field(description="The reason given, if any.")


class NightWindowView(BaseModel):
    agreement_id: uuid.UUID
    version: int
    covering_team_id: str
    covering_team_name: str | None
    covering_centre: str | None
    timezone: str
    starts: datetime
    ends: datetime = Field(description="The window's end, or the revocation that cut it short.")
    revocation: RevocationView | None = Field(
        default=None, description="The revocation that cut the window short; null: none did."
    )


class CoverSummary(BaseModel):
    care_team_id: str
    window: NightWindowView | None = Field(
        description="The latest window of cover that had ended, or that a revocation had cut "
        "short (none: no cover in the last eight days)."
    )
    patients: list[NightPatientView] = Field(description="Patients with an alert in it.")


@router.get(
    "/care-teams/{care_team_id}/cover-summary",
    response_model=CoverSummary,
    responses=not_found("care team"),
)
async def cover_summary(
    request: Request,
    care_team_id: str,
    principal: Reader,
    clock: Clock,
    at: datetime | None = None,
) -> CoverSummary:
    """What happened overnight, for the covered team: the latest window of cover that had ended
    by ``at`` (default now), or that a revocation had cut short by then (up to the revocation,
    which it names), and per patient the alerts opened in it, who was paged, who acknowledged,
    what was done and what was still open when the patients came back."""
    from services.notify.public import summarise

    if care_team_id not in principal.own_teams:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    if at is not None and at.utcoffset() is None:
        raise invalid("at", "at needs a UTC offset, e.g. Z or +01:00")
    moment = at or clock()
    store = request.app.state.cover_store
    latest = night_to_summarise(
        (
            v
            for v in await store.of_teams(frozenset({care_team_id}))
            if v.covered_team_id == care_team_id
        ),
        moment,
    )
    if latest is None:
        summary = CoverSummary(care_team_id=care_team_id, window=None, patients=[])
    else:
        version, window = latest
        revoked = window.revocation
        named = [version.covering_team_id]
        if revoked is not None and revoked.side_team_id:
            named.append(revoked.side_team_id)
        teams = await store.teams(named)
        team = teams.get(version.covering_team_id, {})
        night = summarise(
            window.starts,
            window.ends,
            await store.night_alerts(care_team_id, window.starts, window.ends),
        )
        summary = CoverSummary(
            care_team_id=care_team_id,
            window=NightWindowView(
                agreement_id=version.agreement_id,
                version=version.version,
                covering_team_id=version.covering_team_id,
                covering_team_name=team.get("name"),
                covering_centre=team.get("centre"),
                timezone=version.hours.timezone,
                starts=window.starts,
                ends=window.ends,
                revocation=(
                    None
                    if revoked is None
                    else RevocationView(
                        at=revoked.at,
                        by=revoked.by,
                        care_team_id=revoked.side_team_id,
                        care_team_name=teams.get(revoked.side_team_id or "", {}).get("name"),
                        reason=revoked.reason,
                    )
                ),
            ),
            patients=[
                NightPatientView(
                    patient_id=p.patient_id,
                    handed_back=p.handed_back,
                    alerts=[
                        NightAlertView(
                            dedup_key=a.dedup_key,
                            code=a.code,
                            title=a.title,
                            opened_at=a.opened_at,
                            paged_team_id=a.paged_team_id,
                            acknowledged_by=a.acknowledged_by,
                            acknowledged_at=a.acknowledged_at,
                            resolved_at=a.resolved_at,
                            open_at_handback=a.open_at_handback,
                            done=[DoneView(at=t, kind=k) for t, k in a.done],
                        )
                        for a in p.alerts
                    ],
                )
                for p in night
            ],
        )
    await request.app.state.audit.record(
        principal.user_id,
        "cover.summary_read",
        f"care_team:{care_team_id}",
        {"patients": len(summary.patients)},
    )
    return summary


def _admin(principal: CurrentPrincipal) -> Principal:
    # Centres span teams: setting them up is the administrator's, not a team's manager's.
    if principal.role is not Role.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only an admin sets up centres")
    return principal


Admin = Annotated[Principal, Depends(_admin)]


class OrganisationIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="The centre's name.")


class OrganisationView(BaseModel):
    organisation_id: str
    name: str


class TeamCentre(BaseModel):
    organisation_id: str | None = Field(
        max_length=64, description="The centre the team belongs to; null: none."
    )


@router.get("/organisations", response_model=list[OrganisationView])
async def list_organisations(
    request: Request, principal: Reader, clock: Clock
) -> list[OrganisationView]:
    """The centres (organisations) the caller may see, by name: every one for the admin role;
    for any other, the centres of the caller's own care teams and of the teams they cover at
    this moment (regional cover's windows at the API's clock)."""
    store = request.app.state.cover_store
    teams: frozenset[str] | None = None
    if principal.role is not Role.ADMIN:
        own = principal.own_teams
        covered = grants(own, await store.in_force_covering(own), clock())
        teams = own | {g.covered_team_id for g in covered}
    return [OrganisationView(**row) for row in await store.organisations(teams)]


@router.put("/organisations/{organisation_id}", response_model=OrganisationView)
async def put_organisation(
    request: Request,
    organisation_id: Annotated[str, Path(min_length=1, max_length=64)],
    body: OrganisationIn,
    principal: Admin,
) -> OrganisationView:
    """Create or rename a centre (organisation); the admin role's only. Audited
    ``organisation.saved``."""
    await request.app.state.cover_store.put_organisation(organisation_id, body.name)
    await request.app.state.audit.record(
        principal.user_id,
        "organisation.saved",
        f"organisation:{organisation_id}",
        {"name": body.name},
    )
    return OrganisationView(organisation_id=organisation_id, name=body.name)


@router.put(
    "/care-teams/{care_team_id}/organisation",
    response_model=TeamCentre,
    responses={**not_found("care team")},
)
async def put_team_centre(
    request: Request, care_team_id: str, body: TeamCentre, principal: Admin
) -> TeamCentre:
    """Put one of the caller's care teams in a centre (or in none); the admin role's only. 422
    for an unknown centre. Audited ``care_team.organisation_changed``."""
    if care_team_id not in principal.own_teams:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such care team")
    if not await request.app.state.cover_store.set_organisation(care_team_id, body.organisation_id):
        raise invalid("organisation_id", "no such organisation", where="body")
    await request.app.state.audit.record(
        principal.user_id,
        "care_team.organisation_changed",
        f"care_team:{care_team_id}",
        {"organisation_id": body.organisation_id},
    )
    return body
