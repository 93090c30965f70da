"""The e-mail a page becomes: subject, plain-text body and the headers that collapse a resent one.

Pure: builds an ``email.message.EmailMessage`` from the alert, the page and the time of
composition passed in; sending it belongs to ``adapters.smtp``. The body is PHI (it carries the
triggering value), so nothing here logs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Final

from schemas.events import Alert, AlertPhase, AlertPriority, Evidence, Page
from services.notify.domain.bundling import bundle_priority
from services.notify.domain.routing import PagePurpose, purpose_of

# The right-hand side of every Message-ID; the left-hand side is a digest of the idempotency key.
MESSAGE_ID_DOMAIN: Final = "notify.vigil"

_SUBJECT_PREFIX: Final = {
    PagePurpose.ALERT: "",
    PagePurpose.ESCALATION: "Escalated: ",
    PagePurpose.ALL_CLEAR: "All clear: ",
}


def message_id_for(idempotency_key: str) -> str:
    """A stable Message-ID per page, so a resent duplicate collapses in the clinician's mail client.

    The key holds ``:`` and ``@``, which a Message-ID's left part may not, hence the digest.
    """
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:40]
    return f"<{digest}@{MESSAGE_ID_DOMAIN}>"


def page_subject(alert: Alert, purpose: PagePurpose, *, unrouted: bool = False) -> str:
    """``[VIGIL HIGH] Fever 38.6 °C — patient P-0001``, with a prefix for later phases."""
    subject = (
        f"[VIGIL {alert.priority.value.upper()}] {_SUBJECT_PREFIX.get(purpose, '')}{alert.title}"
        f" — patient {alert.patient_id}"
    )
    if unrouted:
        subject += " (no care team on record)"
    return subject


def page_body(
    alert: Alert,
    page: Page,
    purpose: PagePurpose,
    *,
    route_detail: str | None = None,
    ack_url: str | None = None,
    note: str | None = None,
) -> str:
    """Plain text a clinician can act on from a phone at 3 a.m., and an auditor can trace."""
    lines: list[str] = [_action_line(alert, purpose), ""]
    if note is not None:
        lines += [note, ""]
    if ack_url is not None:
        lines += [f"ACKNOWLEDGE (stops further paging): {ack_url}", ""]
    if route_detail is not None:
        lines += [
            f"ROUTING: this page went to the fallback address because {route_detail}.",
            "Find the treating team and forward this page to them.",
            "",
        ]
    lines += [
        *_alert_lines(alert),
        f"Care team:    {page.care_team_id}",
        f"Page id:      {page.page_id}",
        "",
        "Sent automatically by Vigil. Replies to this address are not read: acknowledge in Vigil.",
    ]
    return "\n".join(lines) + "\n"


def _alert_lines(alert: Alert) -> list[str]:
    return [
        f"Alert:        {alert.title}",
        f"Patient:      {alert.patient_id}",
        f"Device:       {alert.device_id}",
        f"Code:         {alert.code} ({alert.kind.value})",
        f"Priority:     {alert.priority.value}",
        f"Phase:        {alert.phase.value} (state {alert.state.value})",
        f"Device time:  {alert.device_time.isoformat()}",
        f"Ingest time:  {alert.ingest_time.isoformat()}",
        "Evidence:",
        *_evidence_lines(alert.evidence),
        f"Rule:         {alert.rule_id} version {alert.rule_version}",
        f"Alert id:     {alert.alert_id}",
        f"Dedup key:    {alert.dedup_key}",
    ]


def compose_page_email(
    alert: Alert,
    page: Page,
    *,
    sender: str,
    composed_at: datetime,
    route_detail: str | None = None,
    ack_url: str | None = None,
    note: str | None = None,
    purpose: PagePurpose | None = None,
) -> EmailMessage:
    """The full message for one page; ``purpose`` defaults to what the alert's phase calls for."""
    purpose = purpose or purpose_of(alert.phase)
    if purpose is None:
        raise ValueError(f"phase {alert.phase.value} is recorded only, it has no page to compose")
    if composed_at.tzinfo is None:
        raise ValueError("composed_at must be timezone-aware")

    message = EmailMessage()
    message["From"] = sender
    message["To"] = page.recipient
    message["Subject"] = page_subject(alert, purpose, unrouted=route_detail is not None)
    message["Date"] = format_datetime(composed_at)
    message["Message-ID"] = message_id_for(page.idempotency_key)
    # RFC 3834: keeps vacation auto-replies from answering a page and looping.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Vigil-Alert-Id"] = str(alert.alert_id)
    message["X-Vigil-Dedup-Key"] = alert.dedup_key
    message["X-Vigil-Priority"] = alert.priority.value
    message["X-Vigil-Phase"] = alert.phase.value
    message["X-Vigil-Page-Id"] = str(page.page_id)
    if alert.priority is AlertPriority.HIGH and purpose is not PagePurpose.ALL_CLEAR:
        # Honoured by common mail clients to flag the message; harmless where ignored.
        message["Importance"] = "high"
        message["X-Priority"] = "1"
    # Quoted-printable keeps "°C" and "—" intact through relays that do not announce 8BITMIME.
    message.set_content(
        page_body(alert, page, purpose, route_detail=route_detail, ack_url=ack_url, note=note),
        charset="utf-8",
        cte="quoted-printable",
    )
    return message


