"""Notify's escalation service over PostgreSQL as the integration tests build it: e-mail to the
test's SMTP sink (or the sender it is given), SMS through a Twilio-like server when it is given
one, the units of work over the pool with the same fallback address as the configuration, and
the rest of the configuration as the test says."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from services.notify.adapters.postgres import PostgresNotifyRepository
from services.notify.adapters.postgres.unit_of_work import unit_of_work_factory
from services.notify.adapters.smtp import SmtpSender
from services.notify.adapters.twilio import TwilioSms
from services.notify.domain.escalation import DEFAULT_FALLBACK_EMAIL
from services.notify.service_layer.channels import EventProvider, SmsProvider
from services.notify.service_layer.escalation import EscalationConfig, EscalationService
from services.notify.service_layer.outage import OutageWatch
from services.notify.service_layer.ports import PageSender
from services.notify.service_layer.unit_of_work import UnitOfWorkFactory
from tests.support.notify import TwilioLikeServer

SENDER_ADDRESS = "vigil@localhost"


def smtp_sender(port: int) -> SmtpSender:
    """E-mail to an SMTP server on this machine (the test's sink)."""
    return SmtpSender(host="127.0.0.1", port=port, envelope_from=SENDER_ADDRESS)


def twilio_sms(server: TwilioLikeServer) -> TwilioSms:
    """SMS through the Twilio-like server, from the number the tests expect."""
    return TwilioSms(
        base_url=server.url,
        account_sid=server.account_sid,
        auth_token=server.auth_token,
        from_number="+15550000000",
    )


def escalation_service(
    pool: Any,
    clock: Callable[[], datetime],
    *,
    email: PageSender,
    ack_secret: bytes,
    sms: SmsProvider | None = None,
    webhook: EventProvider | None = None,
    unit_of_work: UnitOfWorkFactory | None = None,
    fallback_email: str = DEFAULT_FALLBACK_EMAIL,
    outages: OutageWatch | None = None,
    **config: Any,
) -> EscalationService:
    """``config``: the other fields of ``EscalationConfig``; ``unit_of_work`` defaults to units
    over ``pool`` paging ``fallback_email`` for a team without an address of its own."""
    return EscalationService(
        unit_of_work=unit_of_work or unit_of_work_factory(pool, fallback_email=fallback_email),
        alerts=PostgresNotifyRepository(pool),
        email=email,
        sms=sms,
        webhook=webhook,
        config=EscalationConfig(
            sender_address=SENDER_ADDRESS,
            public_base_url="http://notify.test",
            ack_secret=ack_secret,
            fallback_email=fallback_email,
            **config,
        ),
        clock=clock,
        outages=outages,
    )


async def seed_email_team(
    pool: Any, *, team: str, person: str, patients: list[str], oncall_email: str
) -> str:
    """A care team whose policy pages one nurse by e-mail (one step, an hour's wait, no
    repeat), and ``patients`` in it; the nurse's address (``<person>@h.test``)."""
    address = f"{person}@h.test"
    await pool.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, $1, $2)",
        team,
        oncall_email,
    )
    await pool.execute(
        "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, 'n', $2)", person, team
    )
    await pool.execute(
        "INSERT INTO contact_methods (person_id, rank, channel, address) "
        "VALUES ($1, 0, 'email', $2)",
        person,
        address,
    )
    steps = [{"wait_s": 3600, "targets": [{"kind": "person", "ref": person}]}]
    await pool.execute(
        "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps, repeat_count) "
        "VALUES ($1, $1, $1, $2::jsonb, 0)",
        team,
        json.dumps(steps),
    )
    await pool.executemany(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)",
        [(patient, team) for patient in patients],
    )
    return address
