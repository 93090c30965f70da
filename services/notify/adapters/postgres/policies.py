"""The policy repository in PostgreSQL: ``escalation_policies``, ``care_teams`` (on-call address),
``oncall_schedules`` and ``oncall_overrides``, ``escalation_early_cycle``, ``notify_quiet_hours``,
``patients`` (care team), ``contact_methods`` (whose address). Read to be frozen onto an alert.
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime, time
from typing import Any

from services.notify.domain.cover import Agreement, CoverHours
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    DEFAULT_POLICY_REPEATS,
    DEFAULT_POLICY_WAIT_S,
    PolicySnapshot,
    StepSnapshot,
    Target,
    page_until_acknowledged,
)
from services.notify.domain.monitoring_end import PatientStanding
from services.notify.domain.quiet_hours import QuietHours
from services.notify.domain.schedule import Override, Rotation
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify.policies")


class PostgresPolicies:
    """Policies and who they page: a patient's care team, its escalation policy (or default
    policy) with its schedules, its early-cycle override and quiet hours, a rotation, the
    person behind a contact address."""

    def __init__(
        self,
        db: Any,
        *,
        default_wait_s: int = DEFAULT_POLICY_WAIT_S,
        default_repeats: int = DEFAULT_POLICY_REPEATS,
    ) -> None:
        # An asyncpg connection (inside a ``PostgresUnitOfWork``) or, for a single statement,
        # the pool; asyncpg ships no type information.
        self._db = db
        self._default_wait_s = default_wait_s
        self._default_repeats = default_repeats

    async def standing_of(self, patient_id: str, device_id: str) -> PatientStanding | None:
        """The patient's care team, end of infusion and discharge, whether ``device_id``
        is a pump and the cover agreements in force for the team (the newest signed-off version
        of each, unless revoked), in one statement; None for a patient the registry does not
        know."""
        row = await self._db.fetchrow(
            """
            SELECT p.care_team_id, p.infusion_ended_at, p.discharged_at,
                   EXISTS (SELECT 1 FROM devices d
                           WHERE d.device_id = $2 AND d.kind = 'pump') AS device_is_pump,
                   (SELECT coalesce(json_agg(c), '[]') FROM (
                        SELECT DISTINCT ON (agreement_id) agreement_id, version,
                               covering_team_id, timezone, days, starts, ends, exceptions,
                               revoked, decided_at
                        FROM cover_agreements
                        WHERE covered_team_id = p.care_team_id AND decision = 'approved'
                        ORDER BY agreement_id, version DESC) c
                    WHERE NOT c.revoked) AS cover
            FROM patients p WHERE p.patient_id = $1
            """,
            patient_id,
            device_id,
        )
        if row is None:
            return None
        return PatientStanding(
            care_team_id=str(row["care_team_id"]),
            infusion_ended_at=row["infusion_ended_at"],
            discharged_at=row["discharged_at"],
            device_is_pump=bool(row["device_is_pump"]),
            cover=_cover(str(row["care_team_id"]), row["cover"]),
        )

    async def load_policy(self, care_team_id: str) -> PolicySnapshot | None:
        """The team's policy with every schedule it names, as it stands now (to be frozen)."""
        conn = self._db
        row = await conn.fetchrow(
            "SELECT policy_id, steps, repeat_count FROM escalation_policies "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        if row is None:
            return await self._default_policy(conn, care_team_id)
        steps = tuple(
            StepSnapshot(
                wait_s=int(s["wait_s"]),
                targets=tuple(Target(kind=t["kind"], ref=str(t["ref"])) for t in s["targets"]),
            )
            for s in json.loads(row["steps"])
        )
        if not steps:
            # A stored policy that names no step (written around the API, which refuses one)
            # would page nobody: the team's implicit policy pages instead.
            log.error(
                "escalation_policy_without_steps",
                extra=log_fields(policy_id=str(row["policy_id"]), care_team_id=care_team_id),
            )
            return await self._default_policy(conn, care_team_id)
        schedules = await _schedules(conn, [t for s in steps for t in s.targets])
        # A step naming a deleted schedule keeps its place: it pages the fallback instead.
        steps = tuple(
            StepSnapshot(wait_s=s.wait_s, targets=_known(s.targets, schedules)) for s in steps
        )
        return PolicySnapshot(
            policy_id=str(row["policy_id"]),
            steps=steps,
            repeat_count=int(row["repeat_count"]),
            schedules=schedules,
        )

    async def _default_policy(self, conn: Any, care_team_id: str) -> PolicySnapshot | None:
        """The implicit policy of a team that has none: page its on-call address until someone
        acknowledges. Without it, such a team's alerts could be paged once and never again."""
        address = await conn.fetchval(
            "SELECT oncall_email FROM care_teams WHERE care_team_id = $1", care_team_id
        )
        if not address:
            return None
        return page_until_acknowledged(
            f"default:{care_team_id}",
            str(address),
            wait_s=self._default_wait_s,
            repeats=self._default_repeats,
        )

    async def early_cycle_override(self, care_team_id: str) -> EarlyCycleOverride | None:
        """The team's early-cycle override (migration 0025) with the schedules its extra
        targets name, as it stands now (to be frozen); None when the team has none."""
        conn = self._db
        row = await conn.fetchrow(
            "SELECT ack_wait_s, extra_targets FROM escalation_early_cycle WHERE care_team_id = $1",
            care_team_id,
        )
        if row is None:
            return None
        targets = tuple(
            Target(kind=t["kind"], ref=str(t["ref"])) for t in json.loads(row["extra_targets"])
        )
        schedules = await _schedules(conn, list(targets))
        wait = row["ack_wait_s"]
        return EarlyCycleOverride(
            ack_wait_s=None if wait is None else int(wait),
            # A target naming a deleted schedule pages the fallback instead, as in a policy.
            extra_targets=_known(targets, schedules),
            schedules=schedules,
        )

    async def rotation(self, schedule_id: str) -> Rotation | None:
        conn = self._db
        schedule = await conn.fetchrow(
            "SELECT * FROM oncall_schedules WHERE schedule_id = $1", schedule_id
        )
        if schedule is None:
            return None
        overrides = await conn.fetch(
            "SELECT person_id, starts_at, ends_at FROM oncall_overrides "
            "WHERE schedule_id = $1 ORDER BY starts_at, override_id",
            schedule_id,
        )
        return _rotation(schedule, overrides)

    async def quiet_hours(self, care_team_id: str) -> QuietHours | None:
        row = await self._db.fetchrow(
            "SELECT timezone, starts_local, ends_local FROM notify_quiet_hours "
            "WHERE care_team_id = $1",
            care_team_id,
        )
        if row is None:
            return None
        return QuietHours(
            timezone=str(row["timezone"]), start=row["starts_local"], end=row["ends_local"]
        )

    async def person_for_address(self, channel: str, address: str) -> str | None:
        value = await self._db.fetchval(
            "SELECT person_id FROM contact_methods WHERE channel = $1 AND address = $2 LIMIT 1",
            channel,
            address,
        )
        return None if value is None else str(value)


async def _schedules(conn: Any, targets: list[Target]) -> dict[str, Rotation]:
    """The rotations (with overrides) of the schedules ``targets`` name that still exist."""
    schedules: dict[str, Rotation] = {}
    for name in sorted({t.ref for t in targets if t.kind == "schedule"}):
        schedule = await conn.fetchrow(
            "SELECT * FROM oncall_schedules WHERE schedule_id = $1", name
        )
        if schedule is None:
            continue
        overrides = await conn.fetch(
            "SELECT person_id, starts_at, ends_at FROM oncall_overrides "
            "WHERE schedule_id = $1 ORDER BY starts_at, override_id",
            name,
        )
        schedules[name] = _rotation(schedule, overrides)
    return schedules


def _known(targets: tuple[Target, ...], schedules: dict[str, Rotation]) -> tuple[Target, ...]:
    """``targets`` with each schedule that no longer exists replaced by the fallback address."""
    return tuple(
        t if t.kind != "schedule" or t.ref in schedules else Target("email", "") for t in targets
    )


def _rotation(schedule: Any, overrides: Any) -> Rotation:
    return Rotation(
        schedule_id=str(schedule["schedule_id"]),
        timezone=str(schedule["timezone"]),
        start_date=schedule["start_date"],
        handoff_time=schedule["handoff_time"],
        shift_days=int(schedule["shift_days"]),
        participants=tuple(schedule["participants"]),
        overrides=tuple(
            Override(person_id=str(o["person_id"]), starts_at=o["starts_at"], ends_at=o["ends_at"])
            for o in overrides
        ),
    )


def _cover(covered_team_id: str, value: Any) -> tuple[Agreement, ...]:
    rows = json.loads(value) if isinstance(value, str) else (value or [])
    return tuple(
        Agreement(
            agreement_id=str(r["agreement_id"]),
            version=int(r["version"]),
            covering_team_id=str(r["covering_team_id"]),
            covered_team_id=covered_team_id,
            hours=CoverHours(
                str(r["timezone"]),
                frozenset(int(d) for d in r["days"]),
                time.fromisoformat(r["starts"]),
                time.fromisoformat(r["ends"]),
                frozenset(date.fromisoformat(d) for d in r["exceptions"]),
            ),
            signed_off_at=datetime.fromisoformat(r["decided_at"]),
        )
        for r in rows
    )
