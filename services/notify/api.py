"""The notify HTTP API: who to page, acknowledgements, snoozes, delivery receipts, the audit trail.

Owns the HTTP surface only: request validation (``schemas.notify``), authentication of the
management endpoints (bearer token), the signed acknowledgement links, Twilio's webhooks (SMS
replies and status callbacks, checked against ``X-Twilio-Signature`` when an auth token is set)
and the SQL of the registry tables it manages. Escalation decisions are made by the
``EscalationService`` it is given. ``create_app(settings)`` builds it; ``main`` serves it alone
(``vigil notify-api``); notify serves it in-process when ``VIGIL_NOTIFY_API_ENABLED`` is set.
"""

import argparse
import hmac
import html
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.events import AlertPriority
from schemas.notify import (
    AcknowledgeIn,
    AckOut,
    CareTeamIn,
    EarlyCycleEscalationIn,
    EarlyCycleEscalationOut,
    EscalationPolicyIn,
    OnCallOut,
    OverrideIn,
    PersonIn,
    ScheduleIn,
    SnoozeIn,
    TargetIn,
)
from services.notify.adapters.escalation_store import PostgresEscalationStore
from services.notify.adapters.twilio import twilio_signature
from services.notify.domain.ack_token import InvalidAckToken
from services.notify.domain.quiet_hours import QuietHours, held_until
from services.notify.domain.schedule import on_call_at
from services.notify.service_layer.escalation import AckOutcome, AckResult, EscalationService
from services.notify.settings import NotifySettings
from vigil.audit.actions import AuditAction
from vigil.runtime import utcnow


