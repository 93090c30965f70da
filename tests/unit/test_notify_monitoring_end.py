"""A new alert of a patient whose monitoring has ended (``domain.monitoring_end``), and what
notify does with it (``EscalationService`` over the in-memory unit of work): an alert of a
device time before the discharge pages; one at the discharge instant or after it pages nobody
and is recorded (its escalation closed at once, a ``not_paged`` timeline entry, an audit
entry); a pump's alert from the end of infusion on likewise, a thermometer's still pages; an
all clear of an alert paged before the discharge still goes out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

from schemas.events import AlertKind, AlertPhase
from services.notify.domain.escalation import (
    EscalationStatus,
    PolicySnapshot,
    StepSnapshot,
    Target,
)
from services.notify.domain.monitoring_end import (
    DISCHARGED,
    INFUSION_ENDED,
    PatientStanding,
    why_not_paged,
)
from services.notify.domain.routing import PagePurpose
from services.notify.service_layer.channels import ChannelRegistry, OutboundPage
from services.notify.service_layer.escalation import EscalationConfig, EscalationService
from services.notify.service_layer.ports import SendOutcome
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from tests.factories import make_alert
from tests.fakes.notify_store import MemoryAlerts, MemoryNotifyDatabase

T0 = datetime(2026, 3, 1, 14, 0, tzinfo=UTC)
DISCHARGE = T0 + timedelta(hours=1)
INFUSION_END = T0 + timedelta(minutes=30)
STANDING = PatientStanding("onc", infusion_ended_at=INFUSION_END, discharged_at=DISCHARGE)
SECOND = timedelta(seconds=1)


# -- the decision ---------------------------------------------------------------------------


def test_an_alert_before_the_discharge_pages() -> None:
    assert why_not_paged(STANDING, device_time=DISCHARGE - SECOND, rule_id="fever.single") is None


def test_an_alert_after_the_discharge_pages_nobody() -> None:
    at = DISCHARGE + SECOND
    assert why_not_paged(STANDING, device_time=at, rule_id="fever.single") == DISCHARGED


def test_an_alert_at_the_discharge_instant_pages_nobody() -> None:
    """The edge, decided as the rules decide it: monitoring stops at the discharge time."""
    assert why_not_paged(STANDING, device_time=DISCHARGE, rule_id="fever.single") == DISCHARGED


def test_a_pump_alert_from_the_end_of_infusion_pages_nobody_a_fever_still_pages() -> None:
    pump = PatientStanding("onc", INFUSION_END, DISCHARGE, device_is_pump=True)
    assert why_not_paged(pump, device_time=INFUSION_END, rule_id="pump.alarm") == INFUSION_ENDED
    assert why_not_paged(pump, device_time=INFUSION_END - SECOND, rule_id="pump.alarm") is None
    assert why_not_paged(STANDING, device_time=INFUSION_END, rule_id="fever.single") is None
    # After the discharge the discharge is the reason, pump or not.
    assert why_not_paged(pump, device_time=DISCHARGE, rule_id="pump.alarm") == DISCHARGED


def test_a_monitored_or_unknown_patient_and_a_caregiver_call_page() -> None:
    monitored = PatientStanding("onc")
    assert why_not_paged(monitored, device_time=DISCHARGE, rule_id="fever.single") is None
    assert why_not_paged(None, device_time=DISCHARGE, rule_id="fever.single") is None
    assert why_not_paged(STANDING, device_time=DISCHARGE, rule_id="caregiver.call") is None


# -- the escalation service -----------------------------------------------------------------

POLICY = PolicySnapshot(
    policy_id="onc-day",
    steps=(StepSnapshot(targets=(Target("person", "nurse"),), wait_s=300),),
    repeat_count=1,
)


class Channel:
    name = "email"
    lookup_note = "no lookup"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, page: OutboundPage) -> SendOutcome:
        self.sent.append((page.recipient, str(page.email()["Subject"])))
        return SendOutcome(accepted=True, detail="taken")

    async def find_sent(self, *, to: str, reference: str, since: datetime) -> str | None:
        return None


class World:
    def __init__(self) -> None:
        self.at = DISCHARGE + timedelta(seconds=3)
        self.store = MemoryNotifyDatabase(fallback_email="fallback@h.test")
        self.store.add_team("onc", POLICY, oncall_email="oncall@h.test")
        self.store.add_patient("P-1", "onc")
        self.store.add_person("nurse", ("email", "nurse@h.test"))
        self.store.pumps.add("pump-P-1")
        self.email = Channel()
        self.service = EscalationService(
            unit_of_work=cast(UnitOfWorkFactory, self.store.unit_of_work),
            alerts=MemoryAlerts(),
            channels=ChannelRegistry([self.email]),
            config=EscalationConfig(
                sender_address="vigil@h.test",
                public_base_url="http://vigil.test",
                ack_secret=b"s" * 32,
            ),
            clock=lambda: self.at,
        )

    def timeline(self, dedup_key: str) -> list[tuple[str, dict[str, object]]]:
        for escalation in self.store.escalations.values():
            if escalation.alert.dedup_key == dedup_key:
                return [(e.kind, dict(e.detail)) for e in escalation.timeline]
        raise AssertionError(f"no escalation for {dedup_key}")


async def test_a_fever_decided_before_the_discharge_still_pages() -> None:
    world = World()
    world.store.end_course("P-1", infusion_ended_at=INFUSION_END, discharged_at=DISCHARGE)
    alert = make_alert(patient_id="P-1", at=world.at, device_time=DISCHARGE - SECOND)

    assert await world.service.handle_alert(alert)

    assert [to for to, _ in world.email.sent] == ["nurse@h.test"]


async def test_a_fever_at_the_discharge_time_pages_nobody_and_is_recorded() -> None:
    """A timer of the rules falling due at the discharge, before they reload their
    configuration: no page, the escalation closed at once, the timeline and audit say why."""
    world = World()
    world.store.end_course("P-1", infusion_ended_at=INFUSION_END, discharged_at=DISCHARGE)
    alert = make_alert(patient_id="P-1", at=world.at, device_time=DISCHARGE)

    assert await world.service.handle_alert(alert)
    await world.service.tick()
    await world.service.deliver_due()

    assert world.email.sent == []
    assert world.store.pages == []
    (escalation,) = world.store.escalations.values()
    assert escalation.state.status is EscalationStatus.RESOLVED
    assert escalation.state.paged == ()
    assert world.timeline("P-1:FEVER") == [
        (
            "not_paged",
            {"reason": "discharged", "alert_id": str(alert.alert_id), "rule_id": "fever.single"},
        )
    ]
    assert world.store.audit == [("notify", "not_paged:discharged", "P-1:FEVER")]
    # Its later phases page nobody either, and owe no all clear.
    world.at += timedelta(minutes=10)
    await world.service.handle_alert(
        make_alert(patient_id="P-1", at=world.at, phase=AlertPhase.ESCALATE)
    )
    await world.service.handle_alert(
        make_alert(patient_id="P-1", at=world.at, phase=AlertPhase.END)
    )
    assert world.email.sent == []


async def test_a_pump_alarm_after_the_end_of_infusion_pages_nobody_a_fever_does() -> None:
    world = World()
    world.at = INFUSION_END + timedelta(minutes=5)
    world.store.end_course("P-1", infusion_ended_at=INFUSION_END)
    pump_alarm = make_alert(
        patient_id="P-1",
        code="OCCLUSION",
        at=world.at,
        device_id="pump-P-1",
        kind=AlertKind.TECHNICAL,
        rule_id="pump.alarm",
    )
    fever = make_alert(patient_id="P-1", at=world.at)

    assert await world.service.handle_alert(pump_alarm)
    assert await world.service.handle_alert(fever)

    assert [to for to, _ in world.email.sent] == ["nurse@h.test"]
    assert world.timeline("P-1:OCCLUSION")[0] == (
        "not_paged",
        {"reason": "infusion ended", "alert_id": str(pump_alarm.alert_id), "rule_id": "pump.alarm"},
    )


async def test_the_all_clear_of_an_alert_paged_before_the_discharge_still_goes_out() -> None:
    world = World()
    world.at = DISCHARGE - timedelta(minutes=5)
    assert await world.service.handle_alert(make_alert(patient_id="P-1", at=world.at))
    world.store.end_course("P-1", infusion_ended_at=INFUSION_END, discharged_at=DISCHARGE)

    world.at = DISCHARGE + timedelta(minutes=1)
    end = make_alert(patient_id="P-1", at=world.at, phase=AlertPhase.END)
    assert await world.service.handle_alert(end)

    subjects = [subject for _, subject in world.email.sent]
    assert len(subjects) == 2 and subjects[1].startswith("[VIGIL ALL CLEAR]")
    all_clears = [p for p in world.store.pages if p.purpose is PagePurpose.ALL_CLEAR]
    assert [p.address for p in all_clears] == ["nurse@h.test"]
