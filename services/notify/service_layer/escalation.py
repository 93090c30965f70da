"""Escalation use cases: open a chain for an alert, tick it, deliver its pages, acknowledge it.

Owns the order of the steps around the pure engine (``domain.escalation``) and the channel
failover rule (``domain.channel_failover``): record the alert, freeze the policy, fire due steps,
claim due pages, compose them for their channel, send, record the outcome. Timers and page jobs
live in PostgreSQL (the repositories, through a unit of work per step), so a restarted process
continues where the last one stopped.
It never logs a page's content (PHI).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from email.message import EmailMessage
from enum import StrEnum
from typing import Any
from uuid import UUID

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    Evidence,
)
from services.notify.domain.ack_token import (
    AckClaim,
    InvalidAckToken,
    sign_ack_token,
    token_digest,
    verify_ack_token,
)
from services.notify.domain.bundling import Placement, is_bundled, place
from services.notify.domain.channel_failover import (
    AttemptVerdict,
    GiveUp,
    NextChannel,
    OutcomeUnknown,
    after_attempt,
)
from services.notify.domain.cover import PagedTeam, paged_team
from services.notify.domain.early_cycle import (
    EarlyCycleOverride,
    crs_cycle_day,
    crs_note,
    crs_sms_note,
    select_policy,
)
from services.notify.domain.escalation import (
    DEFAULT_FALLBACK_EMAIL,
    DEFAULT_POLICY_REPEATS,
    DEFAULT_POLICY_WAIT_S,
    Acknowledge,
    EscalationEvent,
    EscalationStatus,
    PolicySnapshot,
    Resolve,
    Snooze,
    Tick,
    TimelineEntry,
    Transition,
    Worsen,
    advance,
    opened,
    page_until_acknowledged,
)
from services.notify.domain.heartbeat import (
    PipelineVerdict,
    heartbeat_is_current,
    pipeline_verdict,
)
from services.notify.domain.message import (
    compose_bundle_email,
    compose_bundle_sms,
    compose_digest_email,
    compose_digest_sms,
    compose_page_email,
    compose_sms_text,
    pagerduty_event,
)
from services.notify.domain.monitoring_end import PatientStanding, why_not_paged
from services.notify.domain.quiet_hours import HOLDABLE, held_until
from services.notify.domain.routing import UNASSIGNED_CARE_TEAM, PagePurpose
from services.notify.domain.technical_hold import hold_seconds, technical_hold_until
from services.notify.service_layer.caregivers import caregiver_outbound
from services.notify.service_layer.channels import (
    Channel,
    ChannelRegistry,
    EventProvider,
    OutboundPage,
    SmsProvider,
    not_configured,
    provider_channels,
)
from services.notify.service_layer.cover_summary import CoverSummaries
from services.notify.service_layer.outage import OutageWatch
from services.notify.service_layer.ports import (
    FALLBACK_PREFIX,
    QUIET_DIGEST_KIND,
    TECHNICAL_HOLD_KIND,
    NotifyRepository,
    PageJob,
    PageSender,
    SendOutcome,
)
from services.notify.service_layer.unit_of_work import (
    PendingBundle,
    UnitOfWork,
    UnitOfWorkFactory,
)
from vigil.runtime import log_fields

log = logging.getLogger("vigil.notify.escalation")

# The alert code the rules service gives a pipeline heartbeat (see docs/notify.md).
HEARTBEAT_CODE = "pipeline.heartbeat"
PIPELINE_SILENT_CODE = "pipeline.silent"
# policy_id of the fallback chain (``fallback_chain``), followed by the care team it is filed under.
UNROUTABLE_POLICY_PREFIX = "unroutable:"


@dataclass(frozen=True, slots=True)
class EscalationConfig:
    sender_address: str
    public_base_url: str
    ack_secret: bytes
    ack_link_ttl_s: float = 24 * 3600
    max_tries_per_channel: int = 3
    retry_base_s: float = 2.0
    retry_cap_s: float = 60.0
    # A claimed page not recorded within this time is taken to be cut short by a crash.
    send_lease_s: float = 60.0
    pagerduty_enabled: bool = True
    batch: int = 200
    max_concurrent_sends: int = 32
    heartbeat_timeout_s: float = 120.0
    #: At start-up, how long the page of a heartbeat found silent waits for the pipeline to
    #: come back (``resume_watch``); None: ``heartbeat_timeout_s``.
    heartbeat_start_grace_s: float | None = None
    technical_care_team_id: str | None = None
    fallback_email: str = DEFAULT_FALLBACK_EMAIL
    # A patient's first alert is paged at once and opens a window this long; alerts inside it
    # share one follow-up page at its end. 0 pages every alert on its own (the composition root
    # passes the setting, 5 s by default).
    group_wait_s: float = 0.0
    # The fallback chain of an alert no policy covers: ``fallback_email`` paged every
    # ``fallback_wait_s``, ``1 + fallback_repeats`` times, until acknowledged (the default
    # policy's figures).
    fallback_wait_s: int = DEFAULT_POLICY_WAIT_S
    fallback_repeats: int = DEFAULT_POLICY_REPEATS
    # A technical MEDIUM / LOW / INFO alert is paged only if still open this long after it
    # arrived (``domain.technical_hold``); 0 pages it at once (the composition root passes the
    # setting, 300 s by default).
    technical_hold_s: float = 0.0
    # The hold of a device silence (``domain.technical_hold.hold_seconds``: never shorter than
    # ``technical_hold_s``, off with it; the composition root passes the setting, 2700 s).
    silence_hold_s: float = 0.0


async def load_policy(unit_of_work: UnitOfWorkFactory, care_team_id: str) -> PolicySnapshot | None:
    """The care team's escalation policy as frozen onto a new alert (its default policy when it
    has none but an on-call address), None when it has neither; read without a transaction."""
    async with unit_of_work(transaction=False) as uow:
        return await uow.policies.load_policy(care_team_id)


def fallback_chain(
    care_team_id: str | None, config: EscalationConfig
) -> tuple[str, PolicySnapshot]:
    """The care team and policy an alert no policy covers is escalated under: the configured
    fallback address, paged like a team's default policy until someone acknowledges. An
    unregistered patient's alert is filed under ``UNASSIGNED_CARE_TEAM``."""
    team = care_team_id or UNASSIGNED_CARE_TEAM
    return team, page_until_acknowledged(
        f"{UNROUTABLE_POLICY_PREFIX}{team}",
        config.fallback_email,
        wait_s=config.fallback_wait_s,
        repeats=config.fallback_repeats,
    )


#: The phases that open an escalation when their episode has none.
_OPENING_PHASES = (AlertPhase.START, AlertPhase.ESCALATE)


@dataclass(frozen=True, slots=True)
class _Routing:
    """Whom a new escalation of an alert is opened under (``EscalationService._routing``):
    the patient's standing (None: not registered), the care team and its policy (None when
    none covers the alert: the fallback chain is used), the cover agreement it is paged
    under, if any."""

    standing: PatientStanding | None
    team: str | None
    snapshot: PolicySnapshot | None
    covered: PagedTeam | None


class AckOutcome(StrEnum):
    ACKNOWLEDGED = "acknowledged"
    ALREADY = "already_acknowledged"
    NOT_FOUND = "not_found"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class AckResult:
    outcome: AckOutcome
    escalation_id: UUID | None = None
    detail: str | None = None


