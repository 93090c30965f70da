"""Channels behind one protocol: the registry by name, the three providers' thin channels, and
EscalationService / OutageWatch dispatching through the registry (fake channels here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any, cast
from uuid import uuid4

import pytest

from schemas.events import Alert, Page
from services.notify.adapters.outage_store import SummaryPage
from services.notify.domain.message import compose_sms_text
from services.notify.domain.routing import PagePurpose
from services.notify.service_layer.channels import (
    ChannelRegistry,
    EmailChannel,
    OutboundPage,
    PagerDutyChannel,
    SmsChannel,
    provider_channels,
)
from services.notify.service_layer.escalation import (
    EscalationConfig,
    EscalationService,
    sms_reference,
)
from services.notify.service_layer.outage import OutageConfig, OutageWatch
from services.notify.service_layer.ports import PageJob, SendOutcome
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from tests.factories import make_alert
from tests.fakes.notify_store import AsItsOwnUnitOfWork

NOW = datetime(2026, 3, 1, 2, 5, tzinfo=UTC)


class FakeChannel:
    """Records what it is handed; answers ``outcome``; ``listed`` is its provider's lookup."""

    def __init__(self, name: str, outcome: SendOutcome | None = None) -> None:
        self.name = name
        self.lookup_note = f"{name} listed nothing"
        self.outcome = outcome or SendOutcome(accepted=True, detail="taken")
        self.sent: list[tuple[str, str]] = []
        self.listed: dict[str, str] = {}

    async def send(self, page: OutboundPage) -> SendOutcome:
        self.sent.append((page.recipient, page.text()))
        return self.outcome

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return self.listed.get(reference)


class Store(AsItsOwnUnitOfWork):
    """The part of the outbox ``deliver_due`` uses, as its own unit of work."""

    def __init__(self, jobs: list[PageJob]) -> None:
        self.due = list(jobs)
        self.recorded: list[tuple[PageJob, SendOutcome, str]] = []

    async def claim_pages(self, now: datetime, *, limit: int, lease_s: float) -> list[PageJob]:
        jobs, self.due = self.due[:limit], self.due[limit:]
        return jobs

    async def begin_attempt(self, job: PageJob, *, at: datetime) -> PageJob:
        return job

    async def record_outcomes(self, outcomes: list[Any], *, at: datetime) -> None:
        self.recorded.extend((job, outcome, status) for job, outcome, _, status in outcomes)


def _alert() -> Alert:
    return make_alert(
        patient_id="P-1",
        at=NOW - timedelta(minutes=5),
        alert_id=uuid4(),
        device_id="thermo-1",
        evidence=(),
    )


def _job(
    channel: str, recipient: str, *, was_sending: bool = False, chain_stopped: bool = False
) -> PageJob:
    alert = _alert()
    return PageJob(
        page=Page(
            page_id=uuid4(),
            alert_id=alert.alert_id,
            dedup_key=alert.dedup_key,
            patient_id=alert.patient_id,
            care_team_id="onc",
            channel=cast(Any, channel),
            recipient=recipient,
            idempotency_key="esc:x:alert:0:0:person:nurse#0",
            created_at=NOW - timedelta(seconds=61),
        ),
        alert=alert,
        escalation_id=uuid4(),
        recipient_ref="person:nurse",
        contact_rank=0,
        purpose=PagePurpose.ALERT,
        tries=1 if was_sending else 0,
        was_sending=was_sending,
        has_next_channel=False,
        claimed_at=NOW,
        updated_at=NOW - timedelta(seconds=61),
        attempt=1,
        resolving=was_sending,
        chain_stopped=chain_stopped,
    )


def _service(
    store: Store, channels: ChannelRegistry, clock: Callable[[], datetime] = lambda: NOW
) -> EscalationService:
    return EscalationService(
        unit_of_work=cast(UnitOfWorkFactory, store.unit_of_work),
        alerts=cast(Any, None),
        channels=channels,
        config=EscalationConfig(
            sender_address="vigil@h.test", public_base_url="http://x", ack_secret=b"s" * 32
        ),
        clock=clock,
    )


