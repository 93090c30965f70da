"""What the family at home is told, and when: pure, no clock, no I/O.

When an alarm pages the care team, each caregiver contact of the patient who consented is told,
in their language, what was noticed (a high temperature, an infusion pump alarm, a home device
gone silent, readings lost), that the care team is being alerted, and what to do meanwhile.
When a clinician acknowledges, they are told the team has seen it and who will call; when the
escalation is exhausted with nobody acknowledging, to call the unit's 24-hour number; when the
alarm ends, that it is over. ``happenings`` reads what happened from the escalation engine's
timeline entries; ``decide`` says, per contact, what is sent, or why nothing is.

No message carries a name of the child, a diagnosis or a reading: only what kind of alarm, its
clock time in the care team's zone, and, after an acknowledgement, the first name of who will
call. A family is not flooded by a flapping alarm (``decide``'s limits).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from email.message import EmailMessage
from enum import StrEnum
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.notify.domain.escalation import TimelineEntry
from services.notify.domain.message import message_id_for
from services.notify.domain.routing import EMAIL, SMS


class Category(StrEnum):
    """The alarms a family is told of, by the rule that raised them."""

    FEVER = "fever"
    PUMP_ALARM = "pump_alarm"
    DEVICE_SILENT = "device_silent"
    DATA_LOST = "data_lost"
    # A caregiver's own request for a call (an SMS reply CALL or HELP): the alert notify raises
    # for it (``service_layer/caregiver_calls.py``) carries this rule id.
    CALL_REQUEST = "caregiver.call"


def category_of(rule_id: str) -> Category | None:
    """The family's word for an alert of rule ``rule_id``; None: the family is not told (the
    care team's own clocks and checks: bag, interruption, sensor fault, pipeline)."""
    try:
        return Category(rule_id)
    except ValueError:
        return None


class Happening(StrEnum):
    """What a caregiver message is about (``caregiver_messages.kind``)."""

    PAGED = "paged"
    ACKNOWLEDGED = "acknowledged"
    EXHAUSTED = "exhausted"
    ALL_CLEAR = "all_clear"


#: Only the acknowledgement and the all clear wait for a contact's preferred hours; being told
#: the care team was alerted, or that nobody answered, never waits.
NON_URGENT: Final = frozenset({Happening.ACKNOWLEDGED, Happening.ALL_CLEAR})

LANGUAGES: Final = ("en", "fr", "es")

#: A contact told of an alarm of the patient less than this long ago, whose escalation is still
#: open, is not told of another: the care team is already coming about that child.
OPEN_ALARM_GAP: Final = timedelta(minutes=10)
#: At most this many alarm messages per contact and patient within ``FLAP_WINDOW``.
MAX_ALARMS_PER_WINDOW: Final = 3
FLAP_WINDOW: Final = timedelta(hours=1)


def happenings(timeline: Sequence[TimelineEntry], *, round_no: int) -> tuple[Happening, ...]:
    """What one transition of the escalation engine means for the family, in order: its first
    page (the first step of the first pass, not after a snooze), an acknowledgement, the chain
    exhausted, the alarm resolved. Repeats, escalation notices and snoozes tell them nothing."""
    found: list[Happening] = []
    for entry in timeline:
        if entry.kind == "step_fired":
            if round_no == 0 and entry.detail.get("step") == 0 and entry.detail.get("pass") == 0:
                found.append(Happening.PAGED)
        elif entry.kind == "acknowledged":
            found.append(Happening.ACKNOWLEDGED)
        elif entry.kind == "exhausted":
            found.append(Happening.EXHAUSTED)
        elif entry.kind == "resolved":
            found.append(Happening.ALL_CLEAR)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class CaregiverContact:
    contact_id: uuid.UUID
    language: str
    sms: str | None = None
    email: str | None = None
    # Consent recorded and not withdrawn.
    consented: bool = True
    # Preferred hours for non-urgent messages, local to the care team's zone; None: any time.
    preferred_from: time | None = None
    preferred_until: time | None = None


@dataclass(frozen=True, slots=True)
class PriorAlarm:
    """An alarm message sent to a contact about the same patient: when, and whether its
    escalation is still open (nobody acknowledged, not resolved)."""

    at: datetime
    still_open: bool


