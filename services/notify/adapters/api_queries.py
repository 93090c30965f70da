"""PostgreSQL side of a care team's registry as the care-team API reaches it through
``public.TeamRegistry``: ``ApiRepository`` and ``SettingsChanges`` over asyncpg.

Owns the SQL against ``care_teams``, ``people``, ``contact_methods``, ``oncall_schedules``,
``oncall_overrides``, ``escalation_policies``, ``notify_quiet_hours`` and
``escalation_early_cycle``, and the one statement that moves pending quiet-hours digests in
``notify_bundles``. Schedules' rotations are read through the escalation store. Decides
nothing: what to change and what to
audit is the service layer's (``service_layer/team_settings.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, time
from typing import Any
from uuid import UUID

from schemas.notify import (
    CareTeamIn,
    EscalationPolicyIn,
    OverrideIn,
    PersonIn,
    ScheduleIn,
)
from services.notify.adapters.postgres.unit_of_work import PostgresUnitOfWork
from services.notify.domain.schedule import Rotation
from services.notify.service_layer.api_ports import EarlyCycleRecord, QuietHoursRecord
from services.notify.service_layer.ports import QUIET_DIGEST_KIND
from vigil.audit.store import append as audit_append


class PostgresSettingsChanges:
    """``SettingsChanges`` on one connection inside its transaction."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def care_team_exists(self, care_team_id: str) -> bool:
        found = await self._conn.fetchval(
            "SELECT 1 FROM care_teams WHERE care_team_id = $1", care_team_id
        )
        return bool(found)

    async def quiet_hours_for_update(self, care_team_id: str) -> dict[str, str] | None:
        row = await self._conn.fetchrow(
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

    async def save_quiet_hours(
        self, care_team_id: str, *, timezone: str, start: time, end: time, at: datetime, by: str
    ) -> None:
        await self._conn.execute(
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
            timezone,
            start,
            end,
            at,
            by,
        )

    async def delete_quiet_hours(self, care_team_id: str) -> None:
        await self._conn.execute(
            "DELETE FROM notify_quiet_hours WHERE care_team_id = $1", care_team_id
        )

    async def bring_digests_forward(self, care_team_id: str, due_at: datetime) -> None:
        await self._conn.execute(
            """
            UPDATE notify_bundles SET due_at = LEAST(due_at, $2)
            WHERE care_team_id = $1 AND kind = $3 AND status = 'pending'
            """,
            care_team_id,
            due_at,
            QUIET_DIGEST_KIND,
        )

    async def early_cycle_for_update(self, care_team_id: str) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(
            "SELECT ack_wait_s, extra_targets FROM escalation_early_cycle "
            "WHERE care_team_id = $1 FOR UPDATE",
            care_team_id,
        )
        if row is None:
            return None
        return {"ack_wait_s": row["ack_wait_s"], "extra_targets": json.loads(row["extra_targets"])}

    async def save_early_cycle(
        self, care_team_id: str, setting: dict[str, Any], *, at: datetime, by: str
    ) -> None:
        await self._conn.execute(
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
            setting["ack_wait_s"],
            json.dumps(setting["extra_targets"]),
            at,
            by,
        )

    async def delete_early_cycle(self, care_team_id: str) -> None:
        await self._conn.execute(
            "DELETE FROM escalation_early_cycle WHERE care_team_id = $1", care_team_id
        )

    async def audit(
        self, actor: str, action: str, subject: str, details: dict[str, Any], *, at: datetime
    ) -> None:
        await audit_append(self._conn, actor, action, subject, details, at=at)


class PostgresApiRepository:
    """``ApiRepository`` over an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @asynccontextmanager
    async def settings_changes(self) -> AsyncIterator[PostgresSettingsChanges]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield PostgresSettingsChanges(conn)

    async def put_care_team(self, team: CareTeamIn) -> None:
        await self._pool.execute(
            """
            INSERT INTO care_teams (care_team_id, name, oncall_email, timezone)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (care_team_id) DO UPDATE
                SET name = EXCLUDED.name, oncall_email = EXCLUDED.oncall_email,
                    timezone = EXCLUDED.timezone
            """,
            team.care_team_id,
            team.name,
            team.oncall_email,
            team.timezone,
        )

    async def put_person(self, person: PersonIn) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO people (person_id, name, care_team_id) VALUES ($1, $2, $3)
                ON CONFLICT (person_id) DO UPDATE
                    SET name = EXCLUDED.name, care_team_id = EXCLUDED.care_team_id
                """,
                person.person_id,
                person.name,
                person.care_team_id,
            )
            await conn.execute("DELETE FROM contact_methods WHERE person_id = $1", person.person_id)
            await conn.executemany(
                "INSERT INTO contact_methods (person_id, rank, channel, address) "
                "VALUES ($1, $2, $3, $4)",
                [
                    (person.person_id, rank, method.channel, method.address)
                    for rank, method in enumerate(person.contact_methods)
                ],
            )

    async def person(self, person_id: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow("SELECT * FROM people WHERE person_id = $1", person_id)
        if row is None:
            return None
        methods = await self._pool.fetch(
            "SELECT channel, address FROM contact_methods WHERE person_id = $1 ORDER BY rank",
            person_id,
        )
        return {
            "person_id": row["person_id"],
            "name": row["name"],
            "care_team_id": row["care_team_id"],
            "contact_methods": [dict(m) for m in methods],
        }

    async def put_schedule(self, schedule: ScheduleIn) -> None:
        await self._pool.execute(
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
            schedule.schedule_id,
            schedule.care_team_id,
            schedule.name,
            schedule.timezone,
            schedule.start_date,
            schedule.handoff_time,
            schedule.shift_days,
            list(schedule.participants),
        )

    async def add_override(self, override_id: UUID, schedule_id: str, override: OverrideIn) -> None:
        await self._pool.execute(
            "INSERT INTO oncall_overrides (override_id, schedule_id, person_id, starts_at, "
            "ends_at) VALUES ($1, $2, $3, $4, $5)",
            override_id,
            schedule_id,
            override.person_id,
            override.starts_at,
            override.ends_at,
        )

    async def rotation(self, schedule_id: str) -> Rotation | None:
        async with PostgresUnitOfWork(self._pool, transaction=False) as uow:
            return await uow.policies.rotation(schedule_id)

    # Reads of one care team's registry, for the care-team API (``services/notify/public.py``),
    # which scopes each of them to the caller's teams by the care team they name.

    async def care_team(self, care_team_id: str) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(
            "SELECT care_team_id, name, oncall_email, timezone FROM care_teams "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        return None if row is None else dict(row)

    async def people_of(self, care_team_id: str) -> list[dict[str, Any]]:
        rows = await self._pool.fetch(
            """
            SELECT p.person_id, p.name, p.care_team_id,
                   coalesce(jsonb_agg(jsonb_build_object('channel', c.channel,
                                                         'address', c.address)
                                      ORDER BY c.rank) FILTER (WHERE c.person_id IS NOT NULL),
                            '[]'::jsonb) AS contact_methods
            FROM people p LEFT JOIN contact_methods c USING (person_id)
            WHERE p.care_team_id = $1
            GROUP BY p.person_id ORDER BY p.person_id
            """,
            care_team_id,
        )
        return [{**dict(row), "contact_methods": _json(row["contact_methods"])} for row in rows]

    async def schedule(self, schedule_id: str, *, since: datetime) -> dict[str, Any] | None:
        """The schedule as defined, with its overrides that end after ``since``."""
        row = await self._pool.fetchrow(
            "SELECT schedule_id, care_team_id, name, timezone, start_date, handoff_time, "
            "shift_days, participants FROM oncall_schedules WHERE schedule_id = $1",
            schedule_id,
        )
        if row is None:
            return None
        overrides = await self._pool.fetch(
            "SELECT override_id, person_id, starts_at, ends_at FROM oncall_overrides "
            "WHERE schedule_id = $1 AND ends_at > $2 ORDER BY starts_at, override_id",
            schedule_id,
            since,
        )
        return {
            **dict(row),
            "participants": list(row["participants"]),
            "overrides": [dict(o) for o in overrides],
        }

    async def schedule_ids_of(self, care_team_id: str) -> list[str]:
        rows = await self._pool.fetch(
            "SELECT schedule_id FROM oncall_schedules WHERE care_team_id = $1 ORDER BY schedule_id",
            care_team_id,
        )
        return [str(r["schedule_id"]) for r in rows]

    async def policy(self, care_team_id: str) -> dict[str, Any] | None:
        """The team's escalation policy as stored (steps' waits in seconds)."""
        row = await self._pool.fetchrow(
            "SELECT policy_id, name, steps, repeat_count, updated_at FROM escalation_policies "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        if row is None:
            return None
        return {**dict(row), "steps": _json(row["steps"])}

    async def put_policy(self, care_team_id: str, policy: EscalationPolicyIn) -> None:
        steps = [
            {
                "wait_s": round(step.wait_minutes * 60),
                "targets": [{"kind": t.kind, "ref": t.ref} for t in step.targets],
            }
            for step in policy.steps
        ]
        await self._pool.execute(
            """
            INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, repeat_count,
                                             updated_at)
            VALUES ($1, $2, $3, $4::jsonb, $5, now())
            ON CONFLICT (care_team_id) DO UPDATE
                SET policy_id = EXCLUDED.policy_id, name = EXCLUDED.name, steps = EXCLUDED.steps,
                    repeat_count = EXCLUDED.repeat_count, updated_at = now()
            """,
            policy.policy_id,
            care_team_id,
            policy.name,
            json.dumps(steps),
            policy.repeat_count,
        )

    async def quiet_hours(self, care_team_id: str) -> QuietHoursRecord | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM notify_quiet_hours WHERE care_team_id = $1", care_team_id
        )
        if row is None:
            return None
        return QuietHoursRecord(
            timezone=row["timezone"],
            start=row["starts_local"],
            end=row["ends_local"],
            updated_at=row["updated_at"],
            updated_by=row["updated_by"],
        )

    async def early_cycle(self, care_team_id: str) -> EarlyCycleRecord | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM escalation_early_cycle WHERE care_team_id = $1", care_team_id
        )
        if row is None:
            return None
        return EarlyCycleRecord(
            ack_wait_s=row["ack_wait_s"],
            extra_targets=tuple(json.loads(row["extra_targets"])),
            updated_at=row["updated_at"],
            updated_by=row["updated_by"],
        )


def _json(value: Any) -> Any:
    """A jsonb value, whether the pool decodes jsonb or hands it over as text."""
    return json.loads(value) if isinstance(value, str) else value
