"""Regional cover's morning summary, sent (docs/regional-cover.md): once a window of cover has
ended, the covered team's on-call address is e-mailed what happened in it, once per agreement
and window end (``domain.cover_summary.summary_key``), on the clock round right after the
hand-back. The e-mail is queued in ``cover_summary_pages`` before it is sent, so a restart or a
second round finds it there and sends nothing more; a sent one is audited
(``notify.cover_summary_sent``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage

from services.notify.adapters.postgres.cover_summaries import (
    CoveredNight,
    PostgresCoverSummaries,
    SummaryPage,
    page_id_for,
)
from services.notify.domain.cover_summary import (
    CoverNight,
    NightToTell,
    compose_summary_mail,
    nights_to_tell,
    summarise,
    summary_key,
)
from services.notify.service_layer.channels import ChannelRegistry
from services.notify.service_layer.ports import SendOutcome
from services.notify.service_layer.summary_mail import next_try_in, summary_email, try_summary
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify.cover_summary")


@dataclass(frozen=True, slots=True)
class CoverSummaryConfig:
    sender_address: str
    #: Who is e-mailed for a covered team that has no on-call address.
    fallback_email: str
    #: A window that ended longer ago than this is not e-mailed (notify was down all that time,
    #: or the agreement is new): the care-team API still answers its summary.
    within_s: float = 24 * 3600
    #: Where the dashboard shows the same summary, named in the e-mail.
    dashboard_path: str = "/roster"
    max_tries: int = 5
    retry_base_s: float = 2.0
    retry_cap_s: float = 60.0
    #: A claimed e-mail not recorded within this time (its sender died) is tried again.
    lease_s: float = 60.0


class CoverSummaries:
    def __init__(
        self,
        *,
        store: PostgresCoverSummaries,
        channels: ChannelRegistry,
        config: CoverSummaryConfig,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._channels = channels
        self._config = config
        self._clock = clock

    async def round(self) -> int:
        """Queue the summaries of the windows that have ended, then send those due; how many
        were sent."""
        await self.compose_due()
        return await self.send_due()

    async def compose_due(self) -> int:
        """Queue the summary of each agreement's latest window that ended within ``within_s``
        (under a version signed off before its end), and of a window its revocation cut short
        within that time, not summarised yet; how many e-mails were queued."""
        now = self._clock()
        since = now - timedelta(seconds=self._config.within_s)
        queued = 0
        for agreement in await self._store.agreements(since):
            for window in nights_to_tell(
                agreement.hours, agreement.signed_off_at, now, since, agreement.revocation
            ):
                if window.ends in agreement.summarised:
                    continue
                written = await self._store.queue(await self._pages(agreement, window), now)
                queued += written
                if written:
                    log.info(
                        "cover_summary_queued",
                        extra=log_fields(
                            agreement_id=agreement.agreement_id,
                            care_team_id=agreement.covered_team_id,
                            window_ends=window.ends.isoformat(),
                            cut_short=window.revocation is not None,
                            pages=written,
                        ),
                    )
        return queued

    async def _pages(self, agreement: CoveredNight, window: NightToTell) -> list[SummaryPage]:
        starts, ends = window.starts, window.ends
        night = CoverNight(
            agreement_id=agreement.agreement_id,
            version=agreement.version,
            covering_team_id=agreement.covering_team_id,
            covered_team_id=agreement.covered_team_id,
            timezone=agreement.hours.timezone,
            starts=starts,
            ends=ends,
            revocation=window.revocation,
        )
        patients = summarise(
            starts, ends, await self._store.night_alerts(agreement.covered_team_id, starts, ends)
        )
        names = {
            team: name
            for team, name in (
                (agreement.covered_team_id, agreement.covered_name),
                (agreement.covering_team_id, agreement.covering_name),
            )
            if name
        }
        mail = compose_summary_mail(
            night,
            patients,
            team_names=names,
            covering_centre=agreement.covering_centre,
            dashboard_path=self._config.dashboard_path,
        )
        key = summary_key(agreement.agreement_id, ends)
        recipient = agreement.covered_oncall_email or self._config.fallback_email
        return [
            SummaryPage(
                page_id=page_id_for(key, "email", recipient),
                agreement_id=agreement.agreement_id,
                version=agreement.version,
                window_starts=starts,
                window_ends=ends,
                care_team_id=agreement.covered_team_id,
                channel="email",
                recipient=recipient,
                subject=mail.subject,
                body=mail.body,
                patients=mail.patients,
                alerts=mail.alerts,
                tries=0,
            )
        ]

    async def send_due(self) -> int:
        now = self._clock()
        sent = 0
        for page in await self._store.claim_due(now, lease_s=self._config.lease_s):
            outcome = await self._send(page, now)
            tries = page.tries + 1
            retry = next_try_in(
                outcome,
                tries,
                max_tries=self._config.max_tries,
                base_s=self._config.retry_base_s,
                cap_s=self._config.retry_cap_s,
            )
            await self._store.record(
                page, sent=outcome.accepted, detail=outcome.detail, at=now, retry_in_s=retry
            )
            if outcome.accepted:
                sent += 1
                log.info(
                    "cover_summary_sent",
                    extra=log_fields(page_id=str(page.page_id), care_team_id=page.care_team_id),
                )
            elif retry is None:
                log.error(
                    "cover_summary_failed",
                    extra=log_fields(page_id=str(page.page_id), care_team_id=page.care_team_id),
                )
        return sent

    async def _send(self, page: SummaryPage, now: datetime) -> SendOutcome:
        return await try_summary(
            self._channels,
            channel=page.channel,
            page_id=page.page_id,
            recipient=page.recipient,
            email=lambda: self._email_of(page, now),
            text=lambda: page.subject,
            event=lambda: {},
            purpose="cover_summary",
            log=log,
        )

    def _email_of(self, page: SummaryPage, now: datetime) -> EmailMessage:
        return summary_email(
            sender=self._config.sender_address,
            recipient=page.recipient,
            subject=page.subject,
            body=page.body,
            now=now,
            purpose="cover_summary",
            page_id=page.page_id,
        )
