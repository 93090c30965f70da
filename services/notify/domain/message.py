"""The e-mail a page becomes: subject, plain-text body and the headers that collapse a resent one.

Pure: builds an ``email.message.EmailMessage`` from the alert, the page and the time of
composition passed in; sending it belongs to ``adapters.smtp``. The body is PHI (it carries the
triggering value), so nothing here logs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.events import Alert, AlertPhase, AlertPriority, Evidence, Page
from services.notify.domain.bundling import bundle_priority
from services.notify.domain.routing import PagePurpose, purpose_of

# The right-hand side of every Message-ID; the left-hand side is a digest of the idempotency key.
MESSAGE_ID_DOMAIN: Final = "notify.vigil"

_SUBJECT_PREFIX: Final = {
    PagePurpose.ALERT: "",
    PagePurpose.ESCALATION: "Escalated: ",
}

# A page sent this long after Vigil received the data it speaks of says so in its body.
LATE_AFTER: Final = timedelta(minutes=5)

_ALL_CLEAR_TITLE_PREFIX: Final = "All clear: "


@dataclass(frozen=True, slots=True)
class PageContext:
    """What a page says beyond its alert: the care team's time zone, where the page stands in
    its chain, and what the stored readings add to the evidence.

    ``pass_no`` / ``round_no`` are the page's own (from its idempotency key): pass 0 of round 0
    is the first page, a later pass repeats the chain to the same recipients, a later round
    pages again after a snooze. ``passes`` is the policy's 1 + repeat_count when known.
    ``opened_at`` is when the episode's escalation opened (Vigil's clock). ``cleared_by`` is the
    alert's own ``end`` phase, for an all clear. ``measured`` maps an evidence reading's message
    id to the value and unit the device sent (a thermometer set to °F).
    """

    zone: str = "UTC"
    pass_no: int = 0
    round_no: int = 0
    passes: int | None = None
    opened_at: datetime | None = None
    cleared_by: Alert | None = None
    measured: Mapping[str, tuple[float, str]] = field(default_factory=dict)

    @property
    def is_repeat(self) -> bool:
        return self.pass_no > 0 or self.round_no > 0


FIRST_PAGE: Final = PageContext()


def zone_of(name: str) -> ZoneInfo:
    """The care team's IANA zone; an unknown name falls back to UTC (and then the text says UTC)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def clock_time(at: datetime, zone: str, *, seconds: bool = True) -> str:
    """``2025-03-01 03:00:00 CET (Europe/Paris)``: a time in the care team's zone, the zone
    named; ``2025-03-01 02:00:00 UTC`` for UTC."""
    if at.tzinfo is None:
        raise ValueError("a time shown to a clinician must be timezone-aware")
    tz = zone_of(zone)
    local = at.astimezone(tz)
    text = local.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")
    abbreviation = local.tzname() or tz.key
    if tz.key in ("UTC", "Etc/UTC"):
        return f"{text} UTC"
    return f"{text} {abbreviation} ({tz.key})"


def short_time(at: datetime, zone: str) -> str:
    """``03:00 CET``: for an SMS, the hour and minute in the care team's zone, the zone named."""
    local = at.astimezone(zone_of(zone))
    return f"{local:%H:%M} {local.tzname() or zone}"


def _minutes(delta: timedelta) -> str:
    minutes = int(abs(delta.total_seconds()) // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _repeat_label(context: PageContext) -> str:
    """``Repeat 2 of 3: `` for the subject: which repeat this is, of how many the policy sends."""
    if context.pass_no > 0:
        total = f" of {context.passes - 1}" if context.passes and context.passes > 1 else ""
        return f"Repeat {context.pass_no}{total}: "
    return f"Paged again after snooze {context.round_no}: "


def message_id_for(idempotency_key: str) -> str:
    """A stable Message-ID per page, so a resent duplicate collapses in the clinician's mail client.

    The key holds ``:`` and ``@``, which a Message-ID's left part may not, hence the digest.
    """
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:40]
    return f"<{digest}@{MESSAGE_ID_DOMAIN}>"


