"""Notify's operations endpoint against the real stack: the service started as ``vigil notify``
runs it (in this process, its consumer group starting at the end of the alerts topic, a real
SMTP server, the API embedded, the ops server on a free port). ``/readyz`` turns ready; one
alert for a team without a policy (the single on-call page) and one for a team with a policy
(an escalation, then acknowledged by the signed link in its e-mail, through the embedded API)
move the counters scraped over HTTP by
exactly what they should, and no label value names a patient or device of the test.

The exact deltas assume no other alert reaches the shared alerts topic while this test runs
(tests run one at a time on a stack)."""

from __future__ import annotations

import asyncio
import email
import re
import socket
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.events import Alert
from schemas.kafka_topics import ALERTS_TOPIC
from services.notify.settings import NotifySettings
from tests.factories import make_alert
from tests.ops_scrape import Samples, http_get, label_values, scrape, value
from tests.polling import eventually
from tests.support.notify import SmtpSink
from tests.support.notify_desk import NotifyDesk
from vigil.kafka import encode, make_producer
from vigil.settings import KafkaSettings

pytestmark = pytest.mark.stack


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_group_at_end(bootstrap: str, group: str) -> None:
    """Commit ``group``'s offsets at the alerts topic's end: notify reads only this test's."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([ALERTS_TOPIC])
    finally:
        await admin.close()
    partitions = [TopicPartition(ALERTS_TOPIC, p["partition"]) for p in described["partitions"]]
    committer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await committer.start()
    try:
        committer.assign(partitions)
        await committer.commit(await committer.end_offsets(partitions))
    finally:
        await committer.stop()


def fever(patient: str) -> Alert:
    return make_alert(
        patient_id=patient,
        code="fever_single",
        at=datetime.now(UTC),
        dedup_key=f"{patient}:fever_single:{uuid.uuid4().hex[:6]}",
        rule_id="fever",
    )


async def test_notify_metrics_move_with_two_pages_and_an_ack_and_readyz_turns_ready(
    stack_env: dict[str, str], pg_dsn: str
) -> None:
    """Two alerts (single page; escalation) give +2 received, +2 e-mail attempts 'sent', +2
    pages sent, +2 first-attempt latencies; the open escalation is counted; acknowledging it
    by the link in the nurse's e-mail observes one acknowledgement latency via 'link'."""
    from services.notify.app import run as run_notify

    run = uuid.uuid4().hex[:8]
    plain_team, policy_team = f"CT-opsplain-{run}", f"CT-opspol-{run}"
    plain_patient, policy_patient = f"P-opsplain-{run}", f"P-opspol-{run}"
    oncall, nurse = f"oncall-{run}@h.test", f"nurse-{run}@h.test"
    api_port = free_port()
    kafka = KafkaSettings()
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) VALUES ($1, $1, $2)",
        plain_team,
        oncall,
    )
    await conn.execute(
        "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", plain_patient, plain_team
    )
    with SmtpSink() as smtp:
        settings = NotifySettings(
            smtp_port=smtp.port,
            group_id=f"notify-opstest-{run}",
            client_id=f"notify-opstest-{run}",
            group_wait_s=0,
            api_enabled=True,
            api_port=api_port,
            public_base_url=f"http://127.0.0.1:{api_port}",
            ops_port=0,
        )
        await start_group_at_end(kafka.bootstrap_servers, settings.group_id)
        stop = asyncio.Event()
        port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        service = asyncio.create_task(run_notify(settings, stop, listening=port.set_result))
        producer = make_producer(kafka, f"notify-opstest-{run}")
        await producer.start()

        def alive() -> None:
            if service.done():
                service.result()  # surface a failure of the service as the error it is

        async def page() -> Samples:
            alive()
            return await scrape(ops_port)

        try:
            ops_port = await asyncio.wait_for(port, 30)

            async def ready() -> bool:
                alive()
                return (await http_get(ops_port, "/readyz"))[0] == 200

            await eventually(ready, timeout_s=60, interval_s=0.25, what="/readyz to turn ready")
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as api,
                asyncpg.create_pool(pg_dsn, min_size=1, max_size=2) as pool,
            ):
                await eventually(
                    _answers(api), timeout_s=60, interval_s=0.25, what="the embedded API"
                )
                desk = NotifyDesk(pool)
                await desk.care_team(policy_team, oncall_email=oncall)
                await desk.person(
                    f"nurse-{run}",
                    name="nurse",
                    care_team_id=policy_team,
                    contact_methods=[{"channel": "email", "address": nurse}],
                )
                await conn.execute(
                    "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)",
                    policy_patient,
                    policy_team,
                )
                await desk.policy(
                    policy_team,
                    {
                        "policy_id": f"pol-{run}",
                        "name": "onc",
                        "steps": [
                            {
                                "targets": [{"kind": "person", "ref": f"nurse-{run}"}],
                                "wait_minutes": 30,
                            }
                        ],
                        "repeat_count": 0,
                    },
                )
                before = await page()
                plain, escalated = fever(plain_patient), fever(policy_patient)
                for alert in (plain, escalated):
                    await producer.send_and_wait(
                        ALERTS_TOPIC, encode(alert), key=alert.patient_id.encode()
                    )

                async def both_paged() -> bool:
                    alive()
                    return bool(smtp.to(oncall)) and bool(smtp.to(nurse))

                await eventually(
                    both_paged, timeout_s=60, interval_s=0.25, what="both pages by e-mail"
                )

                async def counted() -> Samples | None:
                    now = await page()
                    sent = _delta(now, before, "vigil_notify_pages_sent_total", channel="email")
                    return now if sent >= 2 else None

                after = await eventually(
                    counted, timeout_s=60, interval_s=0.25, what="both pages to be counted"
                )
                received = {"kind": "physiological", "priority": "high", "phase": "start"}
                assert _delta(after, before, "vigil_notify_alerts_received_total", **received) == 2
                attempts = "vigil_notify_delivery_attempts_total"
                assert _delta(after, before, attempts, channel="email", status="sent") == 2
                assert _delta(after, before, attempts, channel="email", status="failed") == 0
                assert _delta(after, before, "vigil_notify_pages_sent_total", channel="email") == 2
                latencies = "vigil_notify_first_attempt_seconds_count"
                assert _delta(after, before, latencies) == 2

                async def escalation_counted() -> bool:
                    return value(await page(), "vigil_notify_open_escalations") >= 1

                # Polled every 5 s; other tests' open escalations may add to it, never subtract.
                await eventually(
                    escalation_counted,
                    timeout_s=60,
                    interval_s=0.25,
                    what="the open escalation to be counted",
                )

                payload = email.message_from_bytes(smtp.to(nurse)[0]).get_payload(decode=True)
                text = payload.decode()  # type: ignore[union-attr]
                link = re.search(rf"http://127\.0\.0\.1:{api_port}(/ack/\S+)", text)
                assert link is not None, text
                response = await api.post(link.group(1))
                assert response.status_code == 200, response.text
                assert "Acknowledged" in response.text
                acked = await page()
                acks = "vigil_notify_ack_seconds_count"
                assert _delta(acked, before, acks, via="link") == 1
                for forbidden in (plain_patient, policy_patient, "thermo-", oncall, nurse):
                    assert not any(forbidden in v for v in label_values(acked)), forbidden
                assert (await http_get(ops_port, "/readyz"))[0] == 200
        finally:
            await producer.stop()
            stop.set()
            await asyncio.wait_for(asyncio.gather(service, return_exceptions=True), 30)
            await _cleanup(conn, policy_team)
            await conn.close()
    if not service.cancelled():
        service.result()


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def _answers(api: httpx.AsyncClient) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        try:
            await api.get("/ack/nothing")
        except httpx.TransportError:
            return False
        return True

    return probe


async def _cleanup(conn: Any, care_team_id: str) -> None:
    """Close this test's escalation so no later ticker on the shared table pages it again."""
    await conn.execute(
        """
        WITH closed AS (
            UPDATE escalations SET status = 'resolved', due_at = NULL
            WHERE care_team_id = $1 RETURNING escalation_id
        )
        UPDATE pages SET status = 'cancelled', next_attempt_at = NULL
        WHERE escalation_id IN (SELECT escalation_id FROM closed)
          AND status IN ('queued', 'failed', 'sending')
        """,
        care_team_id,
    )
