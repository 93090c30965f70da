"""A patient's first page: committed before it is handed to the provider, durable before
``handle_alert`` returns (and the alert's Kafka offset may be committed).

The opening transaction commits without waiting for the disk (``_commit_opening``); the commit
that records the page's outcome waits, and PostgreSQL's write-ahead log is flushed in order, so
by then the opening is on disk too. Checked on the database itself: while the e-mail is being
sent, another connection already sees the page claimed and its attempt in flight; when
``handle_alert`` has returned, the log is flushed past where it was written up to during the
send.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import asyncpg
import pytest

from services.notify.service_layer.ports import SendOutcome
from tests.factories import make_alert
from tests.support.escalation import escalation_service, seed_email_team, smtp_sender
from tests.support.notify import ManualClock, SmtpSink
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

SECRET = b"first-page-durable-test-ack-secret-0123456"


class WatchingSender:
    """Sends through the SMTP sink, first noting what another connection sees of the page."""

    def __init__(self, pool: Any, port: int) -> None:
        self._pool = pool
        self._smtp = smtp_sender(port)
        self.seen: list[dict[str, Any]] = []

    async def send(self, message: EmailMessage, *, recipient: str) -> SendOutcome:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """
                SELECT p.status, d.status AS attempt, pg_current_wal_insert_lsn() AS written
                FROM pages p JOIN delivery_attempts d ON d.page_id = p.page_id
                WHERE p.recipient = $1
                """,
                recipient,
            )
        self.seen.append(dict(row) if row is not None else {})
        return await self._smtp.send(message, recipient=recipient)


@pytest.mark.parametrize("group_wait_s", [0.0, 5.0])
async def test_the_first_page_is_committed_before_it_is_sent_and_on_disk_when_handled(
    pg_dsn: str, smtp: SmtpSink, group_wait_s: float
) -> None:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    tag = uuid.uuid4().hex[:8]
    team, person, patient = f"CT-dur-{tag}", f"nurse-dur-{tag}", f"P-dur-{tag}"
    try:
        address = await seed_email_team(
            pool, team=team, person=person, patients=[patient], oncall_email=f"oncall-{tag}@h.test"
        )
        # The wall clock's now: the page's claim runs out only in the future, so no other
        # notify on the shared database takes it meanwhile.
        clock = ManualClock(datetime.now(UTC))
        sender = WatchingSender(pool, smtp.port)
        service = escalation_service(
            pool, clock, email=sender, ack_secret=SECRET, group_wait_s=group_wait_s
        )
        assert await service.handle_alert(make_alert(patient_id=patient, at=clock()))
        flushed = await pool.fetchval("SELECT pg_current_wal_flush_lsn()")
        recorded = await pool.fetchval(
            "SELECT d.status FROM pages p JOIN delivery_attempts d ON d.page_id = p.page_id "
            "WHERE p.recipient = $1",
            address,
        )
    finally:
        await pool.execute("DELETE FROM notify_bundle_windows WHERE patient_id = $1", patient)
        await pool.execute(
            "UPDATE escalations SET status = 'resolved', due_at = NULL WHERE care_team_id = $1",
            team,
        )
        await pool.close()
    assert len(smtp.to(address)) == 1
    assert [(s["status"], s["attempt"]) for s in sender.seen] == [("sending", "in_flight")]
    assert recorded == "sent"
    # asyncpg reads an LSN as an integer position in the log.
    assert flushed >= sender.seen[0]["written"]