def page_subject(
    alert: Alert,
    purpose: PagePurpose,
    *,
    unrouted: bool = False,
    context: PageContext = FIRST_PAGE,
) -> str:
    """``[VIGIL HIGH] Fever 38.6 °C — patient P-0001``, with a prefix for later phases; a repeat
    says which (``[VIGIL HIGH] Repeat 2 of 3: Fever …``); an all clear is
    ``[VIGIL ALL CLEAR] Fever 38.6 °C — patient P-0001`` (no priority: it asks for no action)."""
    if purpose is PagePurpose.ALL_CLEAR:
        title = alert.title.removeprefix(_ALL_CLEAR_TITLE_PREFIX)
        subject = f"[VIGIL ALL CLEAR] {title} — patient {alert.patient_id}"
    else:
        repeat = _repeat_label(context) if context.is_repeat else ""
        subject = (
            f"[VIGIL {alert.priority.value.upper()}] {repeat}"
            f"{_SUBJECT_PREFIX.get(purpose, '')}{alert.title} — patient {alert.patient_id}"
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
    composed_at: datetime | None = None,
    context: PageContext = FIRST_PAGE,
) -> str:
    """Plain text a clinician can act on from a phone at 3 a.m., and an auditor can trace.

    Clock times are in the care team's zone, the zone named. Every relative time is counted from
    a time the page names: the device time of the evidence (the device's clock), or the time the
    page was sent (Vigil's clock), never from a timer or a clock the text does not name.
    """
    lines: list[str] = [_action_line(alert, purpose), ""]
    if purpose is not PagePurpose.ALL_CLEAR and context.is_repeat:
        lines += [_repeat_line(context), ""]
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
    if purpose is PagePurpose.ALL_CLEAR and context.cleared_by is not None:
        cleared = context.cleared_by
        lines += [
            f"Cleared:      {cleared.title}",
            f"Cleared at:   {clock_time(cleared.device_time, context.zone)} (device clock)",
            "Evidence of the all clear:",
            *_evidence_lines(cleared.evidence, context),
            "",
        ]
    if purpose is PagePurpose.ALL_CLEAR:
        lines.append("The alert this clears:")
    lines += [
        *_alert_lines(alert, context, composed_at),
        f"Care team:    {page.care_team_id}",
        f"Page id:      {page.page_id}",
        "",
        "Sent automatically by Vigil. Replies to this address are not read: acknowledge in Vigil.",
    ]
    return "\n".join(lines) + "\n"


def _repeat_line(context: PageContext) -> str:
    if context.pass_no > 0:
        total = f" of {context.passes - 1}" if context.passes and context.passes > 1 else ""
        what = (
            f"REPEAT {context.pass_no}{total}: page {context.pass_no + 1} to you about this "
            "alert; nobody had acknowledged it when this page was sent."
        )
    else:
        what = (
            f"PAGED AGAIN: the snooze ({context.round_no}) ran out and nobody has acknowledged "
            "this alert."
        )
    if context.opened_at is not None:
        what += f" Open since {clock_time(context.opened_at, context.zone)} (first paged)."
    return what


