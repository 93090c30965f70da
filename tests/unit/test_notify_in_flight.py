"""A page found in flight after notify stopped: the service layer with in-memory fakes.

The store (fake here) records the cut-short attempt ``unknown`` when it claims the page again
(``was_sending``); these tests pin what the service does next: look an SMS up and resolve the
attempt as sent without sending again; send an e-mail again on a new attempt opened before the
send, with the same Message-ID, while its chain runs; leave it unknown, never "not sent", when
the chain was acknowledged or resolved meanwhile.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any, cast
from uuid import uuid4

from schemas.events import Alert, Page
from services.notify.domain.channel_failover import (
    AttemptVerdict,
    Delivered,
    OutcomeUnknown,
)
from services.notify.domain.routing import PagePurpose
from services.notify.service_layer.escalation import (
    EscalationConfig,
    EscalationService,
    sms_reference,
)
from services.notify.service_layer.ports import PageJob, SendOutcome
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from tests.factories import make_alert
from tests.fakes.notify_store import AsItsOwnUnitOfWork

NOW = datetime(2025, 3, 1, 2, 5, tzinfo=UTC)
CLAIMED_BEFORE = NOW - timedelta(seconds=61)


def _alert() -> Alert:
    return make_alert(
        patient_id="P-1",
        at=NOW - timedelta(minutes=5),
        alert_id=uuid4(),
        device_id="thermo-1",
        evidence=(),
    )


def _stale_job(channel: str, *, chain_stopped: bool) -> PageJob:
    """What the store's claim returns for a page left ``sending`` by a stopped run: its attempt
    1 already recorded unknown and counted (``resolving``)."""
    alert = _alert()
    recipient = {"email": "nurse@h.test", "sms": "+15550001111"}[channel]
    return PageJob(
        page=Page(
            page_id=uuid4(),
            alert_id=alert.alert_id,
            dedup_key=alert.dedup_key,
            patient_id=alert.patient_id,
            care_team_id="onc",
            channel=channel,
            recipient=recipient,
            idempotency_key=f"esc:x:alert:0:0:person:nurse#{0 if channel == 'email' else 1}",
            created_at=CLAIMED_BEFORE,
        ),
        alert=alert,
        escalation_id=uuid4(),
        recipient_ref="person:nurse",
        contact_rank=0,
        purpose=PagePurpose.ALERT,
        tries=1,
        was_sending=True,
        has_next_channel=False,
        claimed_at=NOW,
        updated_at=CLAIMED_BEFORE,
        attempt=1,
        resolving=True,
        chain_stopped=chain_stopped,
    )


class Log:
    """One ordered record of what reached the fakes: store writes and provider hand-overs."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []


class MemoryStore(AsItsOwnUnitOfWork):
    """The part of the outbox ``deliver_due`` uses, as its own unit of work."""

    def __init__(self, log: Log, jobs: list[PageJob]) -> None:
        self.log = log
        self.due = list(jobs)
        self.recorded: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]] = []

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]:
        jobs, self.due = self.due[:limit], self.due[limit:]
        return jobs

    async def begin_attempt(self, job: PageJob, *, at: datetime) -> PageJob:
        opened = replace(job, attempt=(job.attempt or 0) + 1, resolving=False)
        self.log.entries.append(("attempt_in_flight", (job.page.page_id, opened.attempt)))
        return opened

    async def record_outcomes(
        self, outcomes: list[tuple[PageJob, SendOutcome, AttemptVerdict, str]], *, at: datetime
    ) -> None:
        self.recorded.extend(outcomes)
        for job, _, _, status in outcomes:
            self.log.entries.append(("recorded", (job.page.page_id, job.attempt, status)))


class MemoryEmail:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.sent: list[EmailMessage] = []

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        self.sent.append(message)
        self.log.entries.append(("email_sent", recipient))
        return SendOutcome(accepted=True, detail="250 OK", reply_code=250)


class MemorySms:
    """Twilio-shaped: ``listed`` holds (to, body, sid) of the messages it accepted."""

    def __init__(self, log: Log, listed: list[tuple[str, str, str]] | None = None) -> None:
        self.log = log
        self.listed = list(listed or [])
        self.lookups = 0

    async def send_sms(self, *, to: str, body: str) -> SendOutcome:
        sid = f"SM{len(self.listed):032d}"
        self.listed.append((to, body, sid))
        self.log.entries.append(("sms_sent", to))
        return SendOutcome(accepted=True, detail="queued", provider_id=sid)

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        self.lookups += 1
        for number, body, sid in self.listed:
            if number == to and f"Ref {reference}" in body:
                return sid
        return None


def _service(store: MemoryStore, email: MemoryEmail, sms: MemorySms) -> EscalationService:
    return EscalationService(
        unit_of_work=cast(UnitOfWorkFactory, store.unit_of_work),
        alerts=cast(Any, None),
        email=email,
        sms=sms,
        webhook=None,
        config=EscalationConfig(
            sender_address="vigil@h.test", public_base_url="http://x", ack_secret=b"s" * 32
        ),
        clock=lambda: NOW,
    )


