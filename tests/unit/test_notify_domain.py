"""Pure paging decisions of the notify service: routing per phase, keys, e-mail text, backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from uuid import UUID

import pytest

from schemas.events import (
    Alert,
    AlertKind,
    AlertPhase,
    AlertPriority,
    AlertState,
    Evidence,
    Page,
)
from services.notify.domain import (
    UNASSIGNED_CARE_TEAM,
    OnCall,
    PageOrder,
    PagePurpose,
    RecordOnly,
    Route,
    ThreadRoot,
    backoff_delay_s,
    compose_page_email,
    decide,
    idempotency_key,
    message_id_for,
    page_id_for,
)

PARIS = timezone(timedelta(hours=1))
DEVICE_TIME = datetime(2025, 3, 1, 3, 0, 0, tzinfo=PARIS)
INGEST_TIME = datetime(2025, 3, 1, 2, 0, 2, tzinfo=UTC)
COMPOSED_AT = datetime(2025, 3, 1, 2, 0, 3, tzinfo=UTC)
ONCALL = OnCall(care_team_id="CT-ONC-1", email="oncall-onc1@hospital.example")
FALLBACK = "vigil-oncall-fallback@localhost"

ALERT_IDS = {
    AlertPhase.START: UUID("00000000-0000-5000-8000-000000000001"),
    AlertPhase.CONTINUE: UUID("00000000-0000-5000-8000-000000000002"),
    AlertPhase.ESCALATE: UUID("00000000-0000-5000-8000-000000000003"),
    AlertPhase.DEESCALATE: UUID("00000000-0000-5000-8000-000000000004"),
    AlertPhase.END: UUID("00000000-0000-5000-8000-000000000005"),
}


def fever_alert(phase: AlertPhase = AlertPhase.START, **changes: object) -> Alert:
    fields: dict[str, object] = dict(
        alert_id=ALERT_IDS[phase],
        dedup_key="P-0001:fever",
        patient_id="P-0001",
        device_id="thermo-17",
        kind=AlertKind.PHYSIOLOGICAL,
        code="FEVER_SINGLE",
        priority=AlertPriority.HIGH,
        phase=phase,
        state=AlertState.INACTIVE if phase is AlertPhase.END else AlertState.ACTIVE,
        title="Fever 38.6 °C",
        device_time=DEVICE_TIME,
        ingest_time=INGEST_TIME,
        evidence=(
            Evidence(
                name="temperature",
                value=38.6,
                unit="°C",
                limit=38.3,
                comparator=">=",
                device_time=DEVICE_TIME,
            ),
        ),
        rule_id="fever.single",
        rule_version="2025.03.1",
    )
    fields.update(changes)
    return Alert.model_validate(fields)


def order_for(alert: Alert, thread: ThreadRoot | None = None) -> PageOrder:
    decision = decide(alert, oncall=ONCALL, thread=thread, fallback_email=FALLBACK)
    assert isinstance(decision, PageOrder)
    return decision


def start_thread() -> ThreadRoot:
    start = order_for(fever_alert(AlertPhase.START))
    return ThreadRoot(
        idempotency_key=start.idempotency_key,
        recipient=start.recipient,
        care_team_id=start.care_team_id,
        route=start.route,
    )


def composed(alert: Alert, thread: ThreadRoot | None = None) -> EmailMessage:
    order = order_for(alert, thread)
    page = order.to_page(alert, created_at=COMPOSED_AT)
    return compose_page_email(
        alert,
        page,
        sender="vigil-pages@localhost",
        composed_at=COMPOSED_AT,
        thread=thread,
        route_detail=order.route_detail,
    )


def body_of(message: EmailMessage) -> str:
    """The body as a mail client shows it, after a round trip through the wire format."""
    parsed = message_from_bytes(message.as_bytes(policy=policy.SMTP), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    content = parsed.get_content()
    assert isinstance(content, str)
    return content


# -- decisions per phase ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "purpose"),
    [(AlertPhase.START, PagePurpose.ALERT), (AlertPhase.ESCALATE, PagePurpose.ESCALATION)],
)
def test_start_and_escalate_page_the_care_team_oncall(
    phase: AlertPhase, purpose: PagePurpose
) -> None:
    """start and escalate each become a page to the on-call address of the patient's care team."""
    order = order_for(fever_alert(phase))
    assert order.purpose is purpose
    assert order.recipient == ONCALL.email
    assert order.care_team_id == ONCALL.care_team_id
    assert order.route is Route.CARE_TEAM
    assert order.route_detail is None
    assert order.channel == "email"


@pytest.mark.parametrize("phase", [AlertPhase.CONTINUE, AlertPhase.DEESCALATE])
def test_continue_and_deescalate_are_recorded_without_a_new_page(phase: AlertPhase) -> None:
    """Repeats of an open episode do not page again, whatever the thread or on-call state."""
    for thread in (None, start_thread()):
        decision = decide(fever_alert(phase), oncall=ONCALL, thread=thread, fallback_email=FALLBACK)
        assert isinstance(decision, RecordOnly)
        assert phase.value in decision.reason


