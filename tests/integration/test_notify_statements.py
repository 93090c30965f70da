"""What one alert costs notify in SQL: the statements a patient's first fever sends to
PostgreSQL, from ``handle_alert`` to its first page recorded sent, counted on the connections
themselves (asyncpg's query logger).

19 with bundling off: three reads on one connection (is there an escalation, the patient's
team, the team's policy) beside the alert logged on another, the escalation opened with its
page claimed in one transaction (the page's words read in one statement: the team's zone and
the episode; committed without waiting for the disk, which takes one SET LOCAL), the outcome
recorded in another. A connection goes back to notify's pool without asyncpg's reset statement
(``bootstrap.keep_session``; it sent one each time, four per alert). 19 with bundling on too:
the same, plus one statement in the opening transaction, the patient's window opened on their
window row, whose lock serialises their placements (``PostgresBundles.claim_window``; the
window is read only when the alert did not open it), and which also turns
``synchronous_commit`` off for the transaction, so no SET LOCAL. asyncpg's own type
introspection, paid once by each connection of the pool, is not counted: with two connections
in use at once, which of them pays it first varies.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from services.notify.bootstrap import keep_session
from tests.factories import make_alert
from tests.support.escalation import escalation_service, seed_email_team, smtp_sender
from tests.support.notify import ManualClock, SmtpSink
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

SECRET = b"statement-count-test-ack-secret-0123456789"


# What asyncpg sends the first time a connection meets a type it has no codec for yet: the
# type query (typeinfo_tree), wrapped in turning JIT off and back (set_config('jit', ...)).
_INTROSPECTION = re.compile(r"typeinfo_tree|set_config\('jit'")


@dataclass(eq=False)  # hashable: asyncpg keeps its query loggers in a set
class Statements:
    """Every statement sent on the pool's connections, in order."""

    sent: list[str] = field(default_factory=list)

    def __call__(self, record: Any) -> None:
        query = " ".join(record.query.split())
        if not _INTROSPECTION.search(query):
            self.sent.append(query)

    def begins(self) -> int:
        return sum(1 for q in self.sent if q.upper().startswith("BEGIN"))

    def resets(self) -> int:
        return sum(1 for q in self.sent if "RESET ALL" in q.upper())


@pytest.fixture
async def counted(pg_dsn: str) -> AsyncIterator[tuple[Any, Statements]]:
    await apply_migrations(pg_dsn)
    statements = Statements()

    async def init(conn: Any) -> None:
        conn.add_query_logger(statements)

    # Notify's own reset (``bootstrap.keep_session``): nothing sent when a connection goes back.
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, init=init, reset=keep_session)
    try:
        yield pool, statements
    finally:
        await pool.close()


async def _team(pool: Any, tag: str, patients: list[str]) -> str:
    team = f"CT-sql-{tag}"
    await seed_email_team(
        pool,
        team=team,
        person=f"nurse-sql-{tag}",
        patients=patients,
        oncall_email=f"oncall-{tag}@h.test",
    )
    return team


async def _close(pool: Any, team: str) -> None:
    await pool.execute(
        "DELETE FROM notify_bundle_windows WHERE patient_id IN "
        "(SELECT patient_id FROM patients WHERE care_team_id = $1)",
        team,
    )
    await pool.execute(
        "UPDATE escalations SET status = 'resolved', due_at = NULL WHERE care_team_id = $1", team
    )


@pytest.mark.parametrize(("group_wait_s", "expected"), [(0.0, 19), (5.0, 19)])
async def test_a_patients_first_fever_costs_the_same_statements(
    counted: tuple[Any, Statements], smtp: SmtpSink, group_wait_s: float, expected: int
) -> None:
    pool, statements = counted
    tag = uuid.uuid4().hex[:8]
    patients = [f"P-sql-{tag}-{i}" for i in range(3)]
    team = await _team(pool, tag, patients)
    # The wall clock's now: the pages' claims run out only in the future, so no other notify
    # on the shared database takes them while this test counts.
    clock = ManualClock(datetime.now(UTC))
    service = escalation_service(
        pool, clock, email=smtp_sender(smtp.port), ack_secret=SECRET, group_wait_s=group_wait_s
    )
    try:
        # The first alert on a fresh pool also pays for asyncpg's type introspection.
        assert await service.handle_alert(make_alert(patient_id=patients[0], at=clock()))
        counts, shapes = [], []
        for patient in patients[1:]:
            statements.sent.clear()
            assert await service.handle_alert(make_alert(patient_id=patient, at=clock()))
            counts.append(len(statements.sent))
            shapes.append((statements.begins(), statements.resets()))
        assert len(smtp.to(f"nurse-sql-{tag}@h.test")) == len(patients)
    finally:
        await _close(pool, team)
    assert counts == [expected, expected], statements.sent
    # Two transactions (open and page; record the outcome); a connection went back to the pool
    # four times (the first reads, the alert logged, the two transactions) without a statement.
    assert shapes == [(2, 0), (2, 0)]
