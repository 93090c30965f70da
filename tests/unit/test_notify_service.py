"""EscalationService on the in-memory unit of work (tests/fakes/notify_store.py) and fake
channels: no PostgreSQL. An alert starts and pages the first tier; an acknowledgement stops
the chain; the all clear goes only to those paged, on the channel that reached them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast
from uuid import UUID

from schemas.events import AlertPhase
from services.notify.domain.escalation import (
    EscalationStatus,
    PolicySnapshot,
    StepSnapshot,
    Target,
)
from services.notify.domain.routing import PagePurpose
from services.notify.service_layer.channels import ChannelRegistry, OutboundPage
from services.notify.service_layer.escalation import EscalationConfig, EscalationService
from services.notify.service_layer.ports import SendOutcome
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from tests.factories import make_alert
from tests.fakes.notify_store import FakeUnitOfWork, MemoryAlerts, MemoryNotifyDatabase

T0 = datetime(2026, 3, 1, 14, 0, tzinfo=UTC)
POLICY = PolicySnapshot(
    policy_id="onc-day",
    steps=(
        StepSnapshot(targets=(Target("person", "nurse"), Target("person", "fellow")), wait_s=300),
        StepSnapshot(targets=(Target("person", "attending"),), wait_s=600),
    ),
    repeat_count=1,
)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


class Channel:
    """A channel that records (address, subject or text) and refuses the addresses in
    ``refusing`` for good."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lookup_note = "no lookup"
        self.sent: list[tuple[str, str]] = []
        self.refusing: set[str] = set()

    async def send(self, page: OutboundPage) -> SendOutcome:
        if page.recipient in self.refusing:
            return SendOutcome(accepted=False, detail="refused", refused_for_good=True)
        what = str(page.email()["Subject"]) if self.name == "email" else page.text()
        self.sent.append((page.recipient, what))
        return SendOutcome(accepted=True, detail="taken")

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return None


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.store = MemoryNotifyDatabase(fallback_email="fallback@h.test")
        self.store.add_team("onc", POLICY, oncall_email="oncall@h.test")
        self.store.add_patient("P-1", "onc")
        self.store.add_person("nurse", ("sms", "+15550001"), ("email", "nurse@h.test"))
        self.store.add_person("fellow", ("email", "fellow@h.test"))
        self.store.add_person("attending", ("email", "attending@h.test"))
        self.email, self.sms = Channel("email"), Channel("sms")
        self.service = EscalationService(
            unit_of_work=cast(UnitOfWorkFactory, self.unit_of_work),
            alerts=MemoryAlerts(),
            channels=ChannelRegistry([self.email, self.sms]),
            config=EscalationConfig(
                sender_address="vigil@h.test",
                public_base_url="http://vigil.test",
                ack_secret=b"s" * 32,
            ),
            clock=self.clock,
        )

    def unit_of_work(self, *, transaction: bool = True) -> FakeUnitOfWork:
        """The database's unit of work, looked up at each call (a test may swap it)."""
        return self.store.unit_of_work(transaction=transaction)

    async def start(self) -> UUID:
        assert await self.service.handle_alert(make_alert(patient_id="P-1", at=self.clock()))
        escalation_id = await self.service.escalation_id_for("P-1:FEVER")
        assert escalation_id is not None
        return escalation_id

    async def end(self) -> None:
        alert = make_alert(patient_id="P-1", phase=AlertPhase.END, at=self.clock())
        assert await self.service.handle_alert(alert)

    async def next_step(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await self.service.tick()
        await self.service.deliver_due()

    def addresses(self) -> list[str]:
        return [to for to, _ in self.sms.sent + self.email.sent]


async def test_alert_start_pages_the_first_tier_on_each_first_contact_method() -> None:
    world = World()
    escalation_id = await world.start()

    assert [to for to, _ in world.sms.sent] == ["+15550001"]
    assert [to for to, _ in world.email.sent] == ["fellow@h.test"]
    assert world.email.sent[0][1].startswith("[VIGIL HIGH]")
    state = world.store.escalations[escalation_id].state
    assert state.status is EscalationStatus.OPEN
    assert state.paged == ("person:fellow", "person:nurse")
    assert state.due_at == T0 + timedelta(seconds=300)
    assert {p.status for p in world.store.pages} == {"sent"}

    # Unanswered: the second tier after the first step's wait.
    await world.next_step(300)
    assert world.addresses()[-1] == "attending@h.test"


async def test_acknowledgement_stops_the_chain() -> None:
    world = World()
    escalation_id = await world.start()
    paged = world.addresses()

    result = await world.service.acknowledge(escalation_id, by="person:nurse", via="api")

    assert result.outcome.value == "acknowledged"
    await world.next_step(300)
    await world.next_step(600)
    assert world.addresses() == paged
    state = world.store.escalations[escalation_id].state
    assert state.status is EscalationStatus.ACKNOWLEDGED and state.due_at is None


async def test_all_clear_goes_only_to_those_paged_on_the_channel_that_reached_them() -> None:
    """The nurse's SMS is refused for good and her page fails over to e-mail; the alert ends
    before the second tier: the all clear goes to the nurse by e-mail (no second SMS) and to
    the fellow, never to the attending, whom the alert never paged."""
    world = World()
    world.sms.refusing.add("+15550001")
    escalation_id = await world.start()
    assert sorted(world.addresses()) == ["fellow@h.test", "nurse@h.test"]

    world.clock.advance(60)
    await world.end()

    all_clears = [
        (p.recipient.ref, p.channel, p.address, p.status)
        for p in world.store.pages_of(escalation_id)
        if p.purpose is PagePurpose.ALL_CLEAR
    ]
    assert sorted(all_clears) == [
        ("person:fellow", "email", "fellow@h.test", "sent"),
        ("person:nurse", "email", "nurse@h.test", "sent"),
    ]
    assert world.sms.sent == []
    told = world.email.sent[2:]
    assert sorted(to for to, _ in told) == ["fellow@h.test", "nurse@h.test"]
    assert all(subject.startswith("[VIGIL ALL CLEAR]") for _, subject in told)
    assert world.store.escalations[escalation_id].state.status is EscalationStatus.RESOLVED


async def test_all_clear_reaches_the_fallback_address_paged_for_someone() -> None:
    """Every channel of the fellow fails: the team's on-call address is paged for her
    (``:undeliverable``), and it gets her all clear too."""
    world = World()
    world.email.refusing.add("fellow@h.test")
    escalation_id = await world.start()
    assert "oncall@h.test" in world.addresses()

    await world.end()

    fallback_all_clears = [
        p.key
        for p in world.store.pages_of(escalation_id)
        if p.purpose is PagePurpose.ALL_CLEAR and p.recipient.ref == "fallback:onc"
    ]
    assert len(fallback_all_clears) == 1
    assert fallback_all_clears[0].endswith(":person:fellow:undeliverable#0")
    all_clears_sent = [
        to for to, subject in world.email.sent if subject.startswith("[VIGIL ALL CLEAR]")
    ]
    assert sorted(all_clears_sent) == ["oncall@h.test"]
    # The nurse was reached by SMS: her all clear is an SMS.
    assert [to for to, text in world.sms.sent if "CLEAR" in text.upper()] == ["+15550001"]