def test_end_sends_all_clear_to_the_start_page_recipient_after_a_handoff() -> None:
    """The all-clear follows the start page's recipient even if the on-call changed since."""
    thread = start_thread()
    after_handoff = OnCall(care_team_id=ONCALL.care_team_id, email="next-shift@hospital.example")
    decision = decide(
        fever_alert(AlertPhase.END), oncall=after_handoff, thread=thread, fallback_email=FALLBACK
    )
    assert isinstance(decision, PageOrder)
    assert decision.purpose is PagePurpose.ALL_CLEAR
    assert decision.recipient == ONCALL.email


def test_end_without_a_start_page_goes_to_the_current_oncall() -> None:
    """An all-clear for an episode notify never paged still reaches the care team."""
    order = order_for(fever_alert(AlertPhase.END), thread=None)
    assert order.purpose is PagePurpose.ALL_CLEAR
    assert order.recipient == ONCALL.email


def test_unknown_patient_routes_to_the_fallback_with_a_reason() -> None:
    """An alert for a patient with no care team is paged to the fallback address, not dropped."""
    decision = decide(fever_alert(), oncall=None, thread=None, fallback_email=FALLBACK)
    assert isinstance(decision, PageOrder)
    assert decision.recipient == FALLBACK
    assert decision.route is Route.FALLBACK
    assert decision.care_team_id == UNASSIGNED_CARE_TEAM
    assert decision.route_detail is not None and "P-0001" in decision.route_detail


def test_blank_oncall_address_routes_to_the_fallback_keeping_the_team() -> None:
    """A care team without an on-call address falls back, and the page still names the team."""
    decision = decide(
        fever_alert(AlertPhase.ESCALATE),
        oncall=OnCall(care_team_id="CT-ONC-2", email="  "),
        thread=None,
        fallback_email=FALLBACK,
    )
    assert isinstance(decision, PageOrder)
    assert decision.recipient == FALLBACK
    assert decision.care_team_id == "CT-ONC-2"
    assert decision.route_detail is not None and "CT-ONC-2" in decision.route_detail


# -- idempotency --------------------------------------------------------------------------------


def test_idempotency_key_is_alert_channel_recipient_and_stable() -> None:
    """The same alert phase gives the same key and page id every time; another phase does not."""
    first = order_for(fever_alert())
    again = order_for(fever_alert())
    assert first.idempotency_key == f"{ALERT_IDS[AlertPhase.START]}:email:{ONCALL.email}"
    assert again.idempotency_key == first.idempotency_key
    assert again.page_id == first.page_id == page_id_for(first.idempotency_key)
    escalated = order_for(fever_alert(AlertPhase.ESCALATE))
    assert escalated.idempotency_key != first.idempotency_key
    assert escalated.page_id != first.page_id


def test_idempotency_key_differs_per_recipient() -> None:
    """Paging a second person about the same phase is a second page, not a duplicate."""
    alert_id = ALERT_IDS[AlertPhase.START]
    assert idempotency_key(alert_id, "email", "a@x.example") != idempotency_key(
        alert_id, "email", "b@x.example"
    )


def test_message_id_is_stable_and_a_valid_msg_id() -> None:
    """Message-ID derives from the key only, so a resent page collapses in the mail client."""
    key = f"{ALERT_IDS[AlertPhase.START]}:email:{ONCALL.email}"
    mid = message_id_for(key)
    assert mid == message_id_for(key)
    assert mid != message_id_for(key + "x")
    left, right = mid.strip("<>").split("@")
    assert mid.startswith("<") and mid.endswith(">")
    assert left.isalnum() and right


# -- e-mail content ---------------------------------------------------------------------------


def test_subject_names_priority_title_and_patient() -> None:
    """The subject reads like '[VIGIL HIGH] Fever 38.6 °C — patient P-0001'."""
    assert composed(fever_alert())["Subject"] == "[VIGIL HIGH] Fever 38.6 °C — patient P-0001"


def test_subject_marks_escalation_all_clear_and_fallback() -> None:
    """Later phases and fallback pages say so in the subject, where a phone shows it first."""
    thread = start_thread()
    assert composed(fever_alert(AlertPhase.ESCALATE), thread)["Subject"].startswith(
        "[VIGIL HIGH] Escalated: Fever"
    )
    assert composed(fever_alert(AlertPhase.END), thread)["Subject"].startswith(
        "[VIGIL HIGH] All clear: Fever"
    )
    alert = fever_alert()
    decision = decide(alert, oncall=None, thread=None, fallback_email=FALLBACK)
    assert isinstance(decision, PageOrder)
    message = compose_page_email(
        alert,
        decision.to_page(alert, created_at=COMPOSED_AT),
        sender="vigil-pages@localhost",
        composed_at=COMPOSED_AT,
        route_detail=decision.route_detail,
    )
    assert message["Subject"].endswith("(no care team on record)")
    assert "ROUTING: this page went to the fallback address" in body_of(message)