def _alert_lines(
    alert: Alert, context: PageContext = FIRST_PAGE, composed_at: datetime | None = None
) -> list[str]:
    zone = context.zone
    lines = [
        f"Alert:        {alert.title}",
        f"Patient:      {alert.patient_id}",
        f"Device:       {alert.device_id}",
        f"Code:         {alert.code} ({alert.kind.value})",
        f"Priority:     {alert.priority.value}",
        f"Phase:        {alert.phase.value} (state {alert.state.value})",
        f"Device time:  {clock_time(alert.device_time, zone)} by the device's clock "
        f"(sent as {alert.device_time.isoformat()})",
        f"Received:     {clock_time(alert.ingest_time, zone)} by Vigil's clock "
        f"(ingest time {alert.ingest_time.isoformat()})",
    ]
    if composed_at is not None:
        lines.append(f"Sent:         {clock_time(composed_at, zone)} by Vigil's clock")
        late = composed_at - alert.ingest_time
        if late >= LATE_AFTER:
            lines.append(
                f"NOTE:         sent {_minutes(late)} after Vigil received the data this alert "
                "is based on; times below are the device's, not now."
            )
    if context.opened_at is not None:
        lines.append(f"Open since:   {clock_time(context.opened_at, zone)} (first paged)")
    lines += [
        "Evidence:",
        *_evidence_lines(alert.evidence, context),
        f"Rule:         {alert.rule_id} version {alert.rule_version}",
        f"Alert id:     {alert.alert_id}",
        f"Dedup key:    {alert.dedup_key}",
    ]
    return lines


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
    context: PageContext = FIRST_PAGE,
) -> EmailMessage:
    """The full message for one page; ``purpose`` defaults to what the alert's phase calls for.

    An all clear carries its own phase (``end``) and priority (``info``) in the headers, and
    ``X-Vigil-All-Clear: yes``, whichever phase of the alert the page is filed under.
    """
    purpose = purpose or purpose_of(alert.phase)
    if purpose is None:
        raise ValueError(f"phase {alert.phase.value} is recorded only, it has no page to compose")
    if composed_at.tzinfo is None:
        raise ValueError("composed_at must be timezone-aware")
    all_clear = purpose is PagePurpose.ALL_CLEAR

    message = EmailMessage()
    message["From"] = sender
    message["To"] = page.recipient
    message["Subject"] = page_subject(
        alert, purpose, unrouted=route_detail is not None, context=context
    )
    message["Date"] = format_datetime(composed_at)
    message["Message-ID"] = message_id_for(page.idempotency_key)
    # RFC 3834: keeps vacation auto-replies from answering a page and looping.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Vigil-Alert-Id"] = str(alert.alert_id)
    message["X-Vigil-Dedup-Key"] = alert.dedup_key
    if all_clear:
        message["X-Vigil-Priority"] = AlertPriority.INFO.value
        message["X-Vigil-Phase"] = AlertPhase.END.value
        message["X-Vigil-All-Clear"] = "yes"
    else:
        message["X-Vigil-Priority"] = alert.priority.value
        message["X-Vigil-Phase"] = alert.phase.value
        if context.is_repeat:
            message["X-Vigil-Repeat"] = str(context.pass_no)
    message["X-Vigil-Page-Id"] = str(page.page_id)
    if alert.priority is AlertPriority.HIGH and not all_clear:
        # Honoured by common mail clients to flag the message; harmless where ignored.
        message["Importance"] = "high"
        message["X-Priority"] = "1"
    # Quoted-printable keeps "°C" and "—" intact through relays that do not announce 8BITMIME.
    message.set_content(
        page_body(
            alert,
            page,
            purpose,
            route_detail=route_detail,
            ack_url=ack_url,
            note=note,
            composed_at=composed_at,
            context=context,
        ),
        charset="utf-8",
        cte="quoted-printable",
    )
    return message