def test_registry_finds_channels_by_name_and_refuses_a_name_twice() -> None:
    email, sms = FakeChannel("email"), FakeChannel("sms")
    registry = ChannelRegistry([email, sms])
    assert registry["sms"] is sms and registry.get("webhook") is None
    assert sorted(registry) == ["email", "sms"] and len(registry) == 2
    with pytest.raises(ValueError, match="registered twice"):
        ChannelRegistry([email, FakeChannel("email")])


async def test_service_sends_through_the_channel_registered_under_the_page_channel() -> None:
    """An SMS page goes to whatever channel is registered as ``sms``, with the SMS text; the
    e-mail channel is not touched."""
    job = _job("sms", "+15550001111")
    store = Store([job])
    email, sms = FakeChannel("email"), FakeChannel("sms")

    assert await _service(store, ChannelRegistry([email, sms])).deliver_due() == 1

    expected = compose_sms_text(
        job.alert, PagePurpose.ALERT, reference=sms_reference(job), context=job.context
    )
    assert sms.sent == [("+15550001111", expected)]
    assert email.sent == []
    assert [(j.page.page_id, status) for j, _, status in store.recorded] == [
        (job.page.page_id, "sent")
    ]


async def test_a_page_for_a_channel_not_registered_is_refused_for_good() -> None:
    job = _job("webhook", "routing-key")
    store = Store([job])

    await _service(store, ChannelRegistry([FakeChannel("email")])).deliver_due()

    [(_, outcome, status)] = store.recorded
    assert status == "failed" and outcome.permanent
    assert outcome.detail == "webhook channel not configured"


async def test_page_in_flight_after_a_stop_is_looked_up_through_its_channel() -> None:
    """The channel's lookup finds the page the provider took before the stop: resolved as sent
    with the provider's id, not sent again."""
    job = _job("sms", "+15550001111", was_sending=True)
    store = Store([job])
    sms = FakeChannel("sms")
    sms.listed[sms_reference(job)] = "SM0001"

    await _service(store, ChannelRegistry([FakeChannel("email"), sms])).deliver_due()

    assert sms.sent == []
    [(_, outcome, status)] = store.recorded
    assert status == "sent" and outcome.provider_id == "SM0001"


async def test_page_in_flight_whose_chain_stopped_stays_unknown_in_its_channel_words() -> None:
    """Nothing found by the lookup and the alert acknowledged meanwhile: not sent again, unknown,
    with why in the channel's own words."""
    job = _job("sms", "+15550001111", was_sending=True, chain_stopped=True)
    store = Store([job])
    sms = FakeChannel("sms")

    await _service(store, ChannelRegistry([FakeChannel("email"), sms])).deliver_due()

    assert sms.sent == []
    [(_, outcome, status)] = store.recorded
    assert status == "unknown" and outcome.unknown
    assert outcome.detail.startswith("outcome unknown (sms listed nothing); not sent again")
    # The providers' channels keep the delivery log's words.
    p = Providers()
    assert [c.lookup_note for c in provider_channels(email=p, sms=p, webhook=p).values()] == [
        "e-mail has no delivery lookup",
        "the provider's message list did not confirm it",
        "PagerDuty has no lookup of an event",
    ]