def create_app(
    settings: NotifySettings,
    *,
    service: EscalationService | None = None,
    pool: Any = None,
) -> FastAPI:
    """The API over ``pool`` and ``service``; both are built at start-up when not given."""
    state: dict[str, Any] = {"service": service, "pool": pool}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned: list[Any] = []
        if state["pool"] is None or state["service"] is None:
            # Imported here: app imports this module to serve the API in-process.
            from services.notify.app import build_escalation, open_pool

            if state["pool"] is None:
                state["pool"] = await open_pool(settings)
                owned.append(state["pool"])
            if state["service"] is None:
                state["service"], closers = build_escalation(settings, state["pool"])
                owned.extend(closers)
        try:
            yield
        finally:
            for resource in reversed(owned):
                closer = getattr(resource, "aclose", None) or resource.close
                await closer()

    app = FastAPI(title="Vigil notify", version="1", lifespan=lifespan)

    def get_service() -> EscalationService:
        value: EscalationService = state["service"]
        return value

    def get_pool() -> Any:
        return state["pool"]

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if settings.api_token is None:
            return
        expected = f"Bearer {settings.api_token.get_secret_value()}"
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise HTTPException(status_code=401, detail="bearer token required")

    Service = Annotated[EscalationService, Depends(get_service)]
    Pool = Annotated[Any, Depends(get_pool)]
    managed = [Depends(require_token)]

    # -- registry -----------------------------------------------------------------------------

    @app.put("/care-teams/{care_team_id}", dependencies=managed, status_code=204)
    async def put_care_team(care_team_id: str, body: CareTeamIn, pool: Pool) -> None:
        _same(care_team_id, body.care_team_id)
        await pool.execute(
            """
            INSERT INTO care_teams (care_team_id, name, oncall_email, timezone)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (care_team_id) DO UPDATE
                SET name = EXCLUDED.name, oncall_email = EXCLUDED.oncall_email,
                    timezone = EXCLUDED.timezone
            """,
            body.care_team_id,
            body.name,
            body.oncall_email,
            body.timezone,
        )

    @app.put("/people/{person_id}", dependencies=managed, status_code=204)
    async def put_person(person_id: str, body: PersonIn, pool: Pool) -> None:
        _same(person_id, body.person_id)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO people (person_id, name, care_team_id) VALUES ($1, $2, $3)
                ON CONFLICT (person_id) DO UPDATE
                    SET name = EXCLUDED.name, care_team_id = EXCLUDED.care_team_id
                """,
                body.person_id,
                body.name,
                body.care_team_id,
            )
            await conn.execute("DELETE FROM contact_methods WHERE person_id = $1", person_id)
            await conn.executemany(
                "INSERT INTO contact_methods (person_id, rank, channel, address) "
                "VALUES ($1, $2, $3, $4)",
                [
                    (person_id, rank, method.channel, method.address)
                    for rank, method in enumerate(body.contact_methods)
                ],
            )

    @app.get("/people/{person_id}", dependencies=managed)
    async def get_person(person_id: str, pool: Pool) -> dict[str, Any]:
        row = await pool.fetchrow("SELECT * FROM people WHERE person_id = $1", person_id)
        if row is None:
            raise HTTPException(status_code=404, detail="no such person")
        methods = await pool.fetch(
            "SELECT channel, address FROM contact_methods WHERE person_id = $1 ORDER BY rank",
            person_id,
        )
        return {
            "person_id": row["person_id"],
            "name": row["name"],
            "care_team_id": row["care_team_id"],
            "contact_methods": [dict(m) for m in methods],
        }

    @app.put("/schedules/{schedule_id}", dependencies=managed, status_code=204)
    async def put_schedule(schedule_id: str, body: ScheduleIn, pool: Pool) -> None:
        _same(schedule_id, body.schedule_id)
        await pool.execute(
            """
            INSERT INTO oncall_schedules (schedule_id, care_team_id, name, timezone, start_date,
                                          handoff_time, shift_days, participants)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (schedule_id) DO UPDATE
                SET care_team_id = EXCLUDED.care_team_id, name = EXCLUDED.name,
                    timezone = EXCLUDED.timezone, start_date = EXCLUDED.start_date,
                    handoff_time = EXCLUDED.handoff_time, shift_days = EXCLUDED.shift_days,
                    participants = EXCLUDED.participants
            """,
            body.schedule_id,
            body.care_team_id,
            body.name,
            body.timezone,
            body.start_date,
            body.handoff_time,
            body.shift_days,
            list(body.participants),
        )

    @app.post("/schedules/{schedule_id}/overrides", dependencies=managed, status_code=201)
    async def post_override(schedule_id: str, body: OverrideIn, pool: Pool) -> dict[str, str]:
        override_id = uuid.uuid4()
        await pool.execute(
            "INSERT INTO oncall_overrides (override_id, schedule_id, person_id, starts_at, "
            "ends_at) VALUES ($1, $2, $3, $4, $5)",
            override_id,
            schedule_id,
            body.person_id,
            body.starts_at,
            body.ends_at,
        )
        return {"override_id": str(override_id)}

    @app.get("/schedules/{schedule_id}/oncall", dependencies=managed)
    async def get_oncall(schedule_id: str, pool: Pool, at: datetime | None = None) -> OnCallOut:
        when = at or utcnow()
        if when.tzinfo is None:
            raise HTTPException(status_code=422, detail="at must carry a UTC offset")
        rotation = await PostgresEscalationStore(pool).rotation(schedule_id)
        if rotation is None:
            raise HTTPException(status_code=404, detail="no such schedule")
        return OnCallOut(schedule_id=schedule_id, at=when, person_id=on_call_at(rotation, when))

    @app.put("/care-teams/{care_team_id}/escalation-policy", dependencies=managed, status_code=204)
    async def put_policy(care_team_id: str, body: EscalationPolicyIn, pool: Pool) -> None:
        steps = [
            {
                "wait_s": round(step.wait_minutes * 60),
                "targets": [{"kind": t.kind, "ref": t.ref} for t in step.targets],
            }
            for step in body.steps
        ]
        await pool.execute(
            """
            INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, repeat_count,
                                             updated_at)
            VALUES ($1, $2, $3, $4::jsonb, $5, now())
            ON CONFLICT (care_team_id) DO UPDATE
                SET policy_id = EXCLUDED.policy_id, name = EXCLUDED.name, steps = EXCLUDED.steps,
                    repeat_count = EXCLUDED.repeat_count, updated_at = now()
            """,
            body.policy_id,
            care_team_id,
            body.name,
            json.dumps(steps),
            body.repeat_count,
        )

    # -- quiet hours --------------------------------------------------------------------------

    @app.put("/care-teams/{care_team_id}/quiet-hours", dependencies=managed, status_code=204)
    async def put_quiet_hours(
        care_team_id: str, body: QuietHoursIn, service: Service, pool: Pool
    ) -> None:
        async with pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT 1 FROM care_teams WHERE care_team_id = $1", care_team_id
            ):
                raise HTTPException(status_code=404, detail="no such care team")
            before = await _quiet_hours_row(conn, care_team_id)
            # The service's clock, so the change is measured on the same clock as the digests.
            now = service.now()
            quiet = QuietHours(timezone=body.timezone, start=body.start, end=body.end)
            await _bring_digests_forward(
                conn, care_team_id, held_until(AlertPriority.LOW, quiet, now) or now
            )
            await conn.execute(
                """
                INSERT INTO notify_quiet_hours (care_team_id, timezone, starts_local,
                                                ends_local, updated_at, updated_by)
                VALUES ($1, $2, $3, $4, $5, $6)
                ON CONFLICT (care_team_id) DO UPDATE
                    SET timezone = EXCLUDED.timezone, starts_local = EXCLUDED.starts_local,
                        ends_local = EXCLUDED.ends_local, updated_at = EXCLUDED.updated_at,
                        updated_by = EXCLUDED.updated_by
                """,
                care_team_id,
                body.timezone,
                body.start,
                body.end,
                now,
                body.changed_by,
            )
            # Quiet hours decide whether a low-priority alarm pages someone at night: who
            # changed them, and from what, is kept in the tamper-evident audit log.
            await _audit_quiet_hours(
                conn, body.changed_by, care_team_id, before, _quiet_json(body), now
            )

    @app.get("/care-teams/{care_team_id}/quiet-hours", dependencies=managed)
    async def get_quiet_hours(care_team_id: str, pool: Pool) -> QuietHoursOut:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM notify_quiet_hours WHERE care_team_id = $1", care_team_id
            )
        if row is None:
            raise HTTPException(status_code=404, detail="no quiet hours: every alert pages now")
        return QuietHoursOut(
            care_team_id=care_team_id,
            timezone=row["timezone"],
            start=row["starts_local"],
            end=row["ends_local"],
            updated_at=row["updated_at"],
            updated_by=row["updated_by"],
        )

    @app.delete("/care-teams/{care_team_id}/quiet-hours", dependencies=managed, status_code=204)
    async def delete_quiet_hours(care_team_id: str, by: str, service: Service, pool: Pool) -> None:
        if not by.strip():
            raise HTTPException(status_code=422, detail="by names who removes them")
        async with pool.acquire() as conn, conn.transaction():
            before = await _quiet_hours_row(conn, care_team_id)
            if before is None:
                raise HTTPException(status_code=404, detail="no quiet hours")
            now = service.now()
            await conn.execute(
                "DELETE FROM notify_quiet_hours WHERE care_team_id = $1", care_team_id
            )
            await _bring_digests_forward(conn, care_team_id, now)
            await _audit_quiet_hours(conn, by, care_team_id, before, None, now)

    # -- early-cycle escalation ---------------------------------------------------------------

    @app.put(
        "/care-teams/{care_team_id}/early-cycle-escalation", dependencies=managed, status_code=204
    )
    async def put_early_cycle(
        care_team_id: str, body: EarlyCycleEscalationIn, service: Service, pool: Pool
    ) -> None:
        after = _early_cycle_json(body)
        async with pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT 1 FROM care_teams WHERE care_team_id = $1", care_team_id
            ):
                raise HTTPException(status_code=404, detail="no such care team")
            before = await _early_cycle_row(conn, care_team_id)
            now = service.now()
            await conn.execute(
                """
                INSERT INTO escalation_early_cycle (care_team_id, ack_wait_s, extra_targets,
                                                    updated_at, updated_by)
                VALUES ($1, $2, $3::jsonb, $4, $5)
                ON CONFLICT (care_team_id) DO UPDATE
                    SET ack_wait_s = EXCLUDED.ack_wait_s,
                        extra_targets = EXCLUDED.extra_targets,
                        updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by
                """,
                care_team_id,
                after["ack_wait_s"],
                json.dumps(after["extra_targets"]),
                now,
                body.changed_by,
            )
            # Who is paged, and how soon, for a fever that may be CRS: audited like quiet hours.
            await _audit_early_cycle(conn, body.changed_by, care_team_id, before, after, now)

    @app.get("/care-teams/{care_team_id}/early-cycle-escalation", dependencies=managed)
    async def get_early_cycle(care_team_id: str, pool: Pool) -> EarlyCycleEscalationOut:
        row = await pool.fetchrow(
            "SELECT * FROM escalation_early_cycle WHERE care_team_id = $1", care_team_id
        )
        if row is None:
            raise HTTPException(
                status_code=404,
                detail="no early-cycle escalation: early-cycle fevers page the usual chain",
            )
        wait = row["ack_wait_s"]
        return EarlyCycleEscalationOut(
            care_team_id=care_team_id,
            ack_wait_minutes=None if wait is None else wait / 60,
            extra_targets=tuple(
                TargetIn(kind=t["kind"], ref=t["ref"]) for t in json.loads(row["extra_targets"])
            ),
            updated_at=row["updated_at"],
            updated_by=row["updated_by"],
        )

    @app.delete(
        "/care-teams/{care_team_id}/early-cycle-escalation", dependencies=managed, status_code=204
    )
    async def delete_early_cycle(care_team_id: str, by: str, service: Service, pool: Pool) -> None:
        if not by.strip():
            raise HTTPException(status_code=422, detail="by names who removes it")
        async with pool.acquire() as conn, conn.transaction():
            before = await _early_cycle_row(conn, care_team_id)
            if before is None:
                raise HTTPException(status_code=404, detail="no early-cycle escalation")
            await conn.execute(
                "DELETE FROM escalation_early_cycle WHERE care_team_id = $1", care_team_id
            )
            await _audit_early_cycle(conn, by, care_team_id, before, None, service.now())

    # -- alerts -------------------------------------------------------------------------------

    @app.get("/pipeline-outages", dependencies=managed)
    async def get_pipeline_outages(
        pool: Pool, since: datetime | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """When Vigil was not watching (read-only): each heartbeat silence, newest first."""
        from services.notify.adapters.outage_store import PostgresOutageStore

        if since is not None and since.tzinfo is None:
            raise HTTPException(422, "since must carry a UTC offset")
        rows = await PostgresOutageStore(pool).outages(since=since, limit=max(1, min(limit, 500)))
        return [
            {key: (str(value) if key == "outage_id" else value) for key, value in row.items()}
            for row in rows
        ]

    @app.get("/alerts/{dedup_key}/timeline", dependencies=managed)
    async def get_timeline(dedup_key: str, pool: Pool) -> dict[str, Any]:
        timeline = await PostgresEscalationStore(pool).timeline(dedup_key)
        if timeline is None:
            raise HTTPException(status_code=404, detail="no escalation for this alert")
        return timeline

    @app.post("/alerts/{dedup_key}/acknowledge", dependencies=managed)
    async def acknowledge(
        dedup_key: str, body: AcknowledgeIn, service: Service, pool: Pool
    ) -> AckOut:
        escalation_id = await PostgresEscalationStore(pool).escalation_id_for(dedup_key)
        if escalation_id is None:
            raise HTTPException(status_code=404, detail="no escalation for this alert")
        return _ack_out(await service.acknowledge(escalation_id, by=body.by, via="api"))

    @app.post("/alerts/{dedup_key}/snooze", dependencies=managed, status_code=204)
    async def snooze(dedup_key: str, body: SnoozeIn, service: Service, pool: Pool) -> None:
        escalation_id = await PostgresEscalationStore(pool).escalation_id_for(dedup_key)
        if escalation_id is None:
            raise HTTPException(status_code=404, detail="no escalation for this alert")
        # The service's clock, so a snooze is measured on the same clock as the chain's timers.
        until = service.now() + timedelta(minutes=body.minutes)
        await service.snooze(escalation_id, until=until, by=body.by)

    # -- acknowledgement links ----------------------------------------------------------------

    @app.get("/ack/{token}", response_class=HTMLResponse)
    async def ack_page(token: str, service: Service) -> HTMLResponse:
        # A GET only shows a button: mail scanners that open every link must not acknowledge.
        try:
            service.check_token(token)
        except InvalidAckToken as exc:
            return HTMLResponse(_html(f"This link cannot be used: {_esc(exc)}."), status_code=410)
        form = (
            f'<form method="post" action="/ack/{html.escape(token)}">'
            '<button type="submit" style="font-size:2em">Acknowledge</button></form>'
        )
        return HTMLResponse(_html("Acknowledge this page and stop further escalation?" + form))

    @app.post("/ack/{token}", response_class=HTMLResponse)
    async def ack_link(token: str, service: Service) -> HTMLResponse:
        result = await service.acknowledge_token(token)
        if result.outcome is AckOutcome.ACKNOWLEDGED:
            return HTMLResponse(_html("Acknowledged. Escalation stopped."))
        if result.outcome is AckOutcome.ALREADY:
            return HTMLResponse(_html(f"Already acknowledged by {_esc(result.detail)}."))
        return HTMLResponse(_html(f"Not acknowledged: {_esc(result.detail)}."), status_code=410)

    # -- Twilio webhooks ----------------------------------------------------------------------

    async def twilio_form(request: Request) -> dict[str, str]:
        form = {k: str(v) for k, v in (await request.form()).items()}
        token = settings.twilio_auth_token
        if token is not None:
            url = settings.public_base_url.rstrip("/") + request.url.path
            expected = twilio_signature(token.get_secret_value(), url, form)
            given = request.headers.get("X-Twilio-Signature", "")
            if not hmac.compare_digest(given, expected):
                raise HTTPException(status_code=403, detail="bad Twilio signature")
        return form

    TwilioForm = Annotated[dict[str, str], Depends(twilio_form)]

    @app.post("/twilio/sms")
    async def sms_reply(form: TwilioForm, service: Service) -> Response:
        result = await service.acknowledge_sms(
            sender=form.get("From", ""), body=form.get("Body", "")
        )
        text = {
            AckOutcome.ACKNOWLEDGED: "Acknowledged. Escalation stopped.",
            AckOutcome.ALREADY: f"Already acknowledged by {result.detail}.",
        }.get(result.outcome, f"Not acknowledged: {result.detail}.")
        twiml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f"<Response><Message>{html.escape(text)}</Message></Response>"
        )
        return Response(content=twiml, media_type="application/xml")

    @app.post("/twilio/status", status_code=204)
    async def sms_status(form: TwilioForm, service: Service) -> None:
        await service.sms_status(
            message_sid=form.get("MessageSid", ""),
            status=form.get("MessageStatus", ""),
            error_code=form.get("ErrorCode"),
        )

    return app


#: The audit action of a change to a care team's quiet hours (``vigil audit list``).
QUIET_HOURS_CHANGED = AuditAction.QUIET_HOURS_CHANGED


class QuietHoursIn(BaseModel):
    """A care team's quiet hours: LOW and INFO alerts arriving between ``start`` and ``end``
    (local wall-clock time in ``timezone``; crosses midnight when start > end) are held and
    paged as one digest when they end. HIGH and MEDIUM are never held."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str = Field(description="IANA time zone, e.g. Europe/Berlin.")
    start: time = Field(description="Local wall-clock time quiet hours begin, e.g. 22:00.")
    end: time = Field(description="Local wall-clock time they end, e.g. 07:00.")
    changed_by: str = Field(min_length=1, description="Who sets them, e.g. person:lead-nurse.")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {name!r}") from exc
        return name

    @model_validator(mode="after")
    def _window(self) -> "QuietHoursIn":
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("start and end are local times in timezone, without an offset")
        if self.start == self.end:
            raise ValueError("quiet hours start and end at different times")
        return self


