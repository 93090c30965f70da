"""Pure parts of the notify service: message ids, e-mail text, backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any
from uuid import UUID

import pytest

from schemas.events import (
    Alert,
    AlertPhase,
    Evidence,
    Page,
)
from services.notify.domain import (
    backoff_delay_s,
    compose_page_email,
    message_id_for,
    page_id_for,
)
from tests.factories import fever_evidence, make_alert

PARIS = timezone(timedelta(hours=1))
DEVICE_TIME = datetime(2025, 3, 1, 3, 0, 0, tzinfo=PARIS)
INGEST_TIME = datetime(2025, 3, 1, 2, 0, 2, tzinfo=UTC)
COMPOSED_AT = datetime(2025, 3, 1, 2, 0, 3, tzinfo=UTC)
ONCALL_EMAIL = "oncall-onc1@hospital.example"
CARE_TEAM = "CT-ONC-1"

ALERT_IDS = {
    AlertPhase.START: UUID("00000000-0000-5000-8000-000000000001"),
    AlertPhase.CONTINUE: UUID("00000000-0000-5000-8000-000000000002"),
    AlertPhase.ESCALATE: UUID("00000000-0000-5000-8000-000000000003"),
    AlertPhase.DEESCALATE: UUID("00000000-0000-5000-8000-000000000004"),
    AlertPhase.END: UUID("00000000-0000-5000-8000-000000000005"),
}


def fever_alert(phase: AlertPhase = AlertPhase.START, **changes: object) -> Alert:
    fields: dict[str, Any] = dict(
        patient_id="P-0001",
        code="FEVER_SINGLE",
        phase=phase,
        at=INGEST_TIME,
        device_time=DEVICE_TIME,
        alert_id=ALERT_IDS[phase],
        dedup_key="P-0001:fever",
        device_id="thermo-17",
        evidence=(fever_evidence(DEVICE_TIME),),
        rule_version="2025.03.1",
    )
    fields.update(changes)
    return make_alert(**fields)


def page_for(alert: Alert, recipient: str = ONCALL_EMAIL) -> Page:
    key = f"{alert.alert_id}:email:{recipient}"
    return Page(
        page_id=page_id_for(key),
        alert_id=alert.alert_id,
        dedup_key=alert.dedup_key,
        patient_id=alert.patient_id,
        care_team_id=CARE_TEAM,
        channel="email",
        recipient=recipient,
        idempotency_key=key,
        created_at=COMPOSED_AT,
    )


def composed(alert: Alert, route_detail: str | None = None) -> EmailMessage:
    return compose_page_email(
        alert,
        page_for(alert),
        sender="vigil-pages@localhost",
        composed_at=COMPOSED_AT,
        route_detail=route_detail,
    )


def body_of(message: EmailMessage) -> str:
    """The body as a mail client shows it, after a round trip through the wire format."""
    parsed = message_from_bytes(message.as_bytes(policy=policy.SMTP), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    content = parsed.get_content()
    assert isinstance(content, str)
    return content


# -- identity ------------------------------------------------------------------------------------


def test_message_id_is_stable_and_a_valid_msg_id() -> None:
    """Message-ID derives from the key only, so a resent page collapses in the mail client."""
    key = f"{ALERT_IDS[AlertPhase.START]}:email:{ONCALL_EMAIL}"
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
    assert composed(fever_alert(AlertPhase.ESCALATE))["Subject"].startswith(
        "[VIGIL HIGH] Escalated: Fever"
    )
    assert composed(fever_alert(AlertPhase.END))["Subject"].startswith("[VIGIL ALL CLEAR] Fever")
    message = composed(
        fever_alert(), route_detail="patient P-0001 is not registered with a care team"
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
    body = body_of(composed(fever_alert(AlertPhase.END)))
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
    assert message["Message-ID"] == message_id_for(page_for(alert).idempotency_key)
    assert message["X-Vigil-Alert-Id"] == str(alert.alert_id)
    assert message["X-Vigil-Dedup-Key"] == "P-0001:fever"
    assert message["X-Vigil-Priority"] == "high"
    assert message["To"] == ONCALL_EMAIL
    assert message["Auto-Submitted"] == "auto-generated"


def test_composing_a_record_only_phase_is_refused() -> None:
    """A continue phase has no page; composing one is a programming error, not a silent page."""
    alert = fever_alert(AlertPhase.CONTINUE)
    page = Page(
        page_id=page_id_for("k"),
        alert_id=alert.alert_id,
        dedup_key=alert.dedup_key,
        patient_id=alert.patient_id,
        care_team_id=CARE_TEAM,
        channel="email",
        recipient=ONCALL_EMAIL,
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
