"""Use cases: a care team's audited settings (quiet hours, the early-cycle override) set or removed.

Each change and its audit entry are one transaction (``ApiRepository.settings_changes``): who
changed what a low-priority alarm or an early-cycle fever pages, and from what, is kept in the
tamper-evident audit log. The time of a change is read from the escalation service's clock
(``clock``) inside the transaction, after the row is locked, so changes of one team are audited
in the order they commit and on the same clock as the digests and timers they move.

Each function returns False when there is nothing to change (no such care team, or nothing to
remove); the caller answers 404. Request validation is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time
from typing import Any

from schemas.events import AlertPriority
from schemas.notify import EarlyCycleEscalationIn
from services.notify.domain.quiet_hours import QuietHours, held_until
from services.notify.service_layer.api_ports import ApiRepository
from vigil.audit.actions import AuditAction

Clock = Callable[[], datetime]


async def set_quiet_hours(
    repository: ApiRepository,
    care_team_id: str,
    *,
    timezone: str,
    start: time,
    end: time,
    by: str,
    clock: Clock,
) -> bool:
    """Set the team's quiet hours; a pending digest is brought forward to their end."""
    after = {"timezone": timezone, "start": start.isoformat(), "end": end.isoformat()}
    async with repository.settings_changes() as changes:
        if not await changes.care_team_exists(care_team_id):
            return False
        before = await changes.quiet_hours_for_update(care_team_id)
        now = clock()
        quiet = QuietHours(timezone=timezone, start=start, end=end)
        # Never later than announced: alerts already held were promised the old end.
        await changes.bring_digests_forward(
            care_team_id, held_until(AlertPriority.LOW, quiet, now) or now
        )
        await changes.save_quiet_hours(
            care_team_id, timezone=timezone, start=start, end=end, at=now, by=by
        )
        await changes.audit(
            by,
            AuditAction.QUIET_HOURS_CHANGED,
            f"care_team:{care_team_id}",
            {"before": before, "after": after},
            at=now,
        )
    return True


async def remove_quiet_hours(
    repository: ApiRepository, care_team_id: str, *, by: str, clock: Clock
) -> bool:
    """Remove the team's quiet hours; a pending digest is paged at once."""
    async with repository.settings_changes() as changes:
        before = await changes.quiet_hours_for_update(care_team_id)
        if before is None:
            return False
        now = clock()
        await changes.delete_quiet_hours(care_team_id)
        await changes.bring_digests_forward(care_team_id, now)
        await changes.audit(
            by,
            AuditAction.QUIET_HOURS_CHANGED,
            f"care_team:{care_team_id}",
            {"before": before, "after": None},
            at=now,
        )
    return True


def early_cycle_setting(body: EarlyCycleEscalationIn) -> dict[str, Any]:
    """The override as stored (seconds, targets) and as audited."""
    return {
        "ack_wait_s": None
        if body.ack_wait_minutes is None
        else max(1, round(body.ack_wait_minutes * 60)),
        "extra_targets": [{"kind": t.kind, "ref": t.ref} for t in body.extra_targets],
    }


async def set_early_cycle(
    repository: ApiRepository,
    care_team_id: str,
    body: EarlyCycleEscalationIn,
    *,
    clock: Clock,
) -> bool:
    """Set how the team's fevers in the CRS window are escalated."""
    after = early_cycle_setting(body)
    async with repository.settings_changes() as changes:
        if not await changes.care_team_exists(care_team_id):
            return False
        before = await changes.early_cycle_for_update(care_team_id)
        now = clock()
        await changes.save_early_cycle(care_team_id, after, at=now, by=body.changed_by)
        await changes.audit(
            body.changed_by,
            AuditAction.EARLY_CYCLE_ESCALATION_CHANGED,
            f"care_team:{care_team_id}",
            {"before": before, "after": after},
            at=now,
        )
    return True


async def remove_early_cycle(
    repository: ApiRepository, care_team_id: str, *, by: str, clock: Clock
) -> bool:
    """Remove the override: the team's early-cycle fevers page its usual chain."""
    async with repository.settings_changes() as changes:
        before = await changes.early_cycle_for_update(care_team_id)
        if before is None:
            return False
        await changes.delete_early_cycle(care_team_id)
        await changes.audit(
            by,
            AuditAction.EARLY_CYCLE_ESCALATION_CHANGED,
            f"care_team:{care_team_id}",
            {"before": before, "after": None},
            at=clock(),
        )
    return True