class QuietHoursOut(BaseModel):
    care_team_id: str
    timezone: str
    start: time
    end: time
    updated_at: datetime
    updated_by: str


def _quiet_json(body: QuietHoursIn) -> dict[str, str]:
    return {
        "timezone": body.timezone,
        "start": body.start.isoformat(),
        "end": body.end.isoformat(),
    }


async def _quiet_hours_row(conn: Any, care_team_id: str) -> dict[str, str] | None:
    row = await conn.fetchrow(
        "SELECT timezone, starts_local, ends_local FROM notify_quiet_hours "
        "WHERE care_team_id = $1 FOR UPDATE",
        care_team_id,
    )
    if row is None:
        return None
    return {
        "timezone": row["timezone"],
        "start": row["starts_local"].isoformat(),
        "end": row["ends_local"].isoformat(),
    }


async def _bring_digests_forward(conn: Any, care_team_id: str, due_at: datetime) -> None:
    """A pending digest is paged no later than the quiet hours now in force end (at once when
    they were removed or no longer cover this instant). Never later than announced: alerts
    already held were promised to be paged at the old end."""
    await conn.execute(
        """
        UPDATE notify_bundles SET due_at = LEAST(due_at, $2)
        WHERE care_team_id = $1 AND kind = 'quiet_digest' AND status = 'pending'
        """,
        care_team_id,
        due_at,
    )


