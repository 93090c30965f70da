"""After a pipeline outage: record it, hold the start phases that may end at once, and send each
care team one summary (docs/notify.md, "After an outage").

The self-watch (``EscalationService.check_heartbeat``) calls ``went_silent`` and ``recovered``;
``EscalationService._start`` asks ``hold`` before paging a start phase; the clock round calls
``round``, which releases held alerts whose wait is over (paging those still open through the
usual path) and composes and sends the summaries that are due. It never logs a page's content.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any

from schemas.events import Alert
from services.notify.adapters.outage_store import (
    PostgresOutageStore,
    SummaryPage,
    TeamAccount,
)
from services.notify.domain.escalation import PolicySnapshot
from services.notify.domain.outage import OutageWindow, compose_summary, should_hold
from services.notify.domain.schedule import on_call_at
from services.notify.service_layer.channels import (
    ChannelRegistry,
    EventProvider,
    SmsProvider,
    provider_channels,
)
from services.notify.service_layer.ports import PageSender, SendOutcome
from services.notify.service_layer.summary_mail import next_try_in, summary_email, try_summary
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify.outage")

#: Summaries are composed this long after the heartbeat is back: the rules hold the timers
#: that fell due inside an outage for 120 s (``resume_grace_s``) while the devices' queued data
#: arrive; a heartbeat interval (15 s) and a margin on top.
DEFAULT_SETTLE_S = 150.0


@dataclass(frozen=True, slots=True)
class OutageConfig:
    sender_address: str
    fallback_email: str
    #: How long a MEDIUM / LOW / INFO start phase that began inside an outage just ended waits
    #: for its end (the composition root passes ``group_wait_s``); 0 holds nothing.
    hold_s: float = 0.0
    settle_s: float = DEFAULT_SETTLE_S
    #: The technical team: told by the self-watch's own page and all clear, not summarised.
    technical_care_team_id: str | None = None
    #: The care teams summarised; None (the default) is every care team with patients.
    care_team_ids: frozenset[str] | None = None
    max_tries: int = 5
    retry_base_s: float = 2.0
    retry_cap_s: float = 60.0


class OutageWatch:
    def __init__(
        self,
        *,
        store: PostgresOutageStore,
        load_policy: Callable[[str], Awaitable[PolicySnapshot | None]],
        config: OutageConfig,
        clock: Callable[[], datetime],
        channels: ChannelRegistry | None = None,
        email: PageSender | None = None,
        sms: SmsProvider | None = None,
        webhook: EventProvider | None = None,
    ) -> None:
        """``channels``: what summaries are sent on, by name (``bootstrap`` builds it); without
        it, the channels over the providers given as ``email``, ``sms`` and ``webhook``."""
        self._store = store
        self._load_policy = load_policy
        self._channels = (
            channels
            if channels is not None
            else provider_channels(email=email, sms=sms, webhook=webhook)
        )
        self._config = config
        self._clock = clock

    # -- the self-watch's hooks ---------------------------------------------------------------

    async def went_silent(self, source: str, last_seen: datetime, now: datetime) -> None:
        await self._store.opened(source, last_seen, now)

    async def recovered(
        self, source: str, silent_since: datetime, back_at: datetime, now: datetime
    ) -> None:
        outage_id = await self._store.closed(
            source,
            silent_since,
            back_at,
            now,
            now + timedelta(seconds=self._config.settle_s),
        )
        log.warning(
            "pipeline_outage_recorded",
            extra=log_fields(
                source=source,
                outage_id=str(outage_id),
                started_at=silent_since.isoformat(),
                ended_at=back_at.isoformat(),
            ),
        )

    # -- start phases of an outage just ended -------------------------------------------------

    async def hold(self, alert: Alert, now: datetime) -> bool:
        """True when the start phase waits for its end (``hold_s``) before it may page: it began
        inside an outage just ended and is not HIGH. A worsened (HIGH) alert already held is
        released here, so it pages at once."""
        if self._config.hold_s <= 0:
            return False
        if not should_hold(alert.priority):
            await self._store.release(alert.dedup_key, now)
            return False
        outage_id = await self._store.outage_covering(alert.device_time)
        if outage_id is None:
            return False
        held = await self._store.hold(
            alert, outage_id, now, now + timedelta(seconds=self._config.hold_s)
        )
        if held:
            log.info(
                "alert_held_after_outage",
                extra=log_fields(alert_id=str(alert.alert_id), outage_id=str(outage_id)),
            )
        return held

    async def next_due(self) -> datetime | None:
        return await self._store.next_held_due()

    # -- the clock round ----------------------------------------------------------------------

    async def release_due(self, page: Callable[[Alert, datetime], Awaitable[None]]) -> int:
        """Page the held alerts still open when their wait is over (through ``page``, the
        usual start path) and fold those whose end arrived; the page is opened before the hold
        is marked released, so a crash between pages twice rather than never. One alert that
        cannot be paged stays held, is logged and is tried again next round; it does not hold
        back the others."""
        now = self._clock()
        released = 0
        for alert, ended in await self._store.due_held(now):
            if not ended:
                try:
                    await page(alert, now)
                except Exception:
                    log.exception(
                        "held_alert_not_paged",
                        extra=log_fields(alert_id=str(alert.alert_id), dedup_key=alert.dedup_key),
                    )
                    continue
            await self._store.mark_released(alert.dedup_key, now, "folded" if ended else "paged")
            released += 1
        return released

    async def summarise_due(self) -> int:
        """Compose and queue the summaries of every outage whose settle time is over."""
        now = self._clock()
        written = 0
        exclude = {t for t in (self._config.technical_care_team_id,) if t}
        for outage in await self._store.due_outages(now):
            pages: list[tuple[str, str, str, str, str, str, str]] = []
            accounts = await self._store.accounts(
                outage.window, exclude=exclude, only=self._config.care_team_ids
            )
            for account in accounts:
                pages.extend(await self._pages_for(account, outage.window, now))
            if await self._store.write_summaries(outage.outage_id, pages, now):
                written += 1
                log.info(
                    "outage_summaries_queued",
                    extra=log_fields(outage_id=str(outage.outage_id), pages=len(pages)),
                )
        return written

    async def _pages_for(
        self, account: TeamAccount, window: OutageWindow, now: datetime
    ) -> list[tuple[str, str, str, str, str, str, str]]:
        summary = compose_summary(
            window,
            team_name=account.name,
            zone=account.zone,
            patients=account.patients,
            during=account.during,
            open_before=account.open_before,
            composed_at=now,
        )
        return [
            (
                account.care_team_id,
                ref,
                channel,
                address,
                summary.subject,
                summary.body,
                summary.short_text,
            )
            for ref, channel, address in await self._recipients(account, now)
        ]

    async def _recipients(self, account: TeamAccount, now: datetime) -> list[tuple[str, str, str]]:
        """Whom the team's first step names now, each on the first of their contact methods this
        instance has a sender for; the team's on-call address (else the fallback address) when
        that leaves nobody."""
        found: list[tuple[str, str, str]] = []
        policy = await self._load_policy(account.care_team_id)
        targets = () if policy is None else policy.steps[0].targets
        for target in targets:
            person: str | None = None
            if target.kind == "email" and target.ref:
                found.append((f"email:{target.ref}", "email", target.ref))
                continue
            if target.kind == "person":
                person = target.ref
            elif target.kind == "schedule" and policy is not None:
                rotation = policy.schedules.get(target.ref)
                person = None if rotation is None else on_call_at(rotation, now)
            if person is None:
                continue
            # The person's first contact method this instance can send on: a summary queued
            # for a channel with no sender here (no SMS provider, no PagerDuty integration)
            # would only fail for good (``outage_summary_failed``) and the team hear nothing.
            methods = [m for m in await self._store.contacts(person) if self._can_send(m[0])]
            if methods:
                channel, address = methods[0]
                found.append((f"person:{person}", channel, address))
        if not found:
            address = account.oncall_email or self._config.fallback_email
            found.append((f"email:{address}", "email", address))
        return list(dict.fromkeys(found))

    def _can_send(self, channel: str) -> bool:
        return channel in self._channels

    async def send_due(self) -> int:
        now = self._clock()
        sent = 0
        for page in await self._store.due_pages(now):
            outcome = await self._send(page, now)
            tries = page.tries + 1
            retry = next_try_in(
                outcome,
                tries,
                max_tries=self._config.max_tries,
                base_s=self._config.retry_base_s,
                cap_s=self._config.retry_cap_s,
            )
            await self._store.record_page(
                page, sent=outcome.accepted, detail=outcome.detail, at=now, retry_in_s=retry
            )
            if outcome.accepted:
                sent += 1
            elif retry is None:
                log.error(
                    "outage_summary_failed",
                    extra=log_fields(page_id=str(page.page_id), channel=page.channel),
                )
        return sent

    async def _send(self, page: SummaryPage, now: datetime) -> SendOutcome:
        return await try_summary(
            self._channels,
            channel=page.channel,
            page_id=page.page_id,
            recipient=page.recipient,
            email=lambda: self._email_of(page, now),
            text=lambda: page.short_text,
            event=lambda: self._event_of(page),
            purpose="outage_summary",
            log=log,
        )

    def _email_of(self, page: SummaryPage, now: datetime) -> EmailMessage:
        return summary_email(
            sender=self._config.sender_address,
            recipient=page.recipient,
            subject=page.subject,
            body=page.body,
            now=now,
            purpose="outage_summary",
            page_id=page.page_id,
        )

    def _event_of(self, page: SummaryPage) -> dict[str, object]:
        return {
            "routing_key": page.recipient,
            "event_action": "trigger",
            "dedup_key": f"vigil:outage-summary:{page.outage_id}:{page.care_team_id}",
            "payload": {
                "summary": page.short_text[:1024],
                "source": "vigil",
                "severity": "info",
                "custom_details": {"summary": page.body},
            },
        }

    async def round(self, page: Callable[[Alert, datetime], Awaitable[None]]) -> Any:
        await self.release_due(page)
        await self.summarise_due()
        return await self.send_due()