def test_body_carries_everything_a_clinician_and_an_auditor_need() -> None:
    """Patient, device, code, priority, phase, evidence, both times, rule and ids are all there."""
    alert = fever_alert()
    body = body_of(composed(alert))
    for expected in (
        "Patient:      P-0001",
        "Device:       thermo-17",
        "FEVER_SINGLE",
        "Priority:     high",
        "Phase:        start",
        "temperature: 38.6 °C >= limit 38.3 °C",
        "2025-03-01T03:00:00+01:00",  # device time keeps the device's own offset
        "2025-03-01T02:00:02+00:00",
        "Rule:         fever.single version 2025.03.1",
        f"Alert id:     {alert.alert_id}",
        "Dedup key:    P-0001:fever",
        "ACTION: call the caregiver of patient P-0001 now.",
    ):
        assert expected in body, expected


def test_all_clear_body_still_asks_for_the_caregiver_call() -> None:
    """The all-clear tells the clinician to confirm with the caregiver if not yet reached."""
    body = body_of(composed(fever_alert(AlertPhase.END), start_thread()))
    assert body.startswith("ALL CLEAR:")
    assert "call them to confirm" in body
    assert "Phase:        end" in body


def test_whole_number_values_keep_a_decimal() -> None:
    """38.0 reads as 38.0 °C in the page, not as a rounded 38."""
    alert = fever_alert(
        evidence=(
            Evidence(
                name="temperature",
                value=38.0,
                unit="°C",
                limit=38.0,
                comparator=">=",
                device_time=DEVICE_TIME,
            ),
        )
    )
    assert "temperature: 38.0 °C >= limit 38.0 °C" in body_of(composed(alert))


def test_identity_headers() -> None:
    """Message-ID comes from the idempotency key; X-Vigil-* name the alert for mail filters."""
    alert = fever_alert()
    message = composed(alert)
    order = order_for(alert)
    assert message["Message-ID"] == message_id_for(order.idempotency_key)
    assert message["X-Vigil-Alert-Id"] == str(alert.alert_id)
    assert message["X-Vigil-Dedup-Key"] == "P-0001:fever"
    assert message["X-Vigil-Priority"] == "high"
    assert message["To"] == ONCALL.email
    assert message["Auto-Submitted"] == "auto-generated"


def test_start_page_opens_a_thread_and_later_phases_reply_to_it() -> None:
    """Escalation and all-clear carry In-Reply-To/References to the start page's Message-ID."""
    thread = start_thread()
    start = composed(fever_alert(AlertPhase.START), thread)
    # A redelivered start finds itself as the thread root; it must not reply to itself.
    assert start["In-Reply-To"] is None and start["References"] is None
    for phase in (AlertPhase.ESCALATE, AlertPhase.END):
        later = composed(fever_alert(phase), thread)
        assert later["In-Reply-To"] == start["Message-ID"]
        assert later["References"] == start["Message-ID"]
        assert later["Message-ID"] != start["Message-ID"]


def test_composing_a_record_only_phase_is_refused() -> None:
    """A continue phase has no page; composing one is a programming error, not a silent page."""
    alert = fever_alert(AlertPhase.CONTINUE)
    page = Page(
        page_id=page_id_for("k"),
        alert_id=alert.alert_id,
        dedup_key=alert.dedup_key,
        patient_id=alert.patient_id,
        care_team_id=ONCALL.care_team_id,
        channel="email",
        recipient=ONCALL.email,
        idempotency_key="k",
        created_at=COMPOSED_AT,
    )
    with pytest.raises(ValueError, match="recorded only"):
        compose_page_email(alert, page, sender="s@x", composed_at=COMPOSED_AT)


def test_composition_is_deterministic() -> None:
    """The same inputs give the same bytes: a replay can diff the e-mails it would have sent."""
    assert composed(fever_alert()).as_bytes() == composed(fever_alert()).as_bytes()


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_then_caps() -> None:
    """Delays grow 2, 4, 8, 16, 32 s and then hold at the cap."""
    delays = [backoff_delay_s(n, base_s=2.0, cap_s=60.0) for n in range(1, 9)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_backoff_is_finite_for_huge_attempt_numbers() -> None:
    """A page retried for days never overflows the schedule."""
    assert backoff_delay_s(10_000, base_s=2.0, cap_s=60.0) == 60.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempt": 0},
        {"attempt": 1, "base_s": 0.0},
        {"attempt": 1, "factor": 0.5},
        {"attempt": 1, "base_s": 10.0, "cap_s": 5.0},
    ],
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    """Attempt 0, non-positive base, shrinking factor or cap below base are errors."""
    attempt = int(kwargs.pop("attempt"))
    with pytest.raises(ValueError):
        backoff_delay_s(attempt, **kwargs)