class EscalationService:
    def __init__(
        self,
        *,
        unit_of_work: UnitOfWorkFactory,
        alerts: NotifyRepository,
        config: EscalationConfig,
        clock: Callable[[], datetime],
        channels: ChannelRegistry | None = None,
        email: PageSender | None = None,
        sms: SmsProvider | None = None,
        webhook: EventProvider | None = None,
        outages: OutageWatch | None = None,
        cover_summaries: CoverSummaries | None = None,
    ) -> None:
        """``unit_of_work``: a new unit of work over the repositories for each step (one
        transaction, or with ``transaction=False`` none, for a read or a write that stands
        alone). ``channels``: what pages are sent on, by name (``bootstrap`` builds it);
        without it, the channels over the providers given as ``email``, ``sms`` and
        ``webhook``."""
        self._unit_of_work = unit_of_work
        # After a pipeline outage: the outage record, start phases held for their end, the care
        # teams' summaries (service_layer/outage.py); None: none of it (unit tests' fakes).
        self._outages = outages
        # Regional cover's morning summary e-mails (service_layer/cover_summary.py); None: not
        # sent by this instance (unit tests' fakes).
        self._cover_summaries = cover_summaries
        self._alerts = alerts
        self._channels = (
            channels
            if channels is not None
            else provider_channels(email=email, sms=sms, webhook=webhook)
        )
        self._config = config
        self._clock = clock
        self._wakeup = asyncio.Event()
        # Caps open provider connections: a burst of pages must not open hundreds at once.
        self._sending = asyncio.Semaphore(config.max_concurrent_sends)
        # Set when a pending bundle falls due, so the clock loop pages it on time rather than on
        # its next round.
        self._bundle_due = asyncio.Event()
        # Heartbeat sources found silent when this instance started (``resume_watch``): notify
        # was down through the silence, so its page waits until this deadline for heartbeats
        # to come back with the rest of the pipeline (docs/notify.md, "After an outage").
        self._deferred_silence: dict[str, datetime] = {}

    def now(self) -> datetime:
        """The service's clock (injected: a test moves it by hand)."""
        return self._clock()

    # -- alerts in ----------------------------------------------------------------------------

    async def handle_alert(self, alert: Alert) -> bool:
        """Take the alert into its escalation; returns False only for a phase that was recorded
        without paging anyone (see below). Durable before it returns, so the caller may commit
        the alert's Kafka offset.

        Heartbeats are recorded, never paged. A start phase always opens an escalation: under
        its care team's policy (or the team's default policy), or, when no policy covers it (an
        unregistered patient, a team with neither a policy nor an on-call address), under the
        fallback chain (``fallback_chain``). An escalate phase whose episode has no escalation
        opens one the same way: the worsened alert must reach someone. Except for a patient
        discharged by the alert's device time (or, an alert of one of their pumps, whose
        infusion had ended by then; ``domain.monitoring_end``): that start or escalate pages
        nobody and is recorded with its escalation closed at once (``_not_paged``). A continue,
        de-escalate or end phase of an episode without an escalation is only recorded (nobody
        was paged about it, so there is no thread to update and nobody owed an all clear).
        """
        now = self._clock()
        if alert.code == HEARTBEAT_CODE:
            if heartbeat_is_current(
                device_time=alert.device_time,
                now=now,
                timeout_s=self._config.heartbeat_timeout_s,
            ):
                async with self._unit_of_work(transaction=False) as uow:
                    await uow.heartbeats.heartbeat_seen(alert.device_id, alert.device_time)
            return True
        # Every phase is recorded; the record is written beside the first reads, on its own
        # connection, so the first page waits for one of the two rather than for both.
        reads, recorded = await asyncio.gather(
            self._first_reads(alert, now), self._alerts.record_alert(alert), return_exceptions=True
        )
        for outcome in (reads, recorded):
            if isinstance(outcome, BaseException):
                raise outcome
        assert not isinstance(reads, BaseException)
        escalation_id, routing = reads
        if alert.phase is AlertPhase.START or (
            escalation_id is None and alert.phase is AlertPhase.ESCALATE
        ):
            if escalation_id is not None:
                return True
            await self._start(alert, now, routing=routing)
            return True
        if escalation_id is None:
            log.info(
                "alert_recorded_without_escalation",
                extra=log_fields(
                    alert_id=str(alert.alert_id), dedup_key=alert.dedup_key, phase=alert.phase.value
                ),
            )
            return False
        if alert.phase is AlertPhase.END:
            if await self._resolve_in_technical_hold(
                alert.dedup_key, now, ended_at=alert.device_time
            ):
                # A technical condition that ended inside its hold: recorded (alert, timeline),
                # never paged, and so no all clear either.
                log.info(
                    "technical_alert_ended_in_hold",
                    extra=log_fields(alert_id=str(alert.alert_id), dedup_key=alert.dedup_key),
                )
                return True
            # Still held but it lasted the hold by the device's clock: paged now, then cleared.
            await self._release_held(
                alert.dedup_key, now, "ended, open longer than the hold", kind=TECHNICAL_HOLD_KIND
            )
            async with self._unit_of_work(transaction=False) as uow:
                pending = await uow.bundles.pending_bundle_of(alert.dedup_key)
            if pending is not None:
                # The alert ends while still held for its follow-up: page the follow-up now,
                # so an alarm that came and went is still told (then its all-clear follows); a
                # duplicate is preferred to a miss. Sent before the resolve below, which would
                # cancel a page whose every alert has stopped.
                await self._flush_bundles(now, limit=1, only=pending)
                await self.deliver_due()
        if alert.phase is AlertPhase.END:
            await self._apply(escalation_id, Resolve(at=now), at=now)
        elif alert.phase is AlertPhase.ESCALATE:
            # From now on the episode's pages (the escalation notice, the next steps, a bundle
            # that lists it) speak of the worsened alert: its priority and title, not the
            # start's. A de-escalation does not move them back: a repeat page errs high.
            async with self._unit_of_work() as uow:
                await uow.escalations.follow_alert(alert.dedup_key, alert.alert_id)
                await uow.commit()
            if alert.priority not in HOLDABLE:
                # Held by quiet hours while low, now urgent: paged at once, then told it
                # worsened, like any alert already paged. HIGH and MEDIUM are never held.
                await self._release_held(
                    alert.dedup_key, now, f"escalated to {alert.priority.value}"
                )
            # A worsening is not flapping: a technical alert still in its hold is paged now.
            await self._release_held(
                alert.dedup_key,
                now,
                f"escalated to {alert.priority.value}",
                kind=TECHNICAL_HOLD_KIND,
            )
            await self._apply(escalation_id, Worsen(at=now), at=now)
        else:
            # continue / de-escalate: the open thread is updated in the timeline, nobody is paged.
            async with self._unit_of_work(transaction=False) as uow:
                await uow.escalations.note(
                    escalation_id,
                    now,
                    TimelineEntry(
                        "phase", {"phase": alert.phase.value, "alert_id": str(alert.alert_id)}
                    ),
                )
        await self.deliver_due()
        return True

    async def _first_reads(
        self, alert: Alert, now: datetime
    ) -> tuple[UUID | None, _Routing | None]:
        """The episode's escalation and, for a start (or an escalate) that has none, whom it
        is paged under (``_routing``), read on one connection."""
        async with self._unit_of_work(transaction=False) as uow:
            escalation_id = await uow.escalations.escalation_id_for(alert.dedup_key)
            if escalation_id is not None or alert.phase not in _OPENING_PHASES:
                return escalation_id, None
            return None, await self._routing(uow, alert, now)

    async def _routing(self, uow: UnitOfWork, alert: Alert, now: datetime) -> _Routing:
        """The patient's standing and the care team and policy a new escalation of the alert
        is opened under: its team's, or during a cover agreement's hours the covering team's
        (unless that team has neither a policy nor an on-call address); no team or no policy
        when none covers it."""
        standing = await uow.policies.standing_of(alert.patient_id, alert.device_id)
        team = None if standing is None else standing.care_team_id
        snapshot = None
        covered: PagedTeam | None = None
        if standing is not None and standing.cover:
            # Regional cover (``domain.cover``): during an agreement's hours the covering
            # team's on-call is paged; the thresholds that raised the alert stay the covered
            # team's. A covering team with no policy and no on-call address leaves it home.
            paged = paged_team(standing.care_team_id, standing.cover, now)
            if paged.covering:
                snapshot = await uow.policies.load_policy(paged.care_team_id)
                if snapshot is not None:
                    team, covered = paged.care_team_id, paged
                    log.info(
                        "alert_paged_under_cover",
                        extra=log_fields(
                            alert_id=str(alert.alert_id),
                            patient_id=alert.patient_id,
                            care_team_id=team,
                            covered_team_id=paged.covered_team_id,
                            agreement_id=paged.agreement_id,
                            agreement_version=paged.version,
                        ),
                    )
        if snapshot is None and team is not None:
            snapshot = await uow.policies.load_policy(team)
        return _Routing(standing=standing, team=team, snapshot=snapshot, covered=covered)

    async def _start(
        self,
        alert: Alert,
        now: datetime,
        *,
        outage_hold: bool = True,
        routing: _Routing | None = None,
    ) -> None:
        """``routing``: read already (``handle_alert``, which has recorded the alert too);
        None: read here and the alert recorded."""
        covering = await self._start_escalation(
            alert, now, outage_hold=outage_hold, routing=routing
        )
        if covering is None:
            return
        # Regional cover: the escalation's timeline names the agreement it was paged under.
        escalation_id = await self.escalation_id_for(alert.dedup_key)
        if escalation_id is not None:
            async with self._unit_of_work(transaction=False) as uow:
                await uow.escalations.note(
                    escalation_id,
                    now,
                    TimelineEntry(
                        "paged_under_cover",
                        {
                            "care_team_id": covering.care_team_id,
                            "covered_team_id": covering.covered_team_id,
                            "agreement_id": covering.agreement_id,
                            "agreement_version": covering.version,
                            "window_ends": (
                                covering.window_ends.isoformat() if covering.window_ends else None
                            ),
                        },
                    ),
                )

    async def _start_escalation(
        self, alert: Alert, now: datetime, *, outage_hold: bool, routing: _Routing | None
    ) -> PagedTeam | None:
        """Open the alert's escalation under its team's policy, or under the fallback chain
        when no policy covers it; quiet hours and the bundling window apply as for any alert,
        except that quiet hours never hold the fallback chain (it pages no team). A start that
        began inside a pipeline outage just ended may first wait briefly for its end
        (``OutageWatch.hold``; never HIGH, never the fallback chain)."""
        if routing is None:
            async with self._unit_of_work(transaction=False) as uow:
                routing = await self._routing(uow, alert, now)
            await self._alerts.record_alert(alert)
        standing, team, snapshot = routing.standing, routing.team, routing.snapshot
        covered = routing.covered
        team_known = team is not None and snapshot is not None
        stopped = why_not_paged(standing, device_time=alert.device_time, rule_id=alert.rule_id)
        if team is None or snapshot is None:
            reason = (
                f"patient {alert.patient_id} is not registered with a care team"
                if team is None
                else f"care team {team} has neither an escalation policy nor an on-call address"
            )
            team, snapshot = fallback_chain(team, self._config)
            log.error(
                "alert_unroutable",
                extra=log_fields(
                    alert_id=str(alert.alert_id),
                    patient_id=alert.patient_id,
                    care_team_id=team,
                    reason=reason,
                ),
            )
        if stopped is not None:
            await self._not_paged(alert, team, snapshot, now, stopped)
            return covered
        snapshot = await self._early_cycle(alert, team, snapshot)
        if (
            team_known
            and outage_hold
            and self._outages is not None
            and await self._outages.hold(alert, now)
        ):
            return covered
        if team_known and await self._held_for_quiet_hours(alert, team, snapshot, now):
            return covered
        if await self._held_technical(alert, team, snapshot, now):
            return covered
        if self._config.group_wait_s > 0:
            await self._open_in_window(alert, team, snapshot, now)
        else:
            await self._open(alert, team, snapshot, now)
        return covered

    async def _not_paged(
        self, alert: Alert, team: str, snapshot: PolicySnapshot, now: datetime, reason: str
    ) -> None:
        """Record, in one transaction, an alert of a patient discharged (or, from a pump, whose
        infusion ended) by its device time: its escalation closed at once with nobody paged,
        the timeline's ``not_paged`` entry and the audit entry. The rules stop paging from
        those times too, but learn of them only at their next configuration reload."""
        async with self._unit_of_work() as uow:
            escalation_id = await uow.escalations.add_not_paged(
                alert, care_team_id=team, snapshot=snapshot, reason=reason, at=now
            )
            await uow.commit()
        log.info(
            "alert_not_paged",
            extra=log_fields(
                alert_id=str(alert.alert_id),
                escalation_id=None if escalation_id is None else str(escalation_id),
                care_team_id=team,
                reason=reason,
            ),
        )

    async def _early_cycle(
        self, alert: Alert, team: str, snapshot: PolicySnapshot
    ) -> PolicySnapshot:
        """The policy to freeze for an alert in the CRS window (``domain.early_cycle``): the
        team's chain changed by its early-cycle override, or unchanged when it has none; any
        other alert keeps ``snapshot``. The override is read only for an alert in the window.
        A team whose chain is the fallback (no policy, no on-call address) still gets its
        override's shorter wait and extra targets: paging more people sooner is the safe side."""
        day = crs_cycle_day(alert)
        if day is None:
            return snapshot
        override: EarlyCycleOverride | None = None
        if team != UNASSIGNED_CARE_TEAM:
            async with self._unit_of_work(transaction=False) as uow:
                override = await uow.policies.early_cycle_override(team)
        selected = select_policy(snapshot, override, alert)
        log.info(
            "early_cycle_policy",
            extra=log_fields(
                alert_id=str(alert.alert_id),
                care_team_id=team,
                cycle_day=day,
                policy_id=selected.policy_id,
                overridden=override is not None,
            ),
        )
        return selected

    async def _held_for_quiet_hours(
        self, alert: Alert, team: str, snapshot: PolicySnapshot, now: datetime
    ) -> bool:
        """Hold a LOW / INFO alert arriving in its team's quiet hours for their digest; True
        when held. HIGH and MEDIUM return at once, before quiet hours are even read."""
        if alert.priority not in HOLDABLE:
            return False
        async with self._unit_of_work(transaction=False) as uow:
            quiet_hours = await uow.policies.quiet_hours(team)
        until = held_until(alert.priority, quiet_hours, now)
        if until is None:
            return False
        async with self._unit_of_work() as uow:
            escalation_id = await uow.bundles.hold_for_quiet_hours(
                alert, care_team_id=team, snapshot=snapshot, at=now, until=until
            )
            await uow.commit()
        log.info(
            "alert_held_for_quiet_hours",
            extra=log_fields(
                alert_id=str(alert.alert_id),
                escalation_id=None if escalation_id is None else str(escalation_id),
                care_team_id=team,
                until=until.isoformat(),
            ),
        )
        return True

    async def _held_technical(
        self, alert: Alert, team: str, snapshot: PolicySnapshot, now: datetime
    ) -> bool:
        """Hold a technical MEDIUM / LOW / INFO alert for the technical hold (paged only if
        still open at its end); True when held. HIGH and physiological alerts return at once."""
        hold_s = hold_seconds(
            alert.rule_id, self._config.technical_hold_s, self._config.silence_hold_s
        )
        until = technical_hold_until(alert.kind, alert.priority, now, hold_s)
        if until is None:
            return False
        async with self._unit_of_work() as uow:
            escalation_id = await uow.bundles.hold_technical(
                alert, care_team_id=team, snapshot=snapshot, at=now, until=until
            )
            await uow.commit()
        log.info(
            "alert_held_technical",
            extra=log_fields(
                alert_id=str(alert.alert_id),
                escalation_id=None if escalation_id is None else str(escalation_id),
                care_team_id=team,
                until=until.isoformat(),
            ),
        )
        delay = max(0.0, (until - now).total_seconds())
        asyncio.get_running_loop().call_later(delay, self._bundle_due.set)
        return True

    async def _open_in_window(
        self, alert: Alert, team: str, snapshot: PolicySnapshot, now: datetime
    ) -> None:
        """Page the alert at once when its patient has no open window (and open one), or hold
        it for the window's follow-up page; durable before the alert's Kafka offset is
        committed. A held alert wakes the clock loop when the follow-up falls due."""
        group_wait_s = self._config.group_wait_s
        escalation_id: UUID | None = None
        jobs: list[PageJob] = []
        sending: asyncio.Task[None] | None = None
        async with self._sent_after(lambda: sending), self._unit_of_work() as uow:
            # The window this alert opens if no window of its patient is open: opened in the
            # statement that serialises the patient's placements, which reads the patient's
            # window only when it did not open this one.
            opening = place(None, dedup_key=alert.dedup_key, at=now, group_wait_s=group_wait_s)
            window_opened, window, follow_up_id = await uow.bundles.claim_window(
                alert, opening.window
            )
            decision = (
                opening
                if window_opened
                else place(window, dedup_key=alert.dedup_key, at=now, group_wait_s=group_wait_s)
            )
            placement, due_at = decision.placement, decision.due_at
            if placement is Placement.PAGE_NOW:
                # As with bundling off (``_open``), plus the patient's new window.
                transition = advance(snapshot, opened(now), Tick(now=now))
                escalation_id = await uow.escalations.add(
                    alert, care_team_id=team, snapshot=snapshot, state=transition.state, at=now
                )
                if escalation_id is None:
                    placement, due_at = Placement.ALREADY, now
                else:
                    then: tuple[TimelineEntry, ...] = ()
                    if window_opened:
                        closes_at = decision.window.closes_at.isoformat()
                        then = (TimelineEntry("bundle_window_opened", {"closes_at": closes_at}),)
                    jobs = await uow.outbox.add_opened(
                        alert,
                        escalation_id,
                        care_team_id=team,
                        snapshot=snapshot,
                        transition=transition,
                        at=now,
                        claim_until=now + timedelta(seconds=self._config.send_lease_s),
                        then=then,
                    )
            elif placement is Placement.FOLLOW_UP:
                if await uow.escalations.escalation_id_for(alert.dedup_key) is not None:
                    # Another instance opened this alert's escalation first (a redelivery race).
                    placement = Placement.ALREADY
                else:
                    if follow_up_id is None:
                        follow_up_id = await uow.bundles.add_follow_up(
                            alert, care_team_id=team, at=now, due_at=due_at
                        )
                    escalation_id = await uow.bundles.hold(
                        alert,
                        care_team_id=team,
                        snapshot=snapshot,
                        at=now,
                        bundle_id=follow_up_id,
                        due_at=due_at,
                    )
            if placement is Placement.ALREADY:
                # Another instance opened this alert's escalation first (a redelivery race):
                # nothing of it is kept, nor a window it opened (nothing else was written).
                await uow.rollback()
            else:
                await self._commit_opening(uow, jobs)
            if placement is Placement.PAGE_NOW and escalation_id is not None:
                # Claimed for this call, as with bundling off: the first attempt waits for no
                # loop, nor for the connection to go back to the pool.
                sending = asyncio.create_task(self._deliver_batch(jobs))
        if sending is not None and escalation_id is not None:
            self._opened(alert, escalation_id, team, snapshot)
            return
        log.info(
            "alert_bundled",
            extra=log_fields(
                alert_id=str(alert.alert_id), placement=placement.value, due_at=due_at.isoformat()
            ),
        )
        if placement is Placement.FOLLOW_UP:
            delay = max(0.0, (due_at - now).total_seconds())
            asyncio.get_running_loop().call_later(delay, self._bundle_due.set)

    async def _open(
        self, alert: Alert, team: str, snapshot: PolicySnapshot, now: datetime
    ) -> UUID | None:
        """Open the alert's escalation and fire its first step, in one transaction: the pure
        engine decides the step, the escalation and its pages are written together, the pages
        claimed for this call (an attempt in flight each), so the first attempt waits for
        neither the ticker nor the delivery loop. None when the episode has an escalation."""
        transition = advance(snapshot, opened(now), Tick(now=now))
        sending: asyncio.Task[None] | None = None
        async with self._sent_after(lambda: sending), self._unit_of_work() as uow:
            escalation_id = await uow.escalations.add(
                alert, care_team_id=team, snapshot=snapshot, state=transition.state, at=now
            )
            if escalation_id is None:
                return None
            jobs = await uow.outbox.add_opened(
                alert,
                escalation_id,
                care_team_id=team,
                snapshot=snapshot,
                transition=transition,
                at=now,
                claim_until=now + timedelta(seconds=self._config.send_lease_s),
            )
            await self._commit_opening(uow, jobs)
            # Committed: sent while the connection goes back to the pool.
            sending = asyncio.create_task(self._deliver_batch(jobs))
        self._opened(alert, escalation_id, team, snapshot)
        return escalation_id

    @staticmethod
    async def _commit_opening(uow: UnitOfWork, jobs: list[PageJob]) -> None:
        """Commit an escalation opened with its first pages claimed for this call (``jobs``)
        without waiting for the disk: the pages go out at once, and the commit that records
        their outcomes (``_deliver_batch``, always before ``handle_alert`` returns and the
        alert's offset may be committed) waits, which makes this one durable too. A crash of
        notify in between leaves the claim committed (sent again or found ``unknown`` after its
        lease); a crash of the database before the flush loses the escalation and its pages,
        but not the alert: its offset was not committed, so it is delivered again, opened
        again and paged again under the same keys (Message-ID, SMS reference, PagerDuty
        dedup_key), a duplicate like any page sent again. Nothing claimed: an ordinary commit."""
        if jobs:
            await uow.commit(durable=False)
        else:
            await uow.commit()

    @contextlib.asynccontextmanager
    async def _sent_after(
        self, sending: Callable[[], asyncio.Task[None] | None]
    ) -> AsyncIterator[None]:
        """Around a unit of work that may start sending the pages it committed (the task
        ``sending`` returns, started after the commit, so while the unit of work gives its
        connection back): waits for that task on the way out, whatever else happened."""
        try:
            yield
        finally:
            task = sending()
            if task is not None:
                await task

    async def _apply(
        self,
        escalation_id: UUID,
        event: EscalationEvent,
        *,
        at: datetime,
        whole_bundle: bool = False,
    ) -> Transition | None:
        """Run one event through the pure engine under the escalation's row lock, in one
        transaction: lock, decide, save the state, queue the pages its commands ask for.

        With ``whole_bundle`` the event goes to every escalation of the escalation's bundle
        (an acknowledgement from a bundled page acknowledges every alert it listed); the
        transition returned is the named escalation's, None when there is no such escalation.
        An acknowledgement goes into the audit log; acknowledge and resolve queue PagerDuty's
        acknowledge / resolve in the same transaction.
        """
        async with self._unit_of_work() as uow:
            records = await uow.escalations.lock(escalation_id, whole_bundle=whole_bundle)
            if not records:
                return None
            changes = [
                (record, advance(record.snapshot, record.state, event)) for record in records
            ]
            await uow.escalations.save(changes)
            await uow.outbox.add_effects(changes, at=at)
            found = None
            for record, transition in changes:
                if isinstance(event, Acknowledge) and not _ack_repeated(transition):
                    await uow.escalations.record_acknowledged(record, event, at=at)
                if record.escalation_id == escalation_id:
                    found = transition
            if isinstance(event, Acknowledge | Resolve):
                await uow.outbox.sync_upstream([r.escalation_id for r in records], at=at)
            await uow.commit()
        return found

    async def _resolve_in_technical_hold(
        self, dedup_key: str, now: datetime, *, ended_at: datetime | None = None
    ) -> bool:
        """The alert's end arrived while the technical hold still held it: its escalation is
        resolved (nobody was paged, so no all clear), the timeline says why
        (``technical_hold_ended``, paged false) and the hold is closed, in one transaction.
        False when it is not held in a pending technical hold (never held, already paged), or
        when by the device's clock it outlasted the hold (the caller releases and pages it)."""
        async with self._unit_of_work() as uow:
            hold = await uow.bundles.technical_hold_of(dedup_key, ended_at=ended_at)
            if hold is None:
                await uow.commit()
                return False
            records = await uow.escalations.lock_held(dedup_key, hold.bundle_id)
            if records:
                changes = [
                    (record, advance(record.snapshot, record.state, Resolve(at=now)))
                    for record in records
                ]
                await uow.escalations.save(changes)
                await uow.outbox.add_effects(changes, at=now)
                for record in records:
                    await uow.escalations.note(
                        record.escalation_id,
                        now,
                        TimelineEntry(
                            "technical_hold_ended",
                            {
                                "paged": False,
                                "open_s": round((now - hold.opened_at).total_seconds(), 3),
                                "hold_s": round((hold.due_at - hold.opened_at).total_seconds(), 3),
                                "reason": "ended inside the technical hold: not paged",
                            },
                        ),
                    )
            await uow.bundles.close(hold.bundle_id, now)
            await uow.commit()
        return True

    async def _release_held(
        self, dedup_key: str, now: datetime, reason: str, *, kind: str = QUIET_DIGEST_KIND
    ) -> bool:
        """Take a held alert out of its pending quiet-hours digest (or, with ``kind``
        ``technical_hold``, its technical hold) and fire its first step now, in one
        transaction: it became urgent (HIGH and MEDIUM are never held by quiet hours, a
        worsened alert is not flapping). False when it is not held in a pending one."""
        async with self._unit_of_work() as uow:
            released = await uow.bundles.release(dedup_key, now, reason, kind=kind)
            if released is None:
                await uow.commit()
                return False
            bundle_id, records = released
            due = [record for record in records if record.state.due_at == now]
            if due:
                changes = [
                    (record, advance(record.snapshot, record.state, Tick(now=now)))
                    for record in due
                ]
                await uow.escalations.save(changes)
                await uow.outbox.add_effects(changes, at=now)
            if kind != QUIET_DIGEST_KIND:
                # The hold had this one alert: nothing is left for it to page.
                await uow.bundles.close(bundle_id, now)
            await uow.commit()
        return True

    async def _flush_bundles(self, now: datetime, *, limit: int, only: UUID | None = None) -> int:
        """Page the bundles that are due (or bundle ``only``, due or not): one unit of work
        each, the bundle locked. Every held member fires its first step (its own escalation,
        state, acknowledgement and all clear, from the policy frozen when it arrived); a bundle
        of two or more shares its alert pages through an idempotency key on the bundle, so each
        recipient gets one page listing every alert. Returns how many bundles were paged."""
        flushed = 0
        while flushed < limit:
            async with self._unit_of_work() as uow:
                bundle = await uow.bundles.next_due(now, only=only)
                if bundle is None:
                    await uow.commit()
                    return flushed
                if bundle.kind == QUIET_DIGEST_KIND:
                    await self._page_digest(uow, bundle, now)
                else:
                    await self._page_bundle(uow, bundle, now)
                await uow.bundles.close(bundle.bundle_id, now)
                await uow.commit()
                flushed += 1
            if only is not None:
                return flushed
        return flushed

    async def _page_bundle(self, uow: UnitOfWork, bundle: PendingBundle, now: datetime) -> None:
        """A burst's follow-up or a technical hold that ran out: the first step of every held
        escalation nobody acknowledged, resolved or snoozed while it waited; which alerts a
        shared page lists is read when it is sent."""
        released = await uow.bundles.release_all(bundle.bundle_id, now)
        if released:
            changes = [
                (record, advance(record.snapshot, record.state, Tick(now=now)))
                for record in released
            ]
            await uow.escalations.save(changes)
            await uow.outbox.add_effects(changes, at=now)
        if bundle.kind == TECHNICAL_HOLD_KIND:
            for record in released:
                await uow.escalations.note(
                    record.escalation_id,
                    now,
                    TimelineEntry(
                        "technical_hold_ended",
                        {
                            "paged": True,
                            "open_s": round((now - bundle.opened_at).total_seconds(), 3),
                            "reason": "still open when the technical hold ended",
                        },
                    ),
                )
        members = await uow.bundles.members(bundle.bundle_id)
        if is_bundled(tuple(members)):
            bundled = TimelineEntry(
                "bundled",
                {
                    "bundle_id": str(bundle.bundle_id),
                    "dedup_keys": members,
                    "opened_at": bundle.opened_at.isoformat(),
                },
            )
            await uow.escalations.note_all([(r.escalation_id, bundled) for r in released], now)

    async def _page_digest(self, uow: UnitOfWork, digest: PendingBundle, now: datetime) -> None:
        """A quiet-hours digest at the end of the quiet hours: each member nobody acknowledged
        is listed. A held alert still open fires its first step now (its chain runs on from
        here, later steps keyed on the digest so they fold into one page per recipient too);
        one that resolved while held restarts no chain, but whom its first step would page now
        is paged too, so it is still told ("resolved at ..."). Every such page is a
        ``quiet_digest`` page keyed on the digest, so each recipient gets one."""
        released = await uow.bundles.release_all(digest.bundle_id, now)
        resolved = await uow.bundles.resolved_unpaged(digest.bundle_id)
        listed = [record.dedup_key for record in [*released, *resolved]]
        entry = TimelineEntry(
            "quiet_digest",
            {
                "bundle_id": str(digest.bundle_id),
                "dedup_keys": listed,
                "held_since": digest.opened_at.isoformat(),
            },
        )
        if released:
            changes = [
                (record, advance(record.snapshot, record.state, Tick(now=now)))
                for record in released
            ]
            await uow.escalations.save(changes)
            await uow.outbox.add_effects(changes, at=now, alert_purpose=PagePurpose.QUIET_DIGEST)
        await uow.outbox.add_digest(
            digest.bundle_id,
            entries=[(record.escalation_id, entry) for record in [*released, *resolved]],
            # Pure: whom the frozen policy's first step names now. The resolved chain stays
            # resolved; only the digest page is written.
            resolved=[
                (record, advance(record.snapshot, opened(now), Tick(now=now)).commands)
                for record in resolved
            ],
            at=now,
        )

    async def _fire_due(self, now: datetime) -> int:
        """Fire the steps that are due (one batch, one transaction); escalations another ticker
        holds are skipped, not waited for. Returns how many fired."""
        async with self._unit_of_work() as uow:
            records = await uow.escalations.lock_due(now, limit=self._config.batch)
            if records:
                changes = [
                    (record, advance(record.snapshot, record.state, Tick(now=now)))
                    for record in records
                ]
                await uow.escalations.save(changes)
                await uow.outbox.add_effects(changes, at=now)
            await uow.commit()
        return len(records)

    def _opened(
        self, alert: Alert, escalation_id: UUID, team: str, snapshot: PolicySnapshot
    ) -> None:
        log.info(
            "escalation_opened",
            extra=log_fields(
                escalation_id=str(escalation_id),
                alert_id=str(alert.alert_id),
                care_team_id=team,
                policy_id=snapshot.policy_id,
            ),
        )

    # -- acknowledgement and snooze -----------------------------------------------------------

    async def acknowledge(
        self, escalation_id: UUID, *, by: str, via: str, whole_bundle: bool = False
    ) -> AckResult:
        """Acknowledge one alert's escalation; with ``whole_bundle``, every alert of the bundle
        it was paged in (what acknowledging from a bundled page means)."""
        now = self._clock()
        transition = await self._apply(
            escalation_id, Acknowledge(by=by, at=now, via=via), at=now, whole_bundle=whole_bundle
        )
        if transition is None:
            return AckResult(AckOutcome.NOT_FOUND)
        if _ack_repeated(transition):
            return AckResult(AckOutcome.ALREADY, escalation_id, transition.state.acknowledged_by)
        log.info(
            "escalation_acknowledged",
            extra=log_fields(escalation_id=str(escalation_id), by=by, via=via),
        )
        return AckResult(AckOutcome.ACKNOWLEDGED, escalation_id, by)

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        """The escalation of the alert episode ``dedup_key``, if notify opened one."""
        async with self._unit_of_work(transaction=False) as uow:
            return await uow.escalations.escalation_id_for(dedup_key)

    async def resolve(self, escalation_id: UUID, *, at: datetime) -> bool:
        """A person closed the alert (the care-team API's resolve): its chain stops."""
        return await self._apply(escalation_id, Resolve(at=at), at=at) is not None

    def ack_link(self, escalation_id: UUID, recipient: str) -> str:
        claim = AckClaim(
            escalation_id=escalation_id,
            recipient=recipient,
            expires_at=self._clock() + timedelta(seconds=self._config.ack_link_ttl_s),
        )
        token = sign_ack_token(claim, self._config.ack_secret)
        return f"{self._config.public_base_url.rstrip('/')}/ack/{token}"

    def check_token(self, token: str) -> AckClaim:
        return verify_ack_token(token, self._config.ack_secret, now=self._clock())

    async def acknowledge_token(self, token: str) -> AckResult:
        try:
            claim = self.check_token(token)
        except InvalidAckToken as exc:
            return AckResult(AckOutcome.REFUSED, detail=str(exc))
        async with self._unit_of_work(transaction=False) as uow:
            spent = await uow.escalations.spend_token(token_digest(token), self._clock())
        if not spent:
            return AckResult(AckOutcome.REFUSED, claim.escalation_id, "link already used")
        # The link is in a page; when that page listed a bundle, it acknowledges all of it.
        return await self.acknowledge(
            claim.escalation_id, by=claim.recipient, via="link", whole_bundle=True
        )

    async def acknowledge_sms(self, *, sender: str, body: str) -> AckResult:
        """An SMS reply: "1" (or "ack") acknowledges the latest open page sent to that number."""
        if body.strip().lower() not in ("1", "ack", "ok"):
            return AckResult(AckOutcome.REFUSED, detail="reply 1 to acknowledge")
        async with self._unit_of_work(transaction=False) as uow:
            escalation_id = await uow.escalations.open_paged_to("sms", sender)
        if escalation_id is None:
            return AckResult(AckOutcome.NOT_FOUND, detail="no open page for this number")
        async with self._unit_of_work(transaction=False) as uow:
            person = await uow.policies.person_for_address("sms", sender)
        by = f"person:{person}" if person is not None else f"sms:{sender}"
        return await self.acknowledge(escalation_id, by=by, via="sms", whole_bundle=True)

    async def snooze(self, escalation_id: UUID, *, until: datetime, by: str) -> bool:
        now = self._clock()
        transition = await self._apply(escalation_id, Snooze(until=until, at=now, by=by), at=now)
        self._wakeup.set()
        return transition is not None

    # -- the clock ----------------------------------------------------------------------------

    async def tick(self) -> int:
        """Page the bundles and fire the steps that are due now; returns how many moved."""
        self._bundle_due.clear()
        total = await self._flush_bundles(self._clock(), limit=self._config.batch)
        while True:
            fired = await self._fire_due(self._clock())
            total += fired
            if fired < self._config.batch:
                return total

    async def deliver_due(self, *, max_batches: int | None = None) -> int:
        """Send the pages that are due (all, or ``max_batches`` batches); returns how many."""
        total, batches = 0, 0
        while max_batches is None or batches < max_batches:
            batches += 1
            async with self._unit_of_work() as uow:
                jobs = await uow.outbox.claim_pages(
                    self._clock(), limit=self._config.batch, lease_s=self._config.send_lease_s
                )
                await uow.commit()
            if not jobs:
                return total
            await self._deliver_batch(jobs)
            total += len(jobs)
        return total

    async def _deliver_batch(self, jobs: list[PageJob]) -> None:
        if not jobs:
            return
        delivered = await asyncio.gather(*(self._deliver_bounded(job) for job in jobs))
        results = [
            (job, outcome, self._verdict(job, outcome), _status(outcome))
            for job, outcome in delivered
        ]
        async with self._unit_of_work() as uow:
            await uow.outbox.record_outcomes(results, at=self._clock())
            await uow.commit()
        if any(isinstance(verdict, NextChannel | GiveUp) for _, _, verdict, _ in results):
            # The failover page is due now: send it without waiting for the next round.
            await self.deliver_due(max_batches=1)

    async def _deliver_bounded(self, job: PageJob) -> tuple[PageJob, SendOutcome]:
        async with self._sending:
            return await self._deliver(job)

    async def _deliver(self, job: PageJob) -> tuple[PageJob, SendOutcome]:
        """Send one claimed page; returns the job (with the attempt its outcome belongs to) and
        the outcome.

        A page found in flight after a stop (``was_sending``: its last attempt is recorded
        ``unknown`` by the claim) is resolved first: an SMS the provider lists is recorded sent
        on that attempt, nothing is sent again. Otherwise, while its chain runs, it is sent again
        on a new attempt opened in flight first (a duplicate rather than a miss; same Message-ID,
        SMS reference, PagerDuty dedup_key). A page whose chain was acknowledged or resolved
        meanwhile is not sent again: its attempt stays unknown, never "not sent".
        """
        if job.was_sending:
            reconciled = await self._reconcile(job)
            if reconciled is not None:
                return job, reconciled
            if job.chain_stopped:
                return job, _left_unknown(job, self._channels.get(job.page.channel))
            async with self._unit_of_work() as uow:
                job = await uow.outbox.begin_attempt(job, at=self._clock())
                await uow.commit()
        try:
            outcome = await self._send(job)
        except Exception as exc:
            log.exception("page_send_crashed", extra=log_fields(page_id=str(job.page.page_id)))
            outcome = SendOutcome(accepted=False, detail=f"{type(exc).__name__}: {exc}")
        return job, replace(outcome, answered_at=self._clock())

    def _verdict(self, job: PageJob, outcome: SendOutcome) -> AttemptVerdict:
        if outcome.unknown:
            return OutcomeUnknown(outcome.detail)
        return after_attempt(
            accepted=outcome.accepted,
            permanent=outcome.permanent,
            tries=job.tries + 1,
            max_tries=self._config.max_tries_per_channel,
            has_next_channel=job.has_next_channel,
            base_s=self._config.retry_base_s,
            cap_s=self._config.retry_cap_s,
        )

    async def _reconcile(self, job: PageJob) -> SendOutcome | None:
        """A page a stopped run may have sent: find out before sending it again.

        SMS: ask the provider by the reference in the body. E-mail and PagerDuty have no lookup
        (None): the caller sends again while the chain runs, and the stable Message-ID and the
        dedup_key fold the duplicate on the receiving side.
        """
        channel = self._channels.get(job.page.channel)
        if channel is None:
            return None
        since = job.updated_at or job.page.created_at
        try:
            sid = await channel.find_sent(
                to=job.page.recipient, reference=sms_reference(job), since=since
            )
        except Exception as exc:
            log.warning(
                f"{channel.name}_reconcile_failed",
                extra=log_fields(page_id=str(job.page.page_id), error=type(exc).__name__),
            )
            return None
        if sid is None:
            return None
        return SendOutcome(
            accepted=True, detail="reconciled: provider had accepted it", provider_id=sid
        )

    async def _send(self, job: PageJob) -> SendOutcome:
        page = job.page
        channel = self._channels.get(page.channel)
        if channel is None:
            return not_configured(page.channel)
        if job.purpose is PagePurpose.CAREGIVER:
            # A message to the family: its words were decided with it; no acknowledgement link.
            outbound = caregiver_outbound(
                job, sender=self._config.sender_address, reference=sms_reference(job)
            )
            if outbound is None:
                return SendOutcome(
                    accepted=False, detail="caregiver message has no words", refused_for_good=True
                )
            return await channel.send(outbound)
        ack_url = (
            self.ack_link(job.escalation_id, job.recipient_ref)
            if job.purpose in (PagePurpose.ALERT, PagePurpose.ESCALATION, PagePurpose.QUIET_DIGEST)
            else None
        )
        if job.is_digest and job.purpose is not PagePurpose.ALL_CLEAR:
            return await channel.send(self._digest_page(job, ack_url))
        return await channel.send(self._outbound(job, ack_url))

    def _outbound(self, job: PageJob, ack_url: str | None) -> OutboundPage:
        """The page in each channel's form: a bundle page lists its alerts, a page about an
        alert in the CRS window says so, and how its chain differs for it."""
        page = job.page
        bundled = len(job.bundle) > 1
        # A shared page whose other alerts were acknowledged speaks of the one still unanswered.
        alert = job.bundle[0] if len(job.bundle) == 1 else job.alert
        route_detail = _route_detail(job, alert)
        early = job.early_cycle if job.purpose in _CRS_NOTED else None

        def email() -> EmailMessage:
            if bundled:
                return compose_bundle_email(
                    job.bundle,
                    page,
                    sender=self._config.sender_address,
                    composed_at=self._clock(),
                    ack_url=ack_url,
                    route_detail=route_detail,
                    context=job.context,
                )
            return compose_page_email(
                alert,
                page,
                sender=self._config.sender_address,
                composed_at=self._clock(),
                purpose=job.purpose,
                ack_url=ack_url,
                route_detail=route_detail,
                note=None if early is None else crs_note(early),
                context=job.context,
            )

        def text() -> str:
            body = (
                compose_bundle_sms(job.bundle, reference=sms_reference(job), context=job.context)
                if bundled
                else compose_sms_text(
                    alert, job.purpose, reference=sms_reference(job), context=job.context
                )
            )
            if early is not None and not bundled:
                body = f"{body} {crs_sms_note(early)}"
            return body

        def event() -> dict[str, object]:
            # The page's alert is the bundle's first one, so acknowledge and resolve reuse the
            # dedup_key the trigger went out with.
            event = pagerduty_event(
                job.alert,
                job.purpose,
                routing_key=page.recipient,
                dedup_key=job.alert.dedup_key,
                bundle=job.bundle,
                context=job.context,
            )
            payload = event.get("payload")
            if early is not None and not bundled and isinstance(payload, dict):
                details = payload.setdefault("custom_details", {})
                if isinstance(details, dict):
                    details["crs_window"] = crs_note(early)
            return event

        return OutboundPage(recipient=page.recipient, email=email, text=text, event=event)

    def _digest_page(self, job: PageJob, ack_url: str | None) -> OutboundPage:
        """One page listing the alerts quiet hours held (and, for later steps of their chains,
        those still unacknowledged), each resolved one marked "resolved at"."""
        page = job.page
        entries = tuple(zip(job.bundle or (job.alert,), job.resolved_at or (None,), strict=False))

        def email() -> EmailMessage:
            return compose_digest_email(
                entries,
                page,
                sender=self._config.sender_address,
                composed_at=self._clock(),
                ack_url=ack_url,
                route_detail=_route_detail(job, job.alert),
                context=job.context,
            )

        def text() -> str:
            return compose_digest_sms(entries, reference=sms_reference(job), context=job.context)

        def event() -> dict[str, object]:
            return pagerduty_event(
                job.alert,
                job.purpose,
                routing_key=page.recipient,
                dedup_key=job.alert.dedup_key,
                digest=entries,
                context=job.context,
            )

        return OutboundPage(recipient=page.recipient, email=email, text=text, event=event)

    async def sms_status(self, *, message_sid: str, status: str, error_code: str | None) -> bool:
        """Twilio's status callback: a delivered receipt, or a failure that moves to the next
        channel. Intermediate statuses (queued, sending, sent) only confirm what is recorded."""
        now = self._clock()
        async with self._unit_of_work(transaction=False) as uow:
            job = await uow.outbox.job_for_provider_ref(message_sid, now)
        if job is None:
            return False
        if status == "delivered":
            async with self._unit_of_work() as uow:
                await uow.outbox.record_receipt(job, status="delivered", at=now)
                await uow.commit()
        elif status in ("failed", "undelivered"):
            outcome = SendOutcome(
                accepted=False,
                detail=f"twilio {status} (error {error_code})",
                provider_id=message_sid,
                # The carrier gave up on this message: resending the same SMS rarely helps.
                refused_for_good=True,
            )
            async with self._unit_of_work() as uow:
                await uow.outbox.record_outcomes(
                    [(job, outcome, self._verdict(job, outcome), "failed")], at=now
                )
                await uow.commit()
            await self.deliver_due()
        return True

    # -- pipeline self-watch ------------------------------------------------------------------

    async def resume_watch(self) -> list[str]:
        """At start-up, before any alert is consumed: the heartbeat sources that went silent
        while this notify was not running (nor any other: nobody marked them). Each has its
        outage opened at once, from its last heartbeat, and its silence marked, but its page
        waits ``heartbeat_start_grace_s`` (default: the heartbeat timeout) for the heartbeat to
        come back with the rest of the pipeline: back in time, the outage is recorded and
        summarised and nobody is paged about a silence that is already over; still silent,
        the technical on-call is paged, dated from the last heartbeat. A source marked silent
        whose silence was never paged (a restart inside that wait) waits again. Returns the
        deferred sources.

        Without this, the consumer's first current heartbeat could reach the store before the
        first self-watch round, and an outage that notify itself was down through would go
        unrecorded."""
        now = self._clock()
        grace_s = self._config.heartbeat_start_grace_s
        if grace_s is None:
            grace_s = self._config.heartbeat_timeout_s
        deadline = now + timedelta(seconds=grace_s)
        deferred: list[str] = []
        async with self._unit_of_work(transaction=False) as uow:
            sources = await uow.heartbeats.heartbeats()
        for source, last_seen, silent_since in sources:
            verdict = pipeline_verdict(
                last_seen_at=last_seen,
                silent_since=silent_since,
                now=now,
                timeout_s=self._config.heartbeat_timeout_s,
            )
            if verdict is PipelineVerdict.WENT_SILENT:
                if self._outages is not None:
                    await self._outages.went_silent(source, last_seen, now)
                async with self._unit_of_work(transaction=False) as uow:
                    await uow.heartbeats.mark_silent(source, last_seen)
            elif verdict is PipelineVerdict.STILL_SILENT and silent_since is not None:
                key = silence_dedup_key(source, silent_since)
                if await self.escalation_id_for(key) is not None:
                    continue  # paged before this start: its escalation goes on
            else:
                continue
            self._deferred_silence[source] = deadline
            deferred.append(source)
            log.warning(
                "pipeline_silent_at_start",
                extra=log_fields(source=source, last_seen=last_seen.isoformat()),
            )
        return deferred

    async def check_heartbeat(self) -> list[tuple[str, PipelineVerdict]]:
        now = self._clock()
        verdicts: list[tuple[str, PipelineVerdict]] = []
        async with self._unit_of_work(transaction=False) as uow:
            sources = await uow.heartbeats.heartbeats()
        for source, last_seen, silent_since in sources:
            verdict = pipeline_verdict(
                last_seen_at=last_seen,
                silent_since=silent_since,
                now=now,
                timeout_s=self._config.heartbeat_timeout_s,
            )
            verdicts.append((source, verdict))
            if verdict is PipelineVerdict.WENT_SILENT:
                await self._page_silence(source, last_seen, now)
            elif verdict is PipelineVerdict.STILL_SILENT and silent_since is not None:
                due = self._deferred_silence.get(source)
                if due is not None and now >= due:
                    # Silent since before this start, and not back within the wait: page it.
                    del self._deferred_silence[source]
                    await self._page_silence(source, silent_since, now)
            elif verdict is PipelineVerdict.RECOVERED and silent_since is not None:
                self._deferred_silence.pop(source, None)
                await self._clear_silence(source, last_seen, silent_since, now)
        return verdicts

    async def _page_silence(self, source: str, last_seen: datetime, now: datetime) -> None:
        alert = silence_alert(
            source, last_seen, now, AlertPhase.START, self._config.heartbeat_timeout_s
        )
        await self._alerts.record_alert(alert)
        team = self._config.technical_care_team_id
        snapshot = None if team is None else await load_policy(self._unit_of_work, team)
        if snapshot is None:
            # No technical policy: the team's on-call address (or the fallback address), paged
            # until acknowledged like any unroutable alert, never once and then silence.
            snapshot = page_until_acknowledged(
                "technical-fallback",
                "",
                wait_s=self._config.fallback_wait_s,
                repeats=self._config.fallback_repeats,
            )
        # mark first: a crash after it re-pages nothing, a crash before it re-pages once
        # (the escalation's dedup key makes the second open a no-op).
        await self._open(alert, team or "technical", snapshot, now)
        if self._outages is not None:
            await self._outages.went_silent(source, last_seen, now)
        async with self._unit_of_work(transaction=False) as uow:
            await uow.heartbeats.mark_silent(source, alert.device_time)
        log.error("pipeline_silent", extra=log_fields(source=source))

    async def _clear_silence(
        self, source: str, last_seen: datetime, silent_since: datetime, now: datetime
    ) -> None:
        alert = silence_alert(
            source, silent_since, now, AlertPhase.END, self._config.heartbeat_timeout_s
        )
        escalation_id = await self.escalation_id_for(alert.dedup_key)
        if escalation_id is not None:
            await self._alerts.record_alert(alert)
            await self._apply(escalation_id, Resolve(at=now), at=now)
            await self.deliver_due()
        if self._outages is not None:
            # Recorded before the silence is cleared: a crash between records it again (a
            # no-op), never not at all.
            await self._outages.recovered(source, silent_since, last_seen, now)
        async with self._unit_of_work(transaction=False) as uow:
            await uow.heartbeats.mark_silent(source, None)
        log.info("pipeline_recovered", extra=log_fields(source=source))

    # -- the loop -----------------------------------------------------------------------------

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self, stop: asyncio.Event, *, interval_s: float = 1.0) -> None:
        """Tick and watch the heartbeat, and deliver pages, until ``stop``.

        Two loops, so a slow channel never holds the clock back: a step falls due on time even
        while the pages of earlier steps are still being sent.
        """
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._loop(stop, interval_s, self._clock_round, self._bundle_due))
            loops.create_task(self._loop(stop, interval_s, self._delivery_round, self._wakeup))

    async def _clock_round(self) -> bool:
        if await self.tick():
            self._wakeup.set()  # new pages are queued: wake the delivery loop
        await self.check_heartbeat()
        await self.outage_round()
        # Last, and on its own: a failing hand-back never holds the heartbeat or outages back.
        try:
            if await self.hand_back_round():
                self._wakeup.set()
        except Exception:
            log.exception("hand_back_round_failed")
        # After the hand-back, so the summary can tell what was handed back.
        try:
            await self.cover_summary_round()
        except Exception:
            log.exception("cover_summary_round_failed")
        return False

    async def hand_back_round(self) -> int:
        """Regional cover's hand-back (``domain.cover``): an escalation filed under a covering
        team whose cover of the patient's team has ended (the window closed, or the agreement
        was revoked) goes back to the patient's team. Unacknowledged, it is filed under the
        team and frozen with its policy, which pages from its first step now; acknowledged, it
        stays with whoever acknowledged it. Either way the timeline's ``handed_back`` entry
        says from and to whom. Returns how many were handed back."""
        now = self._clock()
        async with self._unit_of_work(transaction=False) as uow:
            candidates = await uow.escalations.under_cover()
        handed = 0
        for escalation_id, patient_id, covering in candidates:
            try:
                handed += await self._hand_back(escalation_id, patient_id, covering, now)
            except Exception:
                # One escalation that cannot be handed back holds none of the others back.
                log.exception(
                    "hand_back_failed", extra=log_fields(escalation_id=str(escalation_id))
                )
        return handed

    async def cover_summary_round(self) -> int:
        """Regional cover's morning summary: each window of cover that has ended is e-mailed to
        the covered team once (``service_layer/cover_summary.py``); how many were sent."""
        if self._cover_summaries is None:
            return 0
        return await self._cover_summaries.round()

    async def _hand_back(
        self, escalation_id: UUID, patient_id: str, covering: str, now: datetime
    ) -> int:
        """Hand one escalation back if its cover has ended (``hand_back_round``); 1 if it was."""
        async with self._unit_of_work(transaction=False) as uow:
            standing = await uow.policies.standing_of(patient_id, "")
        if standing is None:
            return 0
        if paged_team(standing.care_team_id, standing.cover, now).care_team_id == covering:
            return 0  # still covered
        home = standing.care_team_id
        snapshot = await load_policy(self._unit_of_work, home)
        if snapshot is None:
            home, snapshot = fallback_chain(home, self._config)
        async with self._unit_of_work() as uow:
            records = await uow.escalations.lock(escalation_id)
            if not records or records[0].state.status is EscalationStatus.RESOLVED:
                await uow.commit()
                return 0
            record = records[0]
            repaged = record.state.status is not EscalationStatus.ACKNOWLEDGED
            if repaged:
                await uow.escalations.refile(escalation_id, care_team_id=home, snapshot=snapshot)
                refiled = replace(record, care_team_id=home, snapshot=snapshot)
                changes = [(refiled, advance(snapshot, opened(now), Tick(now=now)))]
                await uow.escalations.save(changes)
                await uow.outbox.add_effects(changes, at=now)
            await uow.escalations.note(
                escalation_id,
                now,
                TimelineEntry(
                    "handed_back",
                    {"from_team": covering, "to_team": home, "repaged": repaged}
                    if repaged
                    else {
                        "from_team": covering,
                        "to_team": home,
                        "repaged": False,
                        "acknowledged_by": record.state.acknowledged_by,
                    },
                ),
            )
            await uow.commit()
        log.info(
            "escalation_handed_back",
            extra=log_fields(
                escalation_id=str(escalation_id),
                patient_id=patient_id,
                from_team=covering,
                care_team_id=home,
                repaged=repaged,
            ),
        )
        return 1

    async def outage_round(self) -> None:
        """Page the start phases held after an outage that are still open when their wait is
        over, fold those that ended, and send the care teams' outage summaries that are due."""
        if self._outages is None:
            return
        await self._outages.round(self._release_after_outage)

    async def _release_after_outage(self, alert: Alert, now: datetime) -> None:
        if await self.escalation_id_for(alert.dedup_key) is None:
            await self._start(alert, now, outage_hold=False)

    async def _delivery_round(self) -> bool:
        """One batch; True when it was full, so the loop goes on without waiting."""
        return await self.deliver_due(max_batches=1) >= self._config.batch

    async def _loop(
        self,
        stop: asyncio.Event,
        interval_s: float,
        round_: Callable[[], Awaitable[bool]],
        wakeup: asyncio.Event,
    ) -> None:
        while not stop.is_set():
            try:
                if await round_():
                    continue  # more is due right now; stop is checked between rounds
            except Exception:
                # The database may be restarting; the timers are in it, so nothing is lost by
                # trying again on the next round.
                log.exception("escalation_round_failed")
            try:
                async with asyncio.timeout(interval_s):
                    await _first(stop.wait(), wakeup.wait())
            except TimeoutError:
                pass
            wakeup.clear()