def bundle_subject(alerts: Sequence[Alert], *, unrouted: bool = False) -> str:
    """``[VIGIL HIGH] 3 alerts — patient P-0001: Fever 38.6 °C; Occlusion; Battery low``."""
    priority = bundle_priority(tuple(a.priority for a in alerts))
    titles = "; ".join(a.title for a in alerts)
    subject = (
        f"[VIGIL {priority.value.upper()}] {len(alerts)} alerts — patient "
        f"{alerts[0].patient_id}: {titles}"
    )
    if unrouted:
        subject += " (no care team on record)"
    return subject


def compose_bundle_email(
    alerts: Sequence[Alert],
    page: Page,
    *,
    sender: str,
    composed_at: datetime,
    ack_url: str | None = None,
    route_detail: str | None = None,
) -> EmailMessage:
    """One page for a burst of alerts of one patient, each listed in full.

    The acknowledgement link acknowledges every alert listed: the person who reads this page is
    the one who calls the caregiver about all of them.
    """
    if len(alerts) < 2:
        raise ValueError("a bundle lists two or more alerts")
    if composed_at.tzinfo is None:
        raise ValueError("composed_at must be timezone-aware")
    lead = alerts[0]
    priority = bundle_priority(tuple(a.priority for a in alerts))
    opening = [
        f"ACTION: {len(alerts)} alerts for patient {lead.patient_id} within seconds: call the "
        f"caregiver of patient {lead.patient_id} now.",
        "",
    ]
    if ack_url is not None:
        opening += [
            f"ACKNOWLEDGE ALL {len(alerts)} ALERTS (stops further paging): {ack_url}",
            "",
        ]
    return _listing_email(
        alerts,
        page,
        sender=sender,
        subject=bundle_subject(alerts, unrouted=route_detail is not None),
        composed_at=composed_at,
        priority=priority,
        phase=lead.phase,
        opening=opening,
        route_detail=route_detail,
        sections=[
            (f"--- Alert {number} of {len(alerts)} ---", alert)
            for number, alert in enumerate(alerts, start=1)
        ],
    )


def compose_bundle_sms(alerts: Sequence[Alert], *, reference: str) -> str:
    """One SMS for a burst; the reply acknowledges every alert it names."""
    priority = bundle_priority(tuple(a.priority for a in alerts))
    titles = "; ".join(a.title for a in alerts)
    return (
        f"VIGIL {priority.value.upper()}: {len(alerts)} alerts, patient {alerts[0].patient_id}: "
        f"{titles}. Call the caregiver. Reply 1 to acknowledge all. Ref {reference}"
    )


# One line of a quiet-hours digest: the alert, and when it resolved (None: still active).
DigestEntry = tuple[Alert, datetime | None]


def digest_subject(entries: Sequence[DigestEntry], *, unrouted: bool = False) -> str:
    """``[VIGIL LOW] Quiet hours: 3 alerts (1 resolved) — patients P-1, P-2``."""
    alerts = [a for a, _ in entries]
    priority = bundle_priority(tuple(a.priority for a in alerts))
    resolved = sum(1 for _, at in entries if at is not None)
    patients = ", ".join(dict.fromkeys(a.patient_id for a in alerts))
    noun = "alert" if len(alerts) == 1 else "alerts"
    subject = (
        f"[VIGIL {priority.value.upper()}] Quiet hours: {len(alerts)} {noun}"
        f"{f' ({resolved} resolved)' if resolved else ''} — patient"
        f"{'s' if ',' in patients else ''} {patients}"
    )
    if unrouted:
        subject += " (no care team on record)"
    return subject