async def _audit_quiet_hours(
    conn: Any,
    actor: str,
    care_team_id: str,
    before: dict[str, str] | None,
    after: dict[str, str] | None,
    at: datetime,
) -> None:
    from vigil.audit import append as audit_append

    await audit_append(
        conn,
        actor,
        QUIET_HOURS_CHANGED,
        f"care_team:{care_team_id}",
        {"before": before, "after": after},
        at=at,
    )


def _early_cycle_json(body: EarlyCycleEscalationIn) -> dict[str, Any]:
    """The override as stored (seconds, targets) and as audited."""
    return {
        "ack_wait_s": None
        if body.ack_wait_minutes is None
        else max(1, round(body.ack_wait_minutes * 60)),
        "extra_targets": [{"kind": t.kind, "ref": t.ref} for t in body.extra_targets],
    }


async def _early_cycle_row(conn: Any, care_team_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT ack_wait_s, extra_targets FROM escalation_early_cycle "
        "WHERE care_team_id = $1 FOR UPDATE",
        care_team_id,
    )
    if row is None:
        return None
    return {"ack_wait_s": row["ack_wait_s"], "extra_targets": json.loads(row["extra_targets"])}


async def _audit_early_cycle(
    conn: Any,
    actor: str,
    care_team_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    at: datetime,
) -> None:
    from vigil.audit import append as audit_append

    await audit_append(
        conn,
        actor,
        AuditAction.EARLY_CYCLE_ESCALATION_CHANGED,
        f"care_team:{care_team_id}",
        {"before": before, "after": after},
        at=at,
    )


def _same(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise HTTPException(status_code=422, detail="id in the path and the body differ")


def _ack_out(result: AckResult) -> AckOut:
    if result.outcome is AckOutcome.NOT_FOUND:
        raise HTTPException(status_code=404, detail="no escalation for this alert")
    return AckOut(
        outcome=result.outcome.value,
        escalation_id=None if result.escalation_id is None else str(result.escalation_id),
        detail=result.detail,
    )


def _esc(value: object) -> str:
    return html.escape(str(value))


def _html(body: str) -> str:
    return (
        '<!doctype html><html><head><meta name="viewport" content="width=device-width">'
        f"<title>Vigil</title></head><body><p>{body}</p></body></html>"
    )


def main(argv: list[str] | None = None) -> int:
    """``vigil notify-api``: serve the API alone (the notify service keeps paging)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="vigil-notify-api")
    parser.add_argument("--host", help="overrides VIGIL_NOTIFY_API_HOST")
    parser.add_argument("--port", type=int, help="overrides VIGIL_NOTIFY_API_PORT")
    args = parser.parse_args(argv)
    settings = NotifySettings()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level=settings.log_level.lower(),
    )
    return 0
