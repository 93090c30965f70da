"""The family in the loop, end to end: a fever published over MQTT pages the care team, and the
caregiver who consented is told by SMS (the Twilio-shaped server) and e-mail (a real SMTP
server), in French, with the care team's signed-off guidance; the clinician's acknowledgement
and the all clear reach them the same way; a caregiver whose consent was withdrawn hears
nothing; a refused SMS is retried and the retry shows in the delivery log; the caregiver's
number finds no page to acknowledge."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import Message
from typing import Any

import asyncpg
import httpx
import pytest
from aiosmtpd.controller import Controller

from services.notify.adapters.twilio import twilio_signature
from tests.e2e.conftest import (
    MailCollector,
    free_port,
    ops_ports,
    publish,
    register_patient,
    temperature,
    three_services,
    until_all_ready,
)
from tests.polling import eventually
from tests.support.notify import TwilioLikeServer

pytestmark = pytest.mark.stack

HOME_SMS = "+33612345678"
HOME_EMAIL = "home-{run}@family.test"
WITHDRAWN_SMS = "+33612345679"
CALLER_SMS = "+33612345670"
UNIT_PHONE = "+33140000000"
FEVER_GUIDANCE = "Déshabillez légèrement votre enfant et reprenez sa température dans 15 minutes."


@dataclass
class FamilyPipeline:
    mail: MailCollector
    twilio: TwilioLikeServer
    run_id: str
    # notify's HTTP API (Twilio's webhooks), served in-process.
    notify_url: str


@pytest.fixture(scope="module")
def twilio() -> Iterator[TwilioLikeServer]:
    with TwilioLikeServer() as server:
        yield server


@pytest.fixture(scope="module")
async def family(
    stack_env: dict[str, str], twilio: TwilioLikeServer
) -> AsyncIterator[FamilyPipeline]:
    """Ingest, rules and notify against the test stack, notify with SMS through the
    Twilio-shaped server and e-mail through a real SMTP server."""
    from pydantic import SecretStr

    from services.ingest.settings import IngestSettings
    from services.notify.settings import NotifySettings
    from services.rules.settings import RulesSettings

    run_id = uuid.uuid4().hex[:8]
    mail = MailCollector()
    mail.bind(asyncio.get_running_loop())
    controller = Controller(mail, hostname="127.0.0.1", port=free_port())
    controller.start()
    ports = ops_ports()
    api_port = free_port()
    notify_url = f"http://127.0.0.1:{api_port}"
    ingest = IngestSettings(
        mqtt_client_id=f"ingest-family-{run_id}",
        mqtt_share_group=f"ingest-family-{run_id}",
        metrics_port=ports["ingest"],
    )
    rules = RulesSettings(group_id=f"rules-family-{run_id}", ops_port=ports["rules"])
    notify = NotifySettings(
        smtp_port=controller.port,
        group_id=f"notify-family-{run_id}",
        ops_port=ports["notify"],
        twilio_base_url=twilio.url,
        twilio_account_sid=twilio.account_sid,
        twilio_auth_token=SecretStr(twilio.auth_token),
        twilio_from="+15550000000",
        api_enabled=True,
        api_port=api_port,
        public_base_url=notify_url,
    )
    try:
        async with three_services(stack_env, ingest, rules, notify) as tasks:
            await until_all_ready(tasks, ports)
            await eventually(
                lambda: _serving(notify_url), timeout_s=30, what="notify's API to serve"
            )
            yield FamilyPipeline(mail=mail, twilio=twilio, run_id=run_id, notify_url=notify_url)
    finally:
        controller.stop()


async def _serving(url: str) -> bool:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as client:
            return (await client.get("/openapi.json")).status_code == 200
    except httpx.HTTPError:
        return False


async def _sms_reply(family: FamilyPipeline, sender: str, body: str) -> str:
    """An SMS reply as Twilio posts it to notify, signed; returns the TwiML message."""
    form = {"From": sender, "Body": body, "MessageSid": "SM" + uuid.uuid4().hex}
    path = "/twilio/sms"
    signature = twilio_signature(family.twilio.auth_token, family.notify_url + path, form)
    async with httpx.AsyncClient(base_url=family.notify_url, timeout=30) as client:
        response = await client.post(path, data=form, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200, response.text
    found = re.search(r"<Message>(.*)</Message>", response.text)
    assert found is not None
    return html.unescape(found.group(1))


async def _family_of(dsn: str, run_id: str, patient: str, team: str, sms: str = HOME_SMS) -> str:
    """A consenting French-speaking caregiver (``sms`` and e-mail), one whose consent was
    withdrawn, the unit's 24-hour number, the fever guidance and a nurse who will acknowledge
    (the last three once per team); returns the nurse's person id."""
    now = datetime.now(UTC)
    nurse = f"nurse-{run_id}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, 'Ana Martin', $2) "
            "ON CONFLICT DO NOTHING",
            nurse,
            team,
        )
        for number, email, withdrawn in (
            (sms, HOME_EMAIL.format(run=run_id) if sms == HOME_SMS else None, None),
            (WITHDRAWN_SMS, None, now),
        ):
            await conn.execute(
                """
                INSERT INTO caregiver_contacts (contact_id, patient_id, care_team_id, sms, email,
                    language, consent_by, consent_at, withdrawn_by, withdrawn_at, created_at,
                    updated_by, updated_at)
                VALUES ($1, $2, $3, $4, $5, 'fr', 'charge-nurse', $6, $7, $8, $6,
                        'charge-nurse', $6)
                """,
                uuid.uuid4(),
                patient,
                team,
                number,
                email,
                now,
                None if withdrawn is None else "charge-nurse",
                withdrawn,
            )
        # The care team's signed-off guidance for a fever, in French (proposed by one person,
        # approved by another: docs/caregivers.md).
        await conn.execute(
            "INSERT INTO caregiver_guidance (care_team_id, alarm, language, version, text, "
            "proposed_by, signed_off_by, signed_off_at) VALUES ($1, 'fever', 'fr', 1, $2, "
            "'charge-nurse', 'second-nurse', $3) ON CONFLICT DO NOTHING",
            team,
            FEVER_GUIDANCE,
            now,
        )
        await conn.execute(
            "INSERT INTO caregiver_team_settings (care_team_id, unit_phone, updated_by, "
            "updated_at) VALUES ($1, $2, 'charge-nurse', $3) ON CONFLICT DO NOTHING",
            team,
            UNIT_PHONE,
            now,
        )
    finally:
        await conn.close()
    return nurse


