"""Closing a patient's escalations when the care team ends their monitoring (the care-team
API's end of infusion and discharge, ``services.api.service_layer.discharge``).

Every escalation of the patient not yet resolved (with ``devices``: only those of alerts raised
on those devices, a patient's pumps at the end of the infusion) is resolved in one transaction,
its rows locked in id order: the pure engine's ``Resolve`` with the reason, so the timeline's
``resolved`` entry says why, the chain stops (no further step, no repeat), whoever was paged is
sent the all clear and PagerDuty is told, as for any resolve. Nobody goes on being paged for a
patient who is no longer monitored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol
from uuid import UUID

from services.notify.domain.escalation import Resolve, advance
from services.notify.service_layer.unit_of_work import Change, UnitOfWork


class UnresolvedEscalations(Protocol):
    async def unresolved_of_patient(
        self, patient_id: str, devices: Sequence[str] | None
    ) -> list[UUID]:
        """The patient's escalations not resolved (of alerts raised on ``devices``, when
        given), in id order."""
        ...


async def close_patient(
    unit_of_work: Callable[[], UnitOfWork],
    escalations: UnresolvedEscalations,
    patient_id: str,
    *,
    reason: str,
    at: datetime,
    devices: Sequence[str] | None = None,
) -> int:
    """Resolve the patient's open escalations with ``reason``; how many were resolved now."""
    found = await escalations.unresolved_of_patient(patient_id, devices)
    if not found:
        return 0
    event = Resolve(at=at, reason=reason)
    async with unit_of_work() as uow:
        changes: list[Change] = []
        for escalation_id in found:
            for record in await uow.escalations.lock(escalation_id):
                transition = advance(record.snapshot, record.state, event)
                if transition.state != record.state:
                    changes.append((record, transition))
        if changes:
            await uow.escalations.save(changes)
            await uow.outbox.add_effects(changes, at=at)
            await uow.outbox.sync_upstream([r.escalation_id for r, _ in changes], at=at)
        await uow.commit()
    return len(changes)