@dataclass(frozen=True, slots=True)
class Situation:
    """What ``decide`` needs beyond the contacts; ``at`` is when it is decided."""

    happening: Happening
    category: Category
    alarm_at: datetime  # the alert's device time: what the message calls "at 03:12"
    at: datetime
    zone: str = "UTC"
    unit_phone: str | None = None
    # First name of who acknowledged (who will call); None: "someone from the care team".
    caller: str | None = None
    # First-response guidance configured for this alarm, by language (none: the default words).
    guidance: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class CaregiverMessage:
    contact_id: uuid.UUID
    channel: str  # "sms" or "email"
    address: str
    happening: Happening
    language: str
    subject: str
    body: str
    # Later than ``at`` when it waits for the contact's preferred hours.
    due_at: datetime


@dataclass(frozen=True, slots=True)
class NotTold:
    contact_id: uuid.UUID
    reason: str


def decide(
    situation: Situation,
    contacts: Sequence[CaregiverContact],
    *,
    told_of_this: frozenset[uuid.UUID] = frozenset(),
    prior_alarms: Mapping[uuid.UUID, Sequence[PriorAlarm]] | None = None,
) -> tuple[tuple[CaregiverMessage, ...], tuple[NotTold, ...]]:
    """The messages to send for one happening of one escalation, one per contact and channel
    (SMS and e-mail both when the contact has both), and the contacts not told, with why.

    - Nobody without consent (never given, or withdrawn) is told anything.
    - ``PAGED``: every consenting contact, except one told of another alarm of the patient less
      than ``OPEN_ALARM_GAP`` ago that is still open, or told of ``MAX_ALARMS_PER_WINDOW``
      alarms of the patient within ``FLAP_WINDOW`` (``prior_alarms``, per contact).
    - ``ACKNOWLEDGED``, ``EXHAUSTED``, ``ALL_CLEAR``: only the contacts told of this alarm
      (``told_of_this``): a family never hears "it is over" about an alarm it was not told of.
    - ``ACKNOWLEDGED`` and ``ALL_CLEAR`` outside a contact's preferred hours wait for them.
    """
    prior_alarms = prior_alarms or {}
    sent: list[CaregiverMessage] = []
    skipped: list[NotTold] = []
    for contact in contacts:
        reason = _why_not(situation, contact, told_of_this, prior_alarms.get(contact.contact_id))
        if reason is not None:
            skipped.append(NotTold(contact.contact_id, reason))
            continue
        language = contact.language if contact.language in LANGUAGES else "en"
        subject, body = compose(situation, language)
        due_at = situation.at
        if situation.happening in NON_URGENT:
            due_at = preferred_start(
                situation.at, situation.zone, contact.preferred_from, contact.preferred_until
            )
        for channel, address in ((SMS, contact.sms), (EMAIL, contact.email)):
            if address:
                sent.append(
                    CaregiverMessage(
                        contact_id=contact.contact_id,
                        channel=channel,
                        address=address,
                        happening=situation.happening,
                        language=language,
                        subject=subject,
                        body=body,
                        due_at=due_at,
                    )
                )
    return tuple(sent), tuple(skipped)