def _home_mail(family: FamilyPipeline) -> list[Message]:
    to = HOME_EMAIL.format(run=family.run_id)
    return [m for m in family.mail.messages if m["To"] == to]


def _subject(message: Message) -> str:
    return str(make_header(decode_header(message["Subject"])))


def _body(message: Message) -> str:
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


async def test_caregiver_told_on_page_acknowledgement_and_all_clear(
    family: FamilyPipeline, stack_env: dict[str, str]
) -> None:
    dsn = stack_env["VIGIL_PG_DSN"]
    patient, device, oncall = await register_patient(dsn, family.run_id, "family")
    team = f"team-e2e-{family.run_id}"
    nurse = await _family_of(dsn, family.run_id, patient, team)
    # The first SMS to the family is refused by the provider (a 5xx): it is retried.
    refused: list[str] = []

    def respond(form: dict[str, str]) -> tuple[int, str]:
        if form.get("To") == HOME_SMS and not refused:
            refused.append(form["Body"])
            return 503, "service unavailable"
        return 201, "queued"

    family.twilio.respond = respond

    topic = f"vigil/v1/dev/{device}/temperature"
    await publish(stack_env, topic, temperature(device, 38.6, 1))
    await eventually(
        lambda: family.mail.for_patient(patient),
        timeout_s=60,
        interval_s=0.1,
        what="the care team's fever page",
    )
    await eventually(
        lambda: family.twilio.sent_to(HOME_SMS) and _home_mail(family),
        timeout_s=60,
        interval_s=0.1,
        what="the family told by SMS (after one refusal) and e-mail",
    )
    assert family.mail.for_patient(patient)[0]["To"] == oncall
    sms = family.twilio.sent_to(HOME_SMS)[0]["body"]
    assert refused and refused[0] == sms  # the retry sends the same words
    assert sms.startswith("Vigil a détecté une température élevée à ")
    assert f"Votre équipe soignante est alertée. {FEVER_GUIDANCE} (Ref " in sms
    mail = _home_mail(family)[0]
    assert _subject(mail) == "Vigil : votre équipe soignante est alertée"
    assert "Votre équipe soignante est alertée." in _body(mail)
    for words in (sms, _body(mail), _subject(mail)):
        assert patient not in words and device not in words and "38.6" not in words
    assert family.twilio.sent_to(WITHDRAWN_SMS) == []

    from services.notify.adapters.postgres.escalations import PostgresEscalations
    from services.notify.public import AlertActions

    conn = await asyncpg.connect(dsn)
    try:
        # The family's number finds no page to acknowledge: a reply "1" from it is not a
        # clinician's acknowledgement.
        escalations = PostgresEscalations(conn)
        assert await escalations.open_paged_to("sms", HOME_SMS) is None
        dedup_key = await conn.fetchval(
            "SELECT dedup_key FROM escalations WHERE patient_id = $1", patient
        )
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            assert await AlertActions(pool).acknowledge(
                dedup_key, f"person:{nurse}", datetime.now(UTC)
            )
        finally:
            await pool.close()
        await eventually(
            lambda: len(family.twilio.sent_to(HOME_SMS)) >= 2 and len(_home_mail(family)) >= 2,
            timeout_s=30,
            interval_s=0.1,
            what="the family told of the acknowledgement",
        )
        ack = family.twilio.sent_to(HOME_SMS)[1]["body"]
        assert "Votre équipe soignante a vu l'alerte de " in ack
        assert "Ana, de l'équipe soignante, va vous appeler." in ack
        assert "Martin" not in ack

        await publish(stack_env, topic, temperature(device, 37.0, 2))
        await eventually(
            lambda: len(family.twilio.sent_to(HOME_SMS)) >= 3 and len(_home_mail(family)) >= 3,
            timeout_s=60,
            interval_s=0.1,
            what="the family's all clear",
        )
        clear = family.twilio.sent_to(HOME_SMS)[2]["body"]
        assert "(une température élevée) est terminée." in clear
        assert _subject(_home_mail(family)[2]) == "Vigil : l'alerte est terminée"

        # Every message is in the outbox's record, the timeline and the audit log.
        pages = await conn.fetch(
            "SELECT p.channel, p.status, p.route, m.kind, p.tries FROM pages p "
            "JOIN caregiver_messages m USING (page_id) WHERE p.patient_id = $1 "
            "ORDER BY m.created_at, p.channel DESC",
            patient,
        )
        assert [(r["kind"], r["channel"]) for r in pages] == [
            ("paged", "sms"),
            ("paged", "email"),
            ("acknowledged", "sms"),
            ("acknowledged", "email"),
            ("all_clear", "sms"),
            ("all_clear", "email"),
        ]
        assert {r["route"] for r in pages} == {"caregiver"}
        await eventually(
            lambda: _all_sent(dsn, patient),
            timeout_s=30,
            interval_s=0.2,
            what="every caregiver page recorded sent",
        )
        attempts = await conn.fetch(
            "SELECT a.status FROM delivery_attempts a JOIN pages p USING (page_id) "
            "WHERE p.patient_id = $1 AND p.route = 'caregiver' AND p.channel = 'sms' "
            "ORDER BY a.at, a.attempt",
            patient,
        )
        assert [r["status"] for r in attempts][:2] == ["failed", "sent"]
        events = await conn.fetch(
            "SELECT v.kind, v.detail ->> 'kind' AS told FROM escalation_events v "
            "JOIN escalations e USING (escalation_id) WHERE e.patient_id = $1 "
            "AND v.kind LIKE 'caregiver%' ORDER BY v.event_id",
            patient,
        )
        told = [(r["kind"], r["told"]) for r in events]
        assert ("caregiver_told", "paged") in told
        assert ("caregiver_told", "acknowledged") in told
        assert ("caregiver_told", "all_clear") in told
        assert ("caregiver_not_told", "paged") in told  # the withdrawn consent, with why
        audited = await conn.fetch(
            "SELECT details ->> 'kind' AS kind FROM audit_log "
            "WHERE action = 'notify.caregiver_message' AND subject = $1",
            f"patient:{patient}",
        )
        assert sorted(r["kind"] for r in audited) == sorted(
            ["paged", "paged", "acknowledged", "acknowledged", "all_clear", "all_clear"]
        )
    finally:
        await conn.close()
        family.twilio.respond = lambda form: (201, "queued")


