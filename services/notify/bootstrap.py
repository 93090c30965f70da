"""Wiring of the notify service: the PostgreSQL pool, the channels the settings enable, and the
escalation service over them. No logic: what is decided lives in ``domain`` and
``service_layer``; ``app`` (the consumer process) and ``api`` (the HTTP API) both start from
here.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import asyncpg

from services.notify.adapters.metrics import NotifyMetrics, observed_unit_of_work
from services.notify.adapters.outage_store import PostgresOutageStore
from services.notify.adapters.pagerduty import PagerDutyEvents
from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.adapters.postgres.cover_summaries import PostgresCoverSummaries
from services.notify.adapters.postgres.unit_of_work import unit_of_work_factory
from services.notify.adapters.smtp import SmtpSender
from services.notify.adapters.twilio import TwilioSms
from services.notify.service_layer.channels import (
    Channel,
    ChannelRegistry,
    EmailChannel,
    PagerDutyChannel,
    SmsChannel,
)
from services.notify.service_layer.cover_summary import CoverSummaries, CoverSummaryConfig
from services.notify.service_layer.escalation import (
    EscalationConfig,
    EscalationService,
    load_policy,
)
from services.notify.service_layer.outage import OutageConfig, OutageWatch
from services.notify.settings import NotifySettings
from vigil.runtime import utcnow


async def keep_session(connection: Any) -> None:
    """The pool's reset of a connection given back: nothing beyond asyncpg's own, which rolls
    back a transaction left open. asyncpg's default would also send ``pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`` on every release, one more round trip for each unit of
    work (four per alert paged at once), for session state notify never creates: its settings
    are ``SET LOCAL`` or ``set_config(..., true)``, its advisory locks ``pg_advisory_xact_lock``,
    and it declares no cursor and listens to nothing (``tests/unit/test_notify_session_state.py``
    holds its SQL to that)."""


async def open_pool(settings: NotifySettings) -> Any:
    return await asyncpg.create_pool(
        settings.pg.dsn,
        min_size=settings.pg.pool_min_size,
        max_size=settings.pg.pool_max_size,
        reset=keep_session,
    )


def smtp_sender(settings: NotifySettings) -> SmtpSender:
    password = settings.smtp_password
    return SmtpSender(
        host=settings.smtp_host,
        port=settings.smtp_port,
        envelope_from=settings.smtp_from,
        timeout_s=settings.smtp_timeout_s,
        starttls=settings.smtp_starttls,
        username=settings.smtp_username,
        password=None if password is None else password.get_secret_value(),
    )


def channel_registry(
    settings: NotifySettings, *, sms: TwilioSms | None, webhook: PagerDutyEvents | None
) -> ChannelRegistry:
    """The channels pages are sent on: e-mail always, SMS and PagerDuty when the settings enable
    them. A new channel is its adapter (implementing ``service_layer.channels.Channel``) and
    one more entry here."""
    channels: list[Channel] = [EmailChannel(smtp_sender(settings))]
    if sms is not None:
        channels.append(SmsChannel(sms))
    if webhook is not None:
        channels.append(PagerDutyChannel(webhook))
    return ChannelRegistry(channels)


def build_escalation(
    settings: NotifySettings,
    pool: Any,
    *,
    clock: Any = utcnow,
    metrics: NotifyMetrics | None = None,
) -> tuple[EscalationService, list[Any]]:
    """The escalation service over ``pool`` with the channels the settings enable; with
    ``metrics``, its units of work report attempts, failovers, acknowledgements and
    heartbeats.

    Returns the service and the HTTP clients to close at shutdown.
    """
    closers: list[Any] = []
    sms: TwilioSms | None = None
    if settings.sms_enabled:
        assert settings.twilio_account_sid is not None and settings.twilio_auth_token is not None
        assert settings.twilio_from is not None
        sms = TwilioSms(
            base_url=settings.twilio_base_url,
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token.get_secret_value(),
            from_number=settings.twilio_from,
            status_callback_url=settings.public_base_url.rstrip("/") + "/twilio/status",
        )
        closers.append(sms)
    webhook: PagerDutyEvents | None = None
    if settings.pagerduty_events_url is not None:
        webhook = PagerDutyEvents(base_url=settings.pagerduty_events_url)
        closers.append(webhook)
    unit_of_work = (
        unit_of_work_factory(pool, fallback_email=settings.fallback_email)
        if metrics is None
        else observed_unit_of_work(pool, metrics, now=clock, fallback_email=settings.fallback_email)
    )
    channels = channel_registry(settings, sms=sms, webhook=webhook)
    outages = OutageWatch(
        store=PostgresOutageStore(pool),
        load_policy=partial(load_policy, unit_of_work),
        channels=channels,
        config=OutageConfig(
            sender_address=settings.smtp_from,
            fallback_email=settings.fallback_email,
            hold_s=settings.group_wait_s,
            settle_s=settings.outage_settle_s,
            technical_care_team_id=settings.technical_care_team_id,
            retry_base_s=settings.retry_base_s,
            retry_cap_s=settings.retry_cap_s,
        ),
        clock=clock,
    )
    service = EscalationService(
        unit_of_work=unit_of_work,
        alerts=PostgresNotifyRepository(pool),
        channels=channels,
        config=EscalationConfig(
            sender_address=settings.smtp_from,
            public_base_url=settings.public_base_url,
            ack_secret=settings.ack_secret.get_secret_value().encode(),
            ack_link_ttl_s=settings.ack_link_ttl_s,
            max_tries_per_channel=settings.max_tries_per_channel,
            retry_base_s=settings.retry_base_s,
            retry_cap_s=settings.retry_cap_s,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
            heartbeat_start_grace_s=settings.heartbeat_start_grace_s,
            technical_care_team_id=settings.technical_care_team_id,
            fallback_email=settings.fallback_email,
            group_wait_s=settings.group_wait_s,
            technical_hold_s=settings.technical_hold_s,
            silence_hold_s=settings.silence_hold_s,
        ),
        clock=clock,
        outages=outages,
        cover_summaries=CoverSummaries(
            store=PostgresCoverSummaries(pool),
            channels=channels,
            config=CoverSummaryConfig(
                sender_address=settings.smtp_from,
                fallback_email=settings.fallback_email,
                retry_base_s=settings.retry_base_s,
                retry_cap_s=settings.retry_cap_s,
            ),
            clock=clock,
        ),
    )
    return service, closers