def bundle_subject(
    alerts: Sequence[Alert], *, unrouted: bool = False, context: PageContext = FIRST_PAGE
) -> str:
    """``[VIGIL HIGH] 3 alerts — patient P-0001: Fever 38.6 °C; Occlusion; Battery low``."""
    priority = bundle_priority(tuple(a.priority for a in alerts))
    titles = "; ".join(a.title for a in alerts)
    repeat = _repeat_label(context) if context.is_repeat else ""
    subject = (
        f"[VIGIL {priority.value.upper()}] {repeat}{len(alerts)} alerts — patient "
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
    context: PageContext = FIRST_PAGE,
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
    if context.is_repeat:
        opening += [_repeat_line(context), ""]
    if ack_url is not None:
        opening += [
            f"ACKNOWLEDGE ALL {len(alerts)} ALERTS (stops further paging): {ack_url}",
            "",
        ]
    return _listing_email(
        alerts,
        page,
        sender=sender,
        subject=bundle_subject(alerts, unrouted=route_detail is not None, context=context),
        composed_at=composed_at,
        priority=priority,
        phase=lead.phase,
        opening=opening,
        route_detail=route_detail,
        sections=[
            (f"--- Alert {number} of {len(alerts)} ---", alert)
            for number, alert in enumerate(alerts, start=1)
        ],
        context=context,
    )


def compose_bundle_sms(
    alerts: Sequence[Alert], *, reference: str, context: PageContext = FIRST_PAGE
) -> str:
    """One SMS for a burst; the reply acknowledges every alert it names."""
    priority = bundle_priority(tuple(a.priority for a in alerts))
    titles = "; ".join(a.title for a in alerts)
    return (
        f"VIGIL {priority.value.upper()}{_sms_repeat(context)}: {len(alerts)} alerts, patient "
        f"{alerts[0].patient_id}: {titles} (from {short_time(alerts[0].device_time, context.zone)}"
        f" device time). Call the caregiver. Reply 1 to acknowledge all. Ref {reference}"
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
    context: PageContext = FIRST_PAGE,
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
        state = (
            "ACTIVE"
            if resolved_at is None
            else f"RESOLVED at {clock_time(resolved_at, context.zone)} by Vigil's clock"
        )
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
        context=context,
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
    context: PageContext = FIRST_PAGE,
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
        lines += [header, *_alert_lines(alert, context, composed_at), ""]
    lines += [
        f"Care team:    {page.care_team_id}",
        f"Page id:      {page.page_id}",
        "",
        "Sent automatically by Vigil. Replies to this address are not read: acknowledge in Vigil.",
    ]
    message.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
    return message


def compose_digest_sms(
    entries: Sequence[DigestEntry], *, reference: str, context: PageContext = FIRST_PAGE
) -> str:
    """One SMS for the quiet-hours digest; the reply acknowledges every alert it names."""
    parts = [
        f"{a.title} ({a.patient_id})"
        + ("" if at is None else f" resolved {short_time(at, context.zone)}")
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


# UCUM codes the rules use, as a clinician reads them.
_UNITS: Final = {"Cel": "°C", "[degF]": "°F", "F": "°F", "C": "°C"}


def _unit(unit: str) -> str:
    return _UNITS.get(unit, unit)


def _fahrenheit(celsius: float) -> float:
    return round(celsius * 9.0 / 5.0 + 32.0, 1)


def _evidence_lines(evidence: Iterable[Evidence], context: PageContext = FIRST_PAGE) -> list[str]:
    """One line per evidence item: value, the limit it crossed, and the device time it was
    measured at (the device's clock, in the care team's zone). A reading the device sent in °F
    is shown as sent, and its limit in °F too, beside the °C the rules compared."""
    lines = []
    for item in evidence:
        unit = _unit(item.unit)
        value = f"{_number(item.value)} {unit}"
        limit = f"{_number(item.limit)} {unit}"
        measured = (
            context.measured.get(str(item.message_id)) if item.message_id is not None else None
        )
        if measured is not None and unit == "°C" and _unit(measured[1]) == "°F":
            value += f" (sent as {_number(measured[0])} °F)"
            limit += f" ({_number(_fahrenheit(item.limit))} °F)"
        lines.append(
            f"  - {item.name}: {value} {item.comparator} limit {limit} "
            f"(device time {clock_time(item.device_time, context.zone)})"
        )
        if item.name == "minutes_to_empty" and item.unit == "min":
            empty = item.device_time + timedelta(minutes=item.value)
            lines.append(
                f"    predicted empty at {clock_time(empty, context.zone, seconds=False)} by the "
                f"pump's clock: {_number(item.value)} min after the device time above"
            )
    return lines or ["  - none recorded"]


def _number(value: float) -> str:
    # Six significant digits read well for °C, mL and mL/h; keep one decimal on whole numbers so
    # 38.0 does not read as a rounded 38.
    text = format(value, ".6g")
    if "." not in text and "e" not in text and "inf" not in text and "nan" not in text:
        text += ".0"
    return text


def _sms_repeat(context: PageContext) -> str:
    if context.pass_no > 0:
        return f" REPEAT {context.pass_no}"
    if context.round_no > 0:
        return " AGAIN"
    return ""


def compose_sms_text(
    alert: Alert, purpose: PagePurpose, *, reference: str, context: PageContext = FIRST_PAGE
) -> str:
    """A page short enough for one or two SMS segments; ``reference`` finds it again later.

    The reference lets a restarted notify ask the SMS provider whether a message it may have sent
    before a crash was accepted, because the provider keeps no idempotency key of its own.
    Times are the device's clock in the care team's zone, the zone named.
    """
    zone = context.zone
    if purpose is PagePurpose.ALL_CLEAR:
        title = alert.title.removeprefix(_ALL_CLEAR_TITLE_PREFIX)
        when = (
            ""
            if context.cleared_by is None
            else f" Cleared {short_time(context.cleared_by.device_time, zone)} device time."
        )
        return f"VIGIL ALL CLEAR: {title}, patient {alert.patient_id}.{when} Ref {reference}"
    head = (
        f"VIGIL {alert.priority.value.upper()}{_sms_repeat(context)}: {alert.title}"
        f"{_sms_fahrenheit(alert, context)}, patient {alert.patient_id}, "
        f"{short_time(alert.device_time, zone)} device time"
    )
    since = (
        f", open since {short_time(context.opened_at, zone)}"
        if context.is_repeat and context.opened_at is not None
        else ""
    )
    return f"{head}{since}. Call the caregiver. Reply 1 to acknowledge. Ref {reference}"


def _sms_fahrenheit(alert: Alert, context: PageContext) -> str:
    """`` (sent as 101.5 °F)`` when the alert's first reading was sent in °F."""
    for item in alert.evidence:
        if item.message_id is None:
            continue
        measured = context.measured.get(str(item.message_id))
        if measured is not None and _unit(measured[1]) == "°F":
            return f" (sent as {_number(measured[0])} °F)"
    return ""


def pagerduty_event(
    alert: Alert,
    purpose: PagePurpose,
    *,
    routing_key: str,
    dedup_key: str,
    bundle: Sequence[Alert] = (),
    digest: Sequence[DigestEntry] = (),
    context: PageContext = FIRST_PAGE,
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
                "summary": bundle_subject(bundle, context=context)[:1024],
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
            "summary": page_subject(alert, purpose, context=context)[:1024],
            "severity": _PD_SEVERITY[alert.priority],
            "source": f"vigil:{alert.device_id}",
            # The alert's device time: PagerDuty's own timestamp is when it got the event.
            "timestamp": alert.device_time.astimezone(UTC).isoformat(),
            "custom_details": _pd_details(alert, context),
        }
    return event


def _pd_details(alert: Alert, context: PageContext) -> dict[str, object]:
    details: dict[str, object] = {
        "patient_id": alert.patient_id,
        "code": alert.code,
        "alert_id": str(alert.alert_id),
        "device_time": f"{clock_time(alert.device_time, context.zone)} (device clock)",
        "evidence": [line.strip() for line in _evidence_lines(alert.evidence, context)],
    }
    if context.is_repeat:
        details["repeat"] = context.pass_no
        if context.opened_at is not None:
            details["open_since"] = clock_time(context.opened_at, context.zone)
    return details


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