async def _all_sent(dsn: str, patient: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        statuses: list[Any] = await conn.fetch(
            "SELECT status FROM pages WHERE patient_id = $1 AND route = 'caregiver'", patient
        )
    finally:
        await conn.close()
    return bool(statuses) and all(r["status"] in ("sent", "delivered") for r in statuses)


async def test_caregiver_asks_for_a_call(family: FamilyPipeline, stack_env: dict[str, str]) -> None:
    """A caregiver's reply AIDE pages the care team about a call of its own, and the family is
    told it was asked; a second request opens nothing; "1" from the family acknowledges
    nothing."""
    dsn = stack_env["VIGIL_PG_DSN"]
    patient, _device, oncall = await register_patient(dsn, family.run_id, "call")
    team = f"team-e2e-{family.run_id}"
    await _family_of(dsn, family.run_id, patient, team, sms=CALLER_SMS)

    assert await _sms_reply(family, CALLER_SMS, "aide") == (
        "Votre équipe soignante a été invitée à vous appeler."
    )
    await eventually(
        lambda: family.mail.for_patient(patient),
        timeout_s=30,
        interval_s=0.1,
        what="the care team paged about the call request",
    )
    page = family.mail.for_patient(patient)[0]
    assert page["To"] == oncall and "Caregiver asks for a call" in _subject(page)
    await eventually(
        lambda: family.twilio.sent_to(CALLER_SMS),
        timeout_s=30,
        interval_s=0.1,
        what="the family told the care team was asked",
    )
    told = family.twilio.sent_to(CALLER_SMS)[0]["body"]
    assert told.startswith("Votre équipe soignante a été invitée à vous appeler (demande de ")

    assert await _sms_reply(family, CALLER_SMS, "CALL") == (
        "Votre équipe soignante a déjà été invitée à vous appeler."
    )
    assert (await _sms_reply(family, CALLER_SMS, "1")).startswith("Répondez APPEL")
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT e.status, a.rule_id FROM escalations e JOIN alerts a USING (alert_id) "
            "WHERE e.patient_id = $1",
            patient,
        )
        assert [(r["status"], r["rule_id"]) for r in rows] == [("open", "caregiver.call")]
        kinds = [
            r["kind"]
            for r in await conn.fetch(
                "SELECT v.kind FROM escalation_events v JOIN escalations e USING (escalation_id) "
                "WHERE e.patient_id = $1 ORDER BY v.event_id",
                patient,
            )
        ]
        assert "caregiver_told" in kinds and "caregiver_call_repeated" in kinds
        audited = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = 'notify.caregiver_call_requested' "
            "AND subject = $1",
            f"patient:{patient}",
        )
        assert audited == 1
        # Stop this chain: later tests share the escalations table.
        await conn.execute(
            "UPDATE escalations SET status = 'resolved', due_at = NULL WHERE patient_id = $1",
            patient,
        )
    finally:
        await conn.close()