def _why_not(
    situation: Situation,
    contact: CaregiverContact,
    told_of_this: frozenset[uuid.UUID],
    prior: Sequence[PriorAlarm] | None,
) -> str | None:
    if not contact.consented:
        return "no consent"
    if not (contact.sms or contact.email):
        return "no address"
    if situation.happening is not Happening.PAGED:
        if contact.contact_id not in told_of_this:
            return "not told of this alarm"
        return None
    if situation.category is Category.CALL_REQUEST:
        return None  # the family asked: never held by the limits
    at = situation.at
    for alarm in prior or ():
        if alarm.still_open and at - alarm.at < OPEN_ALARM_GAP:
            minutes = int((at - alarm.at).total_seconds() // 60)
            return f"told of an open alarm of this patient {minutes} min ago"
    recent = [a for a in prior or () if at - a.at < FLAP_WINDOW]
    if len(recent) >= MAX_ALARMS_PER_WINDOW:
        return (
            f"told of {len(recent)} alarms of this patient in the last "
            f"{int(FLAP_WINDOW.total_seconds() // 60)} min"
        )
    return None


def preferred_start(at: datetime, zone: str, start: time | None, end: time | None) -> datetime:
    """``at`` when it is inside the preferred hours (``start`` to ``end``, local to ``zone``; a
    window may cross midnight; none set: any time), else the next time they begin."""
    if start is None or end is None or start == end:
        return at
    tz = _zone(zone)
    local = at.astimezone(tz)
    now = local.timetz().replace(tzinfo=None)
    inside = start <= now < end if start < end else (now >= start or now < end)
    if inside:
        return at
    day = local.date()
    candidate = datetime.combine(day, start, tzinfo=tz)
    if candidate <= local:
        candidate = datetime.combine(day + timedelta(days=1), start, tzinfo=tz)
    return candidate.astimezone(at.tzinfo)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _clock(at: datetime, zone: str) -> str:
    local = at.astimezone(_zone(zone))
    return f"{local:%H:%M} {local.tzname()}"


# -- the words ---------------------------------------------------------------------------------

_WHAT: Final[dict[str, dict[Category, str]]] = {
    "en": {
        Category.FEVER: "a high temperature",
        Category.PUMP_ALARM: "an alarm from the infusion pump",
        Category.DEVICE_SILENT: "that a home device has stopped sending",
        Category.DATA_LOST: "that readings from a home device were lost",
        Category.CALL_REQUEST: "your request for a call",
    },
    "fr": {
        Category.FEVER: "une température élevée",
        Category.PUMP_ALARM: "une alarme de la pompe de perfusion",
        Category.DEVICE_SILENT: "qu'un appareil à domicile n'envoie plus rien",
        Category.DATA_LOST: "que des mesures d'un appareil à domicile ont été perdues",
        Category.CALL_REQUEST: "votre demande d'appel",
    },
    "es": {
        Category.FEVER: "una temperatura alta",
        Category.PUMP_ALARM: "una alarma de la bomba de infusión",
        Category.DEVICE_SILENT: "que un aparato de casa ha dejado de enviar datos",
        Category.DATA_LOST: "que se perdieron mediciones de un aparato de casa",
        Category.CALL_REQUEST: "su solicitud de llamada",
    },
}

_SUBJECT: Final[dict[str, dict[Happening, str]]] = {
    "en": {
        Happening.PAGED: "Vigil: your care team is being alerted",
        Happening.ACKNOWLEDGED: "Vigil: your care team has seen the alert",
        Happening.EXHAUSTED: "Vigil: please call the unit now",
        Happening.ALL_CLEAR: "Vigil: the alert is over",
    },
    "fr": {
        Happening.PAGED: "Vigil : votre équipe soignante est alertée",
        Happening.ACKNOWLEDGED: "Vigil : votre équipe soignante a vu l'alerte",
        Happening.EXHAUSTED: "Vigil : appelez le service maintenant",
        Happening.ALL_CLEAR: "Vigil : l'alerte est terminée",
    },
    "es": {
        Happening.PAGED: "Vigil: su equipo médico está siendo avisado",
        Happening.ACKNOWLEDGED: "Vigil: su equipo médico ha visto la alerta",
        Happening.EXHAUSTED: "Vigil: llame a la unidad ahora",
        Happening.ALL_CLEAR: "Vigil: la alerta ha terminado",
    },
}

_DEFAULT_GUIDANCE: Final[dict[str, str]] = {
    "en": "Stay with your child and keep your phone at hand. If your child seems very unwell, "
    "call the emergency number.",
    "fr": "Restez auprès de votre enfant et gardez votre téléphone à portée de main. Si votre "
    "enfant semble très mal, appelez le numéro d'urgence.",
    "es": "Quédese con su hijo o hija y tenga el teléfono a mano. Si parece muy enfermo, llame "
    "al número de emergencias.",
}


def compose(situation: Situation, language: str) -> tuple[str, str]:
    """Subject and body of one message in ``language`` (the body is the SMS as well)."""
    what = _WHAT[language][situation.category]
    when = _clock(situation.alarm_at, situation.zone)
    subject = _SUBJECT[language][situation.happening]
    happening = situation.happening
    if happening is Happening.PAGED and situation.category is Category.CALL_REQUEST:
        body = {
            "en": f"Your care team has been asked to call you (request of {when}). "
            f"{_DEFAULT_GUIDANCE['en']}",
            "fr": f"Votre équipe soignante a été invitée à vous appeler (demande de {when}). "
            f"{_DEFAULT_GUIDANCE['fr']}",
            "es": f"Se ha pedido a su equipo médico que le llame (solicitud de las {when}). "
            f"{_DEFAULT_GUIDANCE['es']}",
        }[language]
    elif happening is Happening.PAGED:
        guidance = (situation.guidance or {}).get(language) or _DEFAULT_GUIDANCE[language]
        body = {
            "en": f"Vigil noticed {what} at {when}. Your care team is being alerted. {guidance}",
            "fr": f"Vigil a détecté {what} à {when}. Votre équipe soignante est alertée. "
            f"{guidance}",
            "es": f"Vigil detectó {what} a las {when}. Su equipo médico está siendo avisado. "
            f"{guidance}",
        }[language]
    elif happening is Happening.ACKNOWLEDGED:
        caller = situation.caller
        body = {
            "en": f"Your care team has seen the alert of {when} ({what}). "
            + (
                f"{caller} from the care team will call you."
                if caller
                else "Someone from the care team will call you."
            ),
            "fr": f"Votre équipe soignante a vu l'alerte de {when} ({what}). "
            + (
                f"{caller}, de l'équipe soignante, va vous appeler."
                if caller
                else "Un membre de l'équipe soignante va vous appeler."
            ),
            "es": f"Su equipo médico ha visto la alerta de las {when} ({what}). "
            + (
                f"{caller}, del equipo médico, le llamará."
                if caller
                else "Alguien del equipo médico le llamará."
            ),
        }[language]
    elif happening is Happening.EXHAUSTED:
        phone = situation.unit_phone
        body = {
            "en": f"Your care team has not yet answered the alert of {when} ({what}). "
            + (
                f"Please call the unit's 24-hour number now: {phone}."
                if phone
                else "Please call the unit's 24-hour number now."
            ),
            "fr": f"Votre équipe soignante n'a pas encore répondu à l'alerte de {when} ({what}). "
            + (
                f"Appelez maintenant le numéro du service joignable 24 h/24 : {phone}."
                if phone
                else "Appelez maintenant le numéro du service joignable 24 h/24."
            ),
            "es": f"Su equipo médico aún no ha respondido a la alerta de las {when} ({what}). "
            + (
                f"Llame ahora al número de la unidad, disponible las 24 horas: {phone}."
                if phone
                else "Llame ahora al número de la unidad, disponible las 24 horas."
            ),
        }[language]
    else:
        body = {
            "en": f"The alert of {when} ({what}) is over.",
            "fr": f"L'alerte de {when} ({what}) est terminée.",
            "es": f"La alerta de las {when} ({what}) ha terminado.",
        }[language]
    return subject, body


def compose_caregiver_email(
    subject: str, body: str, *, to: str, sender: str, idempotency_key: str
) -> EmailMessage:
    """The e-mail form of a caregiver message: the same words as the SMS, plain text, a
    Message-ID stable per page (a resent duplicate folds in the mail client)."""
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = to
    message["Message-ID"] = message_id_for(idempotency_key)
    message["X-Vigil-Caregiver"] = "yes"
    message.set_content(
        f"{body}\n\n-- \nVigil home monitoring. This message was sent automatically; "
        "replies by e-mail are not read.\n"
    )
    return message


# -- a caregiver asking for a call -------------------------------------------------------------

#: The words of an SMS reply that ask the care team for a call, in every language (upper case,
#: accents as typed or not).
CALL_WORDS: Final = frozenset({"CALL", "HELP", "APPEL", "AIDE", "LLAMAR", "LLAMADA", "AYUDA"})


def asks_for_call(body: str) -> bool:
    """An SMS reply that is one of ``CALL_WORDS`` (any case, surrounding spaces and a final
    ``.`` or ``!`` ignored)."""
    return body.strip().rstrip(".!").strip().upper() in CALL_WORDS


def call_reply(language: str, outcome: str) -> str:
    """The answer to a caregiver's SMS: ``asked`` (a page to the care team was opened),
    ``already`` (one is open), or ``hint`` (a reply that asks for nothing)."""
    words = {
        "en": {
            "asked": "Your care team has been asked to call you.",
            "already": "Your care team has already been asked to call you.",
            "hint": "Reply CALL to ask your care team to call you.",
        },
        "fr": {
            "asked": "Votre équipe soignante a été invitée à vous appeler.",
            "already": "Votre équipe soignante a déjà été invitée à vous appeler.",
            "hint": "Répondez APPEL pour que votre équipe soignante vous appelle.",
        },
        "es": {
            "asked": "Se ha pedido a su equipo médico que le llame.",
            "already": "Ya se ha pedido a su equipo médico que le llame.",
            "hint": "Responda LLAMAR para que su equipo médico le llame.",
        },
    }
    return words[language if language in words else "en"][outcome]