def compose_digest_email(
    entries: Sequence[DigestEntry],
    page: Page,
    *,
    sender: str,
    composed_at: datetime,
    ack_url: str | None = None,
    route_detail: str | None = None,
) -> EmailMessage:
    """The page for the low-priority alerts held during quiet hours, each listed in full; one
    that resolved meanwhile is listed as "RESOLVED at ...", never left out."""
    if not entries:
        raise ValueError("a digest lists at least one alert")
    if composed_at.tzinfo is None:
        raise ValueError("composed_at must be timezone-aware")
    alerts = [a for a, _ in entries]
    active = sum(1 for _, at in entries if at is None)
    opening = [
        f"QUIET HOURS DIGEST: {len(entries)} low-priority alert(s) held while quiet hours were "
        f"on; {active} still active. Review them and call the caregivers where needed.",
        "",
    ]
    if ack_url is not None:
        opening += [f"ACKNOWLEDGE ALL LISTED (stops further paging): {ack_url}", ""]
    sections = []
    for number, (alert, resolved_at) in enumerate(entries, start=1):
        state = "ACTIVE" if resolved_at is None else f"RESOLVED at {resolved_at.isoformat()}"
        sections.append((f"--- Alert {number} of {len(entries)}: {state} ---", alert))
    return _listing_email(
        alerts,
        page,
        sender=sender,
        subject=digest_subject(entries, unrouted=route_detail is not None),
        composed_at=composed_at,
        priority=bundle_priority(tuple(a.priority for a in alerts)),
        phase=None,
        opening=opening,
        route_detail=route_detail,
        sections=sections,
    )


