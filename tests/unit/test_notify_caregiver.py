"""What the family at home is told (services/notify/domain/caregiver.py): which happenings of an
escalation reach them, who is told and who is not (and why), the words in each language, the
flapping limits and the preferred hours."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pytest

from services.api.service_layer.caregivers import CAREGIVER_LANGUAGES
from services.notify.domain.caregiver import (
    LANGUAGES,
    CaregiverContact,
    Category,
    Happening,
    PriorAlarm,
    Situation,
    asks_for_call,
    call_reply,
    category_of,
    compose,
    compose_caregiver_email,
    decide,
    happenings,
    preferred_start,
)
from services.notify.domain.escalation import (
    Acknowledge,
    PolicySnapshot,
    Resolve,
    Snooze,
    StepSnapshot,
    Target,
    Tick,
    TimelineEntry,
    advance,
    opened,
)
from services.notify.domain.routing import (
    Recipient,
    RecipientKind,
    after_failure,
)

T0 = datetime(2026, 1, 15, 2, 0, tzinfo=UTC)
MUM = uuid.UUID(int=1)
DAD = uuid.UUID(int=2)


def contact(contact_id: uuid.UUID = MUM, **kw: object) -> CaregiverContact:
    fields: dict[str, object] = {"language": "en", "sms": "+441632960001"}
    fields.update(kw)
    return CaregiverContact(contact_id=contact_id, **fields)  # type: ignore[arg-type]


def situation(happening: Happening = Happening.PAGED, **kw: object) -> Situation:
    fields: dict[str, object] = {
        "happening": happening,
        "category": Category.PUMP_ALARM,
        "alarm_at": T0,
        "at": T0 + timedelta(seconds=5),
        "zone": "Europe/Paris",
        "unit_phone": "+33100000000",
    }
    fields.update(kw)
    return Situation(**fields)  # type: ignore[arg-type]


def policy(repeats: int = 0) -> PolicySnapshot:
    return PolicySnapshot(
        policy_id="p",
        steps=(StepSnapshot(targets=(Target("email", "nurse@unit.test"),), wait_s=300),),
        repeat_count=repeats,
    )


# -- what an escalation's transitions mean for the family ------------------------------------


def test_first_page_is_paged_and_repeats_are_not() -> None:
    snapshot = policy(repeats=2)
    first = advance(snapshot, opened(T0), Tick(now=T0))
    assert happenings(first.timeline, round_no=0) == (Happening.PAGED,)
    second = advance(snapshot, first.state, Tick(now=T0 + timedelta(minutes=5)))
    assert happenings(second.timeline, round_no=second.state.round_no) == ()


def test_acknowledged_exhausted_and_resolved_are_told() -> None:
    snapshot = policy(repeats=0)
    first = advance(snapshot, opened(T0), Tick(now=T0))
    # One step, no repeat: the first page also exhausts the chain.
    assert happenings(first.timeline, round_no=0) == (Happening.PAGED, Happening.EXHAUSTED)
    acked = advance(snapshot, first.state, Acknowledge(by="person:ana", at=T0, via="api"))
    assert happenings(acked.timeline, round_no=0) == (Happening.ACKNOWLEDGED,)
    again = advance(snapshot, acked.state, Acknowledge(by="person:bo", at=T0, via="api"))
    assert happenings(again.timeline, round_no=0) == ()  # ack_repeated tells nobody
    resolved = advance(snapshot, acked.state, Resolve(at=T0 + timedelta(minutes=9)))
    assert happenings(resolved.timeline, round_no=0) == (Happening.ALL_CLEAR,)


def test_first_step_after_a_snooze_is_not_a_new_alarm() -> None:
    snapshot = policy(repeats=3)
    first = advance(snapshot, opened(T0), Tick(now=T0))
    snoozed = advance(
        snapshot,
        first.state,
        Snooze(until=T0 + timedelta(minutes=10), at=T0 + timedelta(minutes=1), by="person:ana"),
    )
    later = advance(snapshot, snoozed.state, Tick(now=T0 + timedelta(minutes=10)))
    assert later.state.round_no == 1
    assert happenings(later.timeline, round_no=later.state.round_no) == ()


def test_unrelated_entries_tell_nothing() -> None:
    assert happenings((TimelineEntry("worsened", {"told": []}),), round_no=0) == ()


@pytest.mark.parametrize(
    ("rule_id", "category"),
    [
        ("fever", Category.FEVER),
        ("pump_alarm", Category.PUMP_ALARM),
        ("device_silent", Category.DEVICE_SILENT),
        ("data_lost", Category.DATA_LOST),
        ("bag_clock", None),
        ("interruption_clock", None),
        ("sensor_fault", None),
        ("notify.heartbeat", None),
    ],
)
def test_only_the_four_family_alarms_are_told(rule_id: str, category: Category | None) -> None:
    assert category_of(rule_id) is category


# -- who is told ------------------------------------------------------------------------------


def test_paged_tells_every_consenting_contact_on_each_channel() -> None:
    both = contact(MUM, email="mum@home.test")
    sent, skipped = decide(situation(), [both, contact(DAD, language="fr")])
    assert [(m.contact_id, m.channel) for m in sent] == [(MUM, "sms"), (MUM, "email"), (DAD, "sms")]
    assert skipped == ()
    assert all(m.due_at == T0 + timedelta(seconds=5) for m in sent)
    assert sent[2].language == "fr" and "alertée" in sent[2].body


def test_no_consent_is_never_told() -> None:
    sent, skipped = decide(situation(), [contact(consented=False)])
    assert sent == ()
    assert [(s.contact_id, s.reason) for s in skipped] == [(MUM, "no consent")]
    sent, skipped = decide(
        situation(Happening.EXHAUSTED), [contact(consented=False)], told_of_this=frozenset({MUM})
    )
    assert sent == () and skipped[0].reason == "no consent"


def test_a_contact_without_address_is_not_told() -> None:
    sent, skipped = decide(situation(), [contact(sms=None, email=None)])
    assert sent == () and skipped[0].reason == "no address"


def test_no_contacts_no_messages() -> None:
    assert decide(situation(), []) == ((), ())


@pytest.mark.parametrize(
    "happening", [Happening.ACKNOWLEDGED, Happening.EXHAUSTED, Happening.ALL_CLEAR]
)
def test_follow_ups_go_only_to_those_told_of_the_alarm(happening: Happening) -> None:
    sent, skipped = decide(
        situation(happening), [contact(MUM), contact(DAD)], told_of_this=frozenset({MUM})
    )
    assert [m.contact_id for m in sent] == [MUM]
    assert [(s.contact_id, s.reason) for s in skipped] == [(DAD, "not told of this alarm")]


def test_an_open_alarm_told_minutes_ago_holds_the_next_one() -> None:
    at = T0 + timedelta(minutes=4)
    prior = {MUM: [PriorAlarm(at=T0, still_open=True)]}
    sent, skipped = decide(situation(at=at), [contact()], prior_alarms=prior)
    assert sent == ()
    assert skipped[0].reason == "told of an open alarm of this patient 4 min ago"
    # Once that alarm was acknowledged or ended, a new one is told.
    sent, _ = decide(
        situation(at=at), [contact()], prior_alarms={MUM: [PriorAlarm(at=T0, still_open=False)]}
    )
    assert len(sent) == 1
    # And an open alarm told longer ago than the gap does not hold it either.
    sent, _ = decide(situation(at=T0 + timedelta(minutes=10)), [contact()], prior_alarms=prior)
    assert len(sent) == 1


def test_a_flapping_alarm_is_told_at_most_three_times_an_hour() -> None:
    at = T0 + timedelta(minutes=50)
    three = [PriorAlarm(at=T0 + timedelta(minutes=m), still_open=False) for m in (0, 15, 30)]
    sent, skipped = decide(situation(at=at), [contact()], prior_alarms={MUM: three})
    assert sent == ()
    assert skipped[0].reason == "told of 3 alarms of this patient in the last 60 min"
    # An hour after the first, it is told again.
    sent, _ = decide(
        situation(at=T0 + timedelta(minutes=61)), [contact()], prior_alarms={MUM: three}
    )
    assert len(sent) == 1
    # The limits hold only the alarm itself: the follow-ups of an alarm told still go.
    sent, _ = decide(
        situation(Happening.ALL_CLEAR, at=at),
        [contact()],
        told_of_this=frozenset({MUM}),
        prior_alarms={MUM: three},
    )
    assert len(sent) == 1


# -- the words --------------------------------------------------------------------------------


def test_paged_words_say_what_when_and_that_the_team_was_alerted() -> None:
    subject, body = compose(situation(), "en")
    assert subject == "Vigil: your care team is being alerted"
    assert body.startswith(
        "Vigil noticed an alarm from the infusion pump at 03:00 CET. "
        "Your care team is being alerted."
    )
    assert "emergency number" in body


def test_configured_guidance_replaces_the_default() -> None:
    guided = situation(guidance={"en": "Check the pump line for kinks."})
    assert compose(guided, "en")[1].endswith("Check the pump line for kinks.")
    # A language without configured guidance keeps the default words.
    assert "urgence" in compose(guided, "fr")[1]


def test_acknowledged_names_who_will_call() -> None:
    named = compose(situation(Happening.ACKNOWLEDGED, caller="Ana"), "en")[1]
    assert named.endswith("Ana from the care team will call you.")
    anonymous = compose(situation(Happening.ACKNOWLEDGED), "es")[1]
    assert anonymous.endswith("Alguien del equipo médico le llamará.")


def test_exhausted_gives_the_unit_number() -> None:
    body = compose(situation(Happening.EXHAUSTED), "en")[1]
    assert body.endswith("Please call the unit's 24-hour number now: +33100000000.")
    without = compose(situation(Happening.EXHAUSTED, unit_phone=None), "fr")[1]
    assert without.endswith("Appelez maintenant le numéro du service joignable 24 h/24.")


def test_all_clear_names_the_alarm_it_clears() -> None:
    body = compose(situation(Happening.ALL_CLEAR, category=Category.FEVER), "en")[1]
    assert body == "The alert of 03:00 CET (a high temperature) is over."


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("happening", list(Happening))
@pytest.mark.parametrize("category", list(Category))
def test_no_message_carries_patient_data(
    language: str, happening: Happening, category: Category
) -> None:
    subject, body = compose(situation(happening, category=category, caller="Ana"), language)
    text = f"{subject} {body}"
    assert "P-" not in text and "°" not in text
    assert not re.search(r"\d+\.\d", text)  # no reading
    assert len(body) <= 320  # two SMS segments at most


def test_the_api_and_notify_know_the_same_languages() -> None:
    assert CAREGIVER_LANGUAGES == LANGUAGES
    migration = Path(__file__).parents[2] / "vigil/db/migrations/0040_caregivers.sql"
    assert "language IN ('en', 'fr', 'es')" in migration.read_text()


def test_email_form_has_a_stable_message_id() -> None:
    a = compose_caregiver_email("S", "B", to="x@y.test", sender="v@h.test", idempotency_key="k")
    b = compose_caregiver_email("S", "B", to="x@y.test", sender="v@h.test", idempotency_key="k")
    assert a["Message-ID"] == b["Message-ID"]
    assert a["X-Vigil-Caregiver"] == "yes" and a.get_content().startswith("B\n")


# -- preferred hours --------------------------------------------------------------------------


def test_non_urgent_messages_wait_for_preferred_hours() -> None:
    # 03:00 in Paris; preferred 08:00-21:00.
    preferring = contact(preferred_from=time(8), preferred_until=time(21))
    at = T0
    sent, _ = decide(
        situation(Happening.ALL_CLEAR, at=at), [preferring], told_of_this=frozenset({MUM})
    )
    assert sent[0].due_at == datetime(2026, 1, 15, 7, 0, tzinfo=UTC)  # 08:00 CET
    for urgent in (Happening.PAGED, Happening.EXHAUSTED):
        sent, _ = decide(situation(urgent, at=at), [preferring], told_of_this=frozenset({MUM}))
        assert sent[0].due_at == at


def test_preferred_hours_across_midnight_and_inside() -> None:
    night_owl = (time(20), time(2))
    inside = datetime(2026, 1, 15, 0, 30, tzinfo=UTC)  # 01:30 CET
    assert preferred_start(inside, "Europe/Paris", *night_owl) == inside
    outside = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)  # 10:00 CET
    assert preferred_start(outside, "Europe/Paris", *night_owl) == datetime(
        2026, 1, 15, 19, 0, tzinfo=UTC
    )
    evening = datetime(2026, 1, 15, 21, 0, tzinfo=UTC)  # 22:00 CET, after 08-21
    assert preferred_start(evening, "Europe/Paris", time(8), time(21)) == datetime(
        2026, 1, 16, 7, 0, tzinfo=UTC
    )
    assert preferred_start(evening, "Nowhere/Zone", None, None) == evening


# -- failure --------------------------------------------------------------------------------


def test_a_caregiver_message_that_failed_goes_to_nobody_else() -> None:
    caregiver = Recipient.parse(f"caregiver:{MUM}")
    assert caregiver.kind is RecipientKind.CAREGIVER
    assert after_failure(caregiver, 0, [], next_channel=True) is None


# -- a caregiver asking for a call ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "asks"),
    [
        ("CALL", True),
        (" help! ", True),
        ("Appel", True),
        ("aide.", True),
        ("LLAMAR", True),
        ("ayuda", True),
        ("1", False),
        ("ok", False),
        ("please call", False),
        ("", False),
    ],
)
def test_which_replies_ask_for_a_call(body: str, asks: bool) -> None:
    assert asks_for_call(body) is asks


def test_call_replies_in_the_contact_language() -> None:
    assert call_reply("fr", "asked") == "Votre équipe soignante a été invitée à vous appeler."
    assert call_reply("es", "hint") == "Responda LLAMAR para que su equipo médico le llame."
    assert call_reply("de", "already").startswith("Your care team has already")


def test_a_call_request_is_never_held_and_says_so() -> None:
    at = T0 + timedelta(minutes=2)
    prior = {MUM: [PriorAlarm(at=T0, still_open=True)] * 3}
    request = situation(category=Category.CALL_REQUEST, at=at)
    sent, skipped = decide(request, [contact(), contact(DAD)], prior_alarms=prior)
    assert [m.contact_id for m in sent] == [MUM, DAD] and skipped == ()
    assert sent[0].body.startswith(
        "Your care team has been asked to call you (request of 03:00 CET)."
    )
    ack = compose(situation(Happening.ACKNOWLEDGED, category=Category.CALL_REQUEST), "en")[1]
    assert "(your request for a call)" in ack
    assert category_of("caregiver.call") is Category.CALL_REQUEST
