"""Paging use cases: handle an alert phase, deliver a page, retry what failed, resume after a crash.

Owns the order of the steps and the in-process retry queue; it asks ``domain`` for every decision
and touches the database, the mail server and Kafka only through the ports it is given. It never
logs a page's subject or body (they carry the triggering value, which is PHI).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from uuid import UUID

from schemas.events import Alert, DeliveryAttempt, DeliveryStatus, Page
from services.notify.domain import (
    PageOrder,
    RecordOnly,
    Route,
    backoff_delay_s,
    compose_page_email,
    decide,
    message_id_for,
)
from services.notify.service_layer.ports import (
    DeliveryPublisher,
    NotifyRepository,
    PageSender,
    UndeliveredPage,
)
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify")

# Statuses after which sending again would only make a duplicate.
_DONE = frozenset(
    {DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.READ, DeliveryStatus.ACCEPTED}
)


@dataclass(frozen=True, slots=True)
class PagingPolicy:
    sender_address: str
    fallback_email: str
    max_send_attempts: int = 5
    retry_base_s: float = 2.0
    retry_cap_s: float = 60.0


@dataclass(frozen=True, slots=True)
class _Delivery:
    """A page waiting for its next try in this process."""

    page: Page
    alert: Alert
    route_detail: str | None
    tries_this_run: int
    due_at: datetime


class PageDispatcher:
    """Turns alert phases into delivered pages, one page per idempotency key."""

    def __init__(
        self,
        *,
        repository: NotifyRepository,
        sender: PageSender,
        publisher: DeliveryPublisher,
        policy: PagingPolicy,
        clock: Callable[[], datetime],
    ) -> None:
        self._repository = repository
        self._sender = sender
        self._publisher = publisher
        self._policy = policy
        self._clock = clock
        self._waiting: dict[UUID, _Delivery] = {}
        self._in_flight: set[UUID] = set()
        self._wakeup = asyncio.Event()

    # -- alert phases -------------------------------------------------------------------------

    async def handle_alert(self, alert: Alert) -> None:
        """Record the phase, page if the phase calls for it, and try the first delivery now.

        Returns once the page row and its first attempt are stored, so the caller may commit the
        alert's offset: a failed send stays in the retry queue and in the database, never lost.
        """
        fresh = await self._repository.record_alert(alert)
        oncall = await self._repository.find_oncall(alert.patient_id)
        thread = await self._repository.find_thread_root(alert.dedup_key)
        decision = decide(
            alert, oncall=oncall, thread=thread, fallback_email=self._policy.fallback_email
        )
        fields = log_fields(
            alert_id=str(alert.alert_id),
            dedup_key=alert.dedup_key,
            patient_id=alert.patient_id,
            phase=alert.phase.value,
            priority=alert.priority.value,
            code=alert.code,
            redelivered=not fresh,
        )
        if isinstance(decision, RecordOnly):
            log.info("alert_recorded", extra=fields)
            return
        await self._queue_and_send(alert, decision)

    async def _queue_and_send(self, alert: Alert, order: PageOrder) -> None:
        page = order.to_page(alert, created_at=self._clock())
        if order.route is Route.FALLBACK:
            log.error(
                "alert_unroutable",
                extra=log_fields(
                    alert_id=str(alert.alert_id),
                    patient_id=alert.patient_id,
                    page_id=str(page.page_id),
                    care_team_id=order.care_team_id,
                    reason=order.route_detail,
                ),
            )
        stored = await self._repository.insert_page(
            page, route=order.route, route_detail=order.route_detail
        )
        if not stored.new:
            if stored.status in _DONE:
                log.info(
                    "page_duplicate_skipped",
                    extra=log_fields(page_id=str(page.page_id), status=stored.status.value),
                )
                return
            if page.page_id in self._waiting or page.page_id in self._in_flight:
                return
        else:
            log.info(
                "page_queued",
                extra=log_fields(
                    page_id=str(page.page_id),
                    alert_id=str(alert.alert_id),
                    purpose=order.purpose.value,
                    route=order.route.value,
                    care_team_id=order.care_team_id,
                ),
            )
        await self._try(
            _Delivery(
                page=page,
                alert=alert,
                route_detail=order.route_detail,
                tries_this_run=0,
                due_at=self._clock(),
            )
        )

    # -- delivery and retries -----------------------------------------------------------------

    async def _try(self, delivery: _Delivery) -> None:
        page = delivery.page
        self._in_flight.add(page.page_id)
        try:
            thread = await self._repository.find_thread_root(page.dedup_key)
            message = compose_page_email(
                delivery.alert,
                page,
                sender=self._policy.sender_address,
                composed_at=self._clock(),
                thread=thread,
                route_detail=delivery.route_detail,
            )
            outcome = await self._sender.send(message, recipient=page.recipient)
            at = self._clock()
            status = DeliveryStatus.SENT if outcome.accepted else DeliveryStatus.FAILED
            provider_message_id = message_id_for(page.idempotency_key)
            number = await self._repository.record_attempt(
                page.page_id,
                channel=page.channel,
                recipient=page.recipient,
                status=status,
                at=at,
                detail=outcome.detail,
                provider_message_id=provider_message_id,
            )
            await self._publisher.publish_attempt(
                DeliveryAttempt(
                    page_id=page.page_id,
                    attempt=number,
                    channel=page.channel,
                    recipient=page.recipient,
                    status=status,
                    at=at,
                    detail=outcome.detail,
                    provider_message_id=provider_message_id,
                )
            )
        finally:
            self._in_flight.discard(page.page_id)

        tries = delivery.tries_this_run + 1
        fields = dict(
            page_id=str(page.page_id),
            alert_id=str(page.alert_id),
            attempt=number,
            tries_this_run=tries,
        )
        if outcome.accepted:
            log.info("page_sent", extra=log_fields(**fields))
            return
        if tries >= self._policy.max_send_attempts:
            # Left as 'failed' in the database: the next start-up resumes it.
            log.error(
                "page_delivery_exhausted",
                extra=log_fields(**fields, detail=outcome.detail, permanent=outcome.permanent),
            )
            return
        delay = backoff_delay_s(
            tries, base_s=self._policy.retry_base_s, cap_s=self._policy.retry_cap_s
        )
        log.warning(
            "page_send_failed",
            extra=log_fields(
                **fields, detail=outcome.detail, permanent=outcome.permanent, retry_in_s=delay
            ),
        )
        due_at = at + timedelta(seconds=delay)
        self._schedule(replace(delivery, tries_this_run=tries, due_at=due_at))

    def _schedule(self, delivery: _Delivery) -> None:
        self._waiting[delivery.page.page_id] = delivery
        self._wakeup.set()

    def next_due(self) -> datetime | None:
        """When the earliest waiting retry is due, None when nothing waits."""
        return min((d.due_at for d in self._waiting.values()), default=None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def deliver_due(self) -> int:
        """Try every waiting page whose time has come; returns how many were tried."""
        now = self._clock()
        due = sorted((d for d in self._waiting.values() if d.due_at <= now), key=lambda d: d.due_at)
        for delivery in due:
            del self._waiting[delivery.page.page_id]
            await self._try(delivery)
        return len(due)

    async def run_retries(self, stop: asyncio.Event) -> None:
        """Deliver retries as they fall due until ``stop`` is set."""
        watcher = asyncio.create_task(self._wake_when(stop))
        try:
            while not stop.is_set():
                # Cleared before looking, so a retry scheduled meanwhile wakes the wait below.
                self._wakeup.clear()
                await self.deliver_due()
                due = self.next_due()
                timeout = None if due is None else max(0.0, (due - self._clock()).total_seconds())
                try:
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _wake_when(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wakeup.set()

    # -- crash recovery -----------------------------------------------------------------------

    async def resume(self) -> int:
        """Queue every page a previous run left undelivered for an immediate try.

        A page may have reached the server just before the crash; sending it again is the safe
        side (the stable Message-ID lets the mail client fold the duplicate).
        """
        pending: list[UndeliveredPage] = await self._repository.undelivered_pages()
        now = self._clock()
        for item in pending:
            if item.page.page_id in self._in_flight:
                continue
            self._schedule(
                _Delivery(
                    page=item.page,
                    alert=item.alert,
                    route_detail=item.route_detail,
                    tries_this_run=0,
                    due_at=now,
                )
            )
        log.info("pages_resumed", extra=log_fields(count=len(pending)))
        return len(pending)