async def test_email_in_flight_while_its_chain_runs_is_sent_again_on_a_new_attempt() -> None:
    """No lookup exists for e-mail: sent again (a duplicate rather than a miss), on attempt 2,
    opened in flight before the hand-over; attempt 1 stays unknown, not resolved as sent."""
    log = Log()
    job = _stale_job("email", chain_stopped=False)
    store = MemoryStore(log, [job])
    email = MemoryEmail(log)
    service = _service(store, email, MemorySms(log))

    assert await service.deliver_due() == 1

    assert len(email.sent) == 1
    page_id = job.page.page_id
    assert log.entries == [
        ("attempt_in_flight", (page_id, 2)),
        ("email_sent", "nurse@h.test"),
        ("recorded", (page_id, 2, "sent")),
    ]
    [(recorded_job, outcome, verdict, status)] = store.recorded
    assert (recorded_job.attempt, recorded_job.resolving, status) == (2, False, "sent")
    assert isinstance(verdict, Delivered) and outcome.accepted


async def test_resent_email_carries_the_message_id_of_the_first_send() -> None:
    """The same page composed twice (first send, resend after the stop) has one Message-ID, so
    the clinician's mail client folds the two."""
    log = Log()
    first = replace(_stale_job("email", chain_stopped=False), was_sending=False, attempt=1)
    again = replace(first, was_sending=True, resolving=True)
    store = MemoryStore(log, [first])
    email = MemoryEmail(log)
    service = _service(store, email, MemorySms(log))
    await service.deliver_due()
    store.due = [again]
    await service.deliver_due()

    assert len(email.sent) == 2
    ids = {m["Message-ID"] for m in email.sent}
    assert len(ids) == 1 and next(iter(ids))


async def test_email_in_flight_when_its_alert_was_acknowledged_stays_unknown_not_cancelled() -> (
    None
):
    """The chain stopped while the page was in flight: nothing is sent again (the page would ask
    for an action already taken), and the attempt is recorded unknown, never as not sent."""
    log = Log()
    job = _stale_job("email", chain_stopped=True)
    store = MemoryStore(log, [job])
    email = MemoryEmail(log)
    service = _service(store, email, MemorySms(log))

    assert await service.deliver_due() == 1

    assert email.sent == []
    [(recorded_job, outcome, verdict, status)] = store.recorded
    assert status == "unknown"
    assert (recorded_job.attempt, recorded_job.resolving) == (1, True)
    assert isinstance(verdict, OutcomeUnknown)
    assert not outcome.accepted and outcome.unknown and not outcome.permanent
    assert "e-mail has no delivery lookup" in outcome.detail
    assert "not sent again" in outcome.detail


async def test_sms_in_flight_that_twilio_lists_is_resolved_sent_on_the_same_attempt() -> None:
    """Twilio lists the SMS by its reference: attempt 1 becomes sent (no try added), no SMS is
    sent again, whether the chain runs or stopped."""
    for stopped in (False, True):
        log = Log()
        job = _stale_job("sms", chain_stopped=stopped)
        body = f"VIGIL HIGH Fever Ref {sms_reference(job)}"
        sms = MemorySms(log, [(job.page.recipient, body, "SM-taken")])
        store = MemoryStore(log, [job])
        service = _service(store, MemoryEmail(log), sms)

        await service.deliver_due()

        assert sms.lookups == 1
        assert [e for e in log.entries if e[0] in ("sms_sent", "attempt_in_flight")] == []
        [(recorded_job, outcome, verdict, status)] = store.recorded
        assert (recorded_job.attempt, recorded_job.resolving, status) == (1, True, "sent")
        assert outcome.provider_id == "SM-taken"
        assert isinstance(verdict, Delivered)


async def test_sms_in_flight_that_twilio_does_not_list() -> None:
    """Not listed: sent again on a new attempt while the chain runs (positive control of the
    lookup above), left unknown when the chain stopped."""
    log = Log()
    running = _stale_job("sms", chain_stopped=False)
    sms = MemorySms(log, [(running.page.recipient, "another page Ref 0000000000", "SM-other")])
    store = MemoryStore(log, [running])
    await _service(store, MemoryEmail(log), sms).deliver_due()
    assert [e[0] for e in log.entries] == ["attempt_in_flight", "sms_sent", "recorded"]
    assert store.recorded[0][3] == "sent" and store.recorded[0][0].attempt == 2

    log = Log()
    stopped = _stale_job("sms", chain_stopped=True)
    sms = MemorySms(log)
    store = MemoryStore(log, [stopped])
    await _service(store, MemoryEmail(log), sms).deliver_due()
    assert sms.lookups == 1
    assert [e[0] for e in log.entries] == ["recorded"]
    [(_, outcome, verdict, status)] = store.recorded
    assert status == "unknown" and isinstance(verdict, OutcomeUnknown)
    assert "did not confirm it" in outcome.detail