async def _first(*awaitables: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


#: The pages that carry the CRS-window note: the alert's own pages and its escalation notice.
_CRS_NOTED = frozenset({PagePurpose.ALERT, PagePurpose.ESCALATION})


def _ack_repeated(transition: Transition) -> bool:
    """The acknowledgement found the escalation already acknowledged."""
    return any(entry.kind == "ack_repeated" for entry in transition.timeline)


def _status(outcome: SendOutcome) -> str:
    """The delivery log's status for an attempt's outcome."""
    if outcome.accepted:
        return "sent"
    return "unknown" if outcome.unknown else "failed"


def _left_unknown(job: PageJob, channel: Channel | None) -> SendOutcome:
    """The outcome of a page found in flight after a stop whose chain stopped meanwhile, when
    nothing can tell whether the provider took it: unknown, and not sent again."""
    looked_up = (
        f"no {job.page.channel} channel is configured to look it up"
        if channel is None
        else channel.lookup_note
    )
    return SendOutcome(
        accepted=False,
        unknown=True,
        detail=(
            f"outcome unknown ({looked_up}); not sent again: the alert was acknowledged "
            "or resolved before the outcome was known"
        ),
    )


def _route_detail(job: PageJob, alert: Alert) -> str | None:
    """Why a page went to a fallback address rather than to the care team, None when it did not."""
    if job.page.care_team_id == UNASSIGNED_CARE_TEAM:
        return f"patient {alert.patient_id} is not registered with a care team"
    if job.recipient_ref.startswith(FALLBACK_PREFIX):
        return "the escalation could not reach anyone else"
    return None


def sms_reference(job: PageJob) -> str:
    """A short reference written into the SMS, unique per page."""
    return job.page.page_id.hex[:10].upper()


def silence_dedup_key(source: str, since: datetime) -> str:
    """One episode of silence of ``source``: the same for its start and its all clear."""
    return f"pipeline:silent:{source}:{int(since.timestamp())}"


def silence_alert(
    source: str, since: datetime, now: datetime, phase: AlertPhase, timeout_s: float
) -> Alert:
    """The alert notify raises itself when the heartbeat from ``source`` stops arriving."""
    dedup_key = silence_dedup_key(source, since)
    return Alert(
        alert_id=uuid.uuid5(uuid.NAMESPACE_URL, f"urn:vigil:alert:{dedup_key}:{phase.value}"),
        dedup_key=dedup_key,
        patient_id="pipeline",
        device_id=source,
        kind=AlertKind.TECHNICAL,
        code=PIPELINE_SILENT_CODE,
        priority=AlertPriority.HIGH,
        phase=phase,
        state=AlertState.ACTIVE if phase is AlertPhase.START else AlertState.INACTIVE,
        title=f"Pipeline silent: no heartbeat from {source} for over {int(timeout_s)} s",
        device_time=since,
        ingest_time=now,
        evidence=(
            Evidence(
                name="heartbeat_age_s",
                value=(now - since).total_seconds(),
                unit="s",
                limit=timeout_s,
                comparator=">",
                device_time=since,
            ),
        ),
        rule_id="notify.heartbeat",
        rule_version="1",
    )
