"""The escalation store over the notify repositories: ``unit_of_work()`` for what the service
layer does in one transaction around the pure engine (open an escalation, apply an event, fire
the due steps), and, for the steps that are one transaction of a single repository, a method
each that runs it as one unit of work (``adapters.postgres.unit_of_work``) or, for a statement
that stands alone, on the pool. The SQL lives in ``adapters/postgres/``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from schemas.events import Alert
from services.notify.adapters.postgres.bundles import PostgresBundles
from services.notify.adapters.postgres.escalations import PostgresEscalations
from services.notify.adapters.postgres.heartbeats import PostgresHeartbeats
from services.notify.adapters.postgres.outbox import PostgresOutbox, page_position
from services.notify.adapters.postgres.policies import PostgresPolicies
from services.notify.adapters.postgres.unit_of_work import PostgresUnitOfWork
from services.notify.domain.channel_failover import AttemptVerdict
from services.notify.domain.early_cycle import EarlyCycleOverride
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    DEFAULT_POLICY_REPEATS,
    DEFAULT_POLICY_WAIT_S,
    PolicySnapshot,
    TimelineEntry,
)
from services.notify.domain.quiet_hours import QuietHours
from services.notify.service_layer.ports import PageJob, SendOutcome

__all__ = ["PostgresEscalationStore", "page_position"]


class PostgresEscalationStore:
    def __init__(
        self,
        pool: Any,
        *,
        default_wait_s: int = DEFAULT_POLICY_WAIT_S,
        default_repeats: int = DEFAULT_POLICY_REPEATS,
        fallback_email: str = DEFAULT_FALLBACK_EMAIL,
    ) -> None:
        # asyncpg ships no type information; the pool is an asyncpg.Pool.
        self._pool = pool
        self._default_wait_s = default_wait_s
        self._default_repeats = default_repeats
        # Paged for a team that has no on-call address of its own (``PageWriter.fallback``).
        self._fallback_email = fallback_email
        # A statement that stands alone runs on the pool, as one round trip of its own.
        self._escalations = PostgresEscalations(pool, fallback_email=fallback_email)
        self._outbox = PostgresOutbox(pool, fallback_email=fallback_email)
        self._bundles = PostgresBundles(pool, fallback_email=fallback_email)
        self._heartbeats = PostgresHeartbeats(pool)
        self._policies = PostgresPolicies(
            pool, default_wait_s=default_wait_s, default_repeats=default_repeats
        )

    def unit_of_work(self, *, transaction: bool = True) -> PostgresUnitOfWork:
        """A new unit of work over this store's pool (``async with`` it): what the service
        layer opens, loads, runs through the pure engine and commits in one transaction."""
        return PostgresUnitOfWork(
            self._pool,
            fallback_email=self._fallback_email,
            default_wait_s=self._default_wait_s,
            default_repeats=self._default_repeats,
            transaction=transaction,
        )

    # -- who to page --------------------------------------------------------------------------

    async def team_of_patient(self, patient_id: str) -> str | None:
        return await self._policies.team_of_patient(patient_id)

    async def load_policy(self, care_team_id: str) -> PolicySnapshot | None:
        async with self.unit_of_work(transaction=False) as uow:
            return await uow.policies.load_policy(care_team_id)

    async def early_cycle_override(self, care_team_id: str) -> EarlyCycleOverride | None:
        async with self.unit_of_work(transaction=False) as uow:
            return await uow.policies.early_cycle_override(care_team_id)

    async def quiet_hours(self, care_team_id: str) -> QuietHours | None:
        return await self._policies.quiet_hours(care_team_id)

    async def person_for_address(self, channel: str, address: str) -> str | None:
        return await self._policies.person_for_address(channel, address)

    # -- escalations --------------------------------------------------------------------------

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        return await self._escalations.escalation_id_for(dedup_key)

    async def note(self, escalation_id: UUID, at: datetime, entry: TimelineEntry) -> None:
        async with self.unit_of_work(transaction=False) as uow:
            await uow.escalations.note(escalation_id, at, entry)

    async def follow_alert(self, dedup_key: str, alert_id: UUID) -> None:
        async with self.unit_of_work() as uow:
            await uow.escalations.follow_alert(dedup_key, alert_id)
            await uow.commit()

    async def open_paged_to(self, channel: str, address: str) -> UUID | None:
        return await self._escalations.open_paged_to(channel, address)

    async def spend_token(self, digest: str, at: datetime) -> bool:
        return await self._escalations.spend_token(digest, at)

    # -- bundles, quiet hours, technical holds ------------------------------------------------

    async def pending_bundle_of(self, dedup_key: str) -> UUID | None:
        return await self._bundles.pending_bundle_of(dedup_key)

    async def hold_for_quiet_hours(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        until: datetime,
    ) -> UUID | None:
        async with self.unit_of_work() as uow:
            held = await uow.bundles.hold_for_quiet_hours(
                alert, care_team_id=care_team_id, snapshot=snapshot, at=at, until=until
            )
            await uow.commit()
        return held

    async def hold_technical(
        self,
        alert: Alert,
        *,
        care_team_id: str,
        snapshot: PolicySnapshot,
        at: datetime,
        until: datetime,
    ) -> UUID | None:
        async with self.unit_of_work() as uow:
            held = await uow.bundles.hold_technical(
                alert, care_team_id=care_team_id, snapshot=snapshot, at=at, until=until
            )
            await uow.commit()
        return held

    # -- page jobs ----------------------------------------------------------------------------

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]:
        async with self.unit_of_work() as uow:
            jobs = await uow.outbox.claim_pages(now, limit=limit, lease_s=lease_s)
            await uow.commit()
        return jobs

    async def begin_attempt(self, job: PageJob, *, at: datetime) -> PageJob:
        async with self.unit_of_work() as uow:
            began = await uow.outbox.begin_attempt(job, at=at)
            await uow.commit()
        return began

    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None:
        async with self.unit_of_work() as uow:
            await uow.outbox.record_outcomes(outcomes, at=at)
            await uow.commit()

    async def job_for_provider_ref(self, provider_ref: str, now: datetime) -> PageJob | None:
        return await self._outbox.job_for_provider_ref(provider_ref, now)

    async def record_receipt(self, job: PageJob, *, status: str, at: datetime) -> None:
        async with self.unit_of_work() as uow:
            await uow.outbox.record_receipt(job, status=status, at=at)
            await uow.commit()

    # -- pipeline heartbeat -------------------------------------------------------------------

    async def heartbeat_seen(self, source: str, at: datetime) -> None:
        await self._heartbeats.heartbeat_seen(source, at)

    async def heartbeats(self) -> list[tuple[str, datetime, datetime | None]]:
        return await self._heartbeats.heartbeats()

    async def mark_silent(self, source: str, since: datetime | None) -> None:
        await self._heartbeats.mark_silent(source, since)