def _listing_email(
    alerts: Sequence[Alert],
    page: Page,
    *,
    sender: str,
    subject: str,
    composed_at: datetime,
    priority: AlertPriority,
    phase: AlertPhase | None,
    opening: list[str],
    route_detail: str | None,
    sections: list[tuple[str, Alert]],
) -> EmailMessage:
    """The e-mail of a page listing several alerts (a burst's bundle, a quiet-hours digest):
    headers naming every alert, the opening lines, the routing note, one section per alert.
    Only a bundle carries its phase and, when HIGH, the importance headers."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = page.recipient
    message["Subject"] = subject
    message["Date"] = format_datetime(composed_at)
    message["Message-ID"] = message_id_for(page.idempotency_key)
    message["Auto-Submitted"] = "auto-generated"
    message["X-Vigil-Alert-Id"] = ", ".join(str(a.alert_id) for a in alerts)
    message["X-Vigil-Dedup-Key"] = ", ".join(a.dedup_key for a in alerts)
    message["X-Vigil-Priority"] = priority.value
    if phase is not None:
        message["X-Vigil-Phase"] = phase.value
    message["X-Vigil-Page-Id"] = str(page.page_id)
    if phase is not None and priority is AlertPriority.HIGH:
        message["Importance"] = "high"
        message["X-Priority"] = "1"
    lines = list(opening)
    if route_detail is not None:
        lines += [
            f"ROUTING: this page went to the fallback address because {route_detail}.",
            "Find the treating team and forward this page to them.",
            "",
        ]
    for header, alert in sections:
        lines += [header, *_alert_lines(alert), ""]
    lines += [
        f"Care team:    {page.care_team_id}",
        f"Page id:      {page.page_id}",
        "",
        "Sent automatically by Vigil. Replies to this address are not read: acknowledge in Vigil.",
    ]
    message.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
    return message


def compose_digest_sms(entries: Sequence[DigestEntry], *, reference: str) -> str:
    """One SMS for the quiet-hours digest; the reply acknowledges every alert it names."""
    parts = [
        f"{a.title} ({a.patient_id})"
        + ("" if at is None else f" resolved {at.strftime('%H:%M')} UTC")
        for a, at in entries
    ]
    priority = bundle_priority(tuple(a.priority for a, _ in entries))
    return (
        f"VIGIL {priority.value.upper()} quiet-hours digest, {len(entries)} alert(s): "
        f"{'; '.join(parts)}. Reply 1 to acknowledge all. Ref {reference}"
    )


def _action_line(alert: Alert, purpose: PagePurpose) -> str:
    who = f"the caregiver of patient {alert.patient_id}"
    if purpose is PagePurpose.ALERT:
        return f"ACTION: call {who} now."
    if purpose is PagePurpose.ESCALATION:
        return f"ESCALATED: this alert has become more urgent. ACTION: call {who} now."
    return (
        "ALL CLEAR: the condition behind this alert has ended. "
        f"If you have not reached {who} yet, call them to confirm the child is well."
    )


def _evidence_lines(evidence: Iterable[Evidence]) -> list[str]:
    lines = [
        f"  - {item.name}: {_number(item.value)} {item.unit} {item.comparator} limit "
        f"{_number(item.limit)} {item.unit} (device time {item.device_time.isoformat()})"
        for item in evidence
    ]
    return lines or ["  - none recorded"]


def _number(value: float) -> str:
    # Six significant digits read well for °C, mL and mL/h; keep one decimal on whole numbers so
    # 38.0 does not read as a rounded 38.
    text = format(value, ".6g")
    if "." not in text and "e" not in text and "inf" not in text and "nan" not in text:
        text += ".0"
    return text


def compose_sms_text(alert: Alert, purpose: PagePurpose, *, reference: str) -> str:
    """A page short enough for one or two SMS segments; ``reference`` finds it again later.

    The reference lets a restarted notify ask the SMS provider whether a message it may have sent
    before a crash was accepted, because the provider keeps no idempotency key of its own.
    """
    if purpose is PagePurpose.ALL_CLEAR:
        head = f"VIGIL ALL CLEAR: {alert.title}, patient {alert.patient_id}."
        return f"{head} Ref {reference}"
    head = f"VIGIL {alert.priority.value.upper()}: {alert.title}, patient {alert.patient_id}."
    return f"{head} Call the caregiver. Reply 1 to acknowledge. Ref {reference}"


def pagerduty_event(
    alert: Alert,
    purpose: PagePurpose,
    *,
    routing_key: str,
    dedup_key: str,
    bundle: Sequence[Alert] = (),
    digest: Sequence[DigestEntry] = (),
) -> dict[str, object]:
    """A PagerDuty Events v2 body; ``dedup_key`` folds a resent event onto the same incident.

    ``acknowledge`` and ``resolve`` carry the ``dedup_key`` the ``trigger`` used, so they land
    on the incident Vigil opened. A bundle triggers one incident that lists every alert.
    """
    action = _PD_ACTION.get(purpose, "trigger")
    event: dict[str, object] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key,
    }
    if action == "trigger":
        if digest:
            event["payload"] = {
                "summary": digest_subject(digest)[:1024],
                "severity": _PD_SEVERITY[bundle_priority(tuple(a.priority for a, _ in digest))],
                "source": f"vigil:{alert.device_id}",
                "custom_details": {
                    "quiet_hours_digest": True,
                    "dedup_keys": [a.dedup_key for a, _ in digest],
                    "resolved_at": {
                        a.dedup_key: at.isoformat() for a, at in digest if at is not None
                    },
                },
            }
            return event
        if len(bundle) > 1:
            event["payload"] = {
                "summary": bundle_subject(bundle)[:1024],
                "severity": _PD_SEVERITY[bundle_priority(tuple(a.priority for a in bundle))],
                "source": f"vigil:{alert.device_id}",
                "custom_details": {
                    "patient_id": alert.patient_id,
                    "codes": [a.code for a in bundle],
                    "alert_ids": [str(a.alert_id) for a in bundle],
                    "dedup_keys": [a.dedup_key for a in bundle],
                },
            }
            return event
        event["payload"] = {
            "summary": page_subject(alert, purpose)[:1024],
            "severity": _PD_SEVERITY[alert.priority],
            "source": f"vigil:{alert.device_id}",
            "custom_details": {
                "patient_id": alert.patient_id,
                "code": alert.code,
                "alert_id": str(alert.alert_id),
            },
        }
    return event


_PD_ACTION: Final = {
    PagePurpose.ALL_CLEAR: "resolve",
    PagePurpose.UPSTREAM_RESOLVE: "resolve",
    PagePurpose.UPSTREAM_ACKNOWLEDGE: "acknowledge",
}


_PD_SEVERITY: Final = {
    AlertPriority.HIGH: "critical",
    AlertPriority.MEDIUM: "error",
    AlertPriority.LOW: "warning",
    AlertPriority.INFO: "info",
}