class Providers:
    """The three providers' ports, recording what they are handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str]] = []

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        self.calls.append(("email", message["Subject"], recipient))
        return SendOutcome(accepted=True, detail="250 OK", reply_code=250)

    async def send_sms(self, *, to: str, body: str) -> SendOutcome:
        self.calls.append(("sms", body, to))
        return SendOutcome(accepted=True, detail="201 queued")

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return f"SM-{reference}"

    async def enqueue(self, event: dict[str, object]) -> SendOutcome:
        self.calls.append(("webhook", event["event_action"], str(event["routing_key"])))
        return SendOutcome(accepted=True, detail="202 success")


async def test_provider_channels_compose_only_the_form_they_send() -> None:
    providers = Providers()
    composed: list[str] = []

    def form(kind: str, value: Any) -> Any:
        def compose() -> Any:
            composed.append(kind)
            return value

        return compose

    message = EmailMessage()
    message["Subject"] = "[VIGIL HIGH] fever"
    channels = provider_channels(email=providers, sms=providers, webhook=providers)
    assert isinstance(channels["email"], EmailChannel)
    assert isinstance(channels["sms"], SmsChannel)
    assert isinstance(channels["webhook"], PagerDutyChannel)
    for name, to in (("email", "nurse@h.test"), ("sms", "+1555"), ("webhook", "rk")):
        page = OutboundPage(
            recipient=to,
            email=form("email", message),
            text=form("sms", "VIGIL HIGH fever"),
            event=form("webhook", {"event_action": "trigger", "routing_key": to}),
        )
        assert (await channels[name].send(page)).accepted
    assert composed == ["email", "sms", "webhook"]
    assert providers.calls == [
        ("email", "[VIGIL HIGH] fever", "nurse@h.test"),
        ("sms", "VIGIL HIGH fever", "+1555"),
        ("webhook", "trigger", "rk"),
    ]
    # Only SMS has a lookup.
    lookups = [
        await channels[n].find_sent(to="x", reference="R1", since=NOW)
        for n in ("email", "sms", "webhook")
    ]
    assert lookups == [None, "SM-R1", None]
    assert set(provider_channels(email=providers, sms=None, webhook=None)) == {"email"}


async def test_outage_summary_goes_through_the_registry() -> None:
    """A team's summary is sent on the channel registered under its page's channel, and a
    person's contact method is used only when a channel is registered for it."""
    sms = FakeChannel("sms")
    watch = OutageWatch(
        store=cast(Any, None),
        load_policy=cast(Any, None),
        channels=ChannelRegistry([FakeChannel("email"), sms]),
        config=OutageConfig(sender_address="vigil@h.test", fallback_email="fb@h.test"),
        clock=lambda: NOW,
    )
    page = SummaryPage(
        page_id=uuid4(),
        outage_id=uuid4(),
        care_team_id="onc",
        channel="sms",
        recipient="+1555",
        subject="Vigil outage summary",
        body="body",
        short_text="VIGIL outage 02:00-02:05: nothing missed",
        tries=0,
    )
    assert (await watch._send(page, NOW)).accepted
    assert sms.sent == [("+1555", "VIGIL outage 02:00-02:05: nothing missed")]
    assert watch._can_send("sms") and not watch._can_send("webhook")
    refused = await watch._send(replace(page, channel="webhook"), NOW)
    assert refused.permanent and refused.detail == "webhook channel not configured"


async def test_each_attempt_takes_the_time_its_provider_answered() -> None:
    """An attempt's time is when its provider answered, not when its batch was recorded: the
    SMS provider answers 2 s in, the e-mail server 7 s in, the batch is recorded 9 s in."""
    clock = [NOW]

    class SlowChannel(FakeChannel):
        def __init__(self, name: str, answers_after_s: float) -> None:
            super().__init__(name)
            self.answers_after_s = answers_after_s

        async def send(self, page: OutboundPage) -> SendOutcome:
            clock[0] = NOW + timedelta(seconds=self.answers_after_s)
            return await super().send(page)

    class Recording(Store):
        recorded_at: datetime | None = None
        units = 0

        async def record_outcomes(self, outcomes: list[Any], *, at: datetime) -> None:
            self.recorded_at = at
            await super().record_outcomes(outcomes, at=at)

        def unit_of_work(self, *, transaction: bool = True) -> Any:
            self.units += 1
            if self.units == 2:  # the claim's, then the outcomes'
                clock[0] = NOW + timedelta(seconds=9)
            return super().unit_of_work(transaction=transaction)

    sms_job, email_job = _job("sms", "+15550100"), _job("email", "nurse@h.test")
    store = Recording([sms_job, email_job])
    service = _service(
        store, ChannelRegistry([SlowChannel("sms", 2), SlowChannel("email", 7)]), lambda: clock[0]
    )
    assert await service.deliver_due() == 2

    answered = {job.page.channel: outcome.answered_at for job, outcome, _ in store.recorded}
    assert answered == {
        "sms": NOW + timedelta(seconds=2),
        "email": NOW + timedelta(seconds=7),
    }
    assert store.recorded_at == NOW + timedelta(seconds=9)
