"""The patient's bundling window on a real PostgreSQL (``PostgresBundles.claim_window``): two
notify instances placing alerts of one patient at once open one window, not two; the statement
that opens one also turns ``synchronous_commit`` off for its transaction, and a durable commit
of that transaction turns it back.

Each test runs two transactions on two connections in a fixed order: the first claims the
patient's window and holds its transaction open; the second claims too and is seen waiting for
the first (PostgreSQL reports the backend waiting on a lock); then the first commits (or rolls
back) and the second's outcome is checked. A claim whose read did not see the first
instance's committed window would open a second one and fail these tests.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.notify.adapters.postgres.bundles import PostgresBundles
from services.notify.adapters.postgres.unit_of_work import unit_of_work_factory
from services.notify.domain.bundling import BundleWindow
from tests.factories import make_alert
from tests.polling import eventually
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
GROUP_WAIT = timedelta(seconds=5)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    await apply_migrations(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=3)
    try:
        yield pool
    finally:
        await pool.close()


def _opening(at: datetime) -> BundleWindow:
    return BundleWindow(opened_at=at, closes_at=at + GROUP_WAIT)


async def _waiting_on_a_lock(pool: Any, pid: int) -> None:
    """Returns once the backend ``pid`` waits for a lock."""
    await eventually(
        lambda: pool.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        ),
        timeout_s=10,
        what="the second instance's claim to wait for the first's lock",
    )


async def _race(
    pool: Any, patient: str, first_at: datetime, second_at: datetime, *, first_commits: bool
) -> tuple[bool, tuple[bool, BundleWindow | None, Any]]:
    """The first instance claims, the second claims while the first's transaction is open;
    the first commits (or rolls back), then the second. Returns both outcomes."""
    first_alert = make_alert(patient_id=patient, code="PUMP_OCCLUSION", at=first_at)
    second_alert = make_alert(patient_id=patient, code="INFUSION_STOPPED", at=second_at)
    async with pool.acquire() as first, pool.acquire() as second:
        first_tx = first.transaction()
        await first_tx.start()
        opened_first, _, _ = await PostgresBundles(first).claim_window(
            first_alert, _opening(first_at)
        )
        second_tx = second.transaction()
        await second_tx.start()
        claim = asyncio.create_task(
            PostgresBundles(second).claim_window(second_alert, _opening(second_at))
        )
        try:
            await _waiting_on_a_lock(pool, second.get_server_pid())
            assert not claim.done()
        finally:
            if first_commits:
                await first_tx.commit()
            else:
                await first_tx.rollback()
        outcome = await claim
        await second_tx.commit()
    return opened_first, outcome


async def _window_row(pool: Any, patient: str) -> tuple[datetime, datetime, str]:
    rows = await pool.fetch(
        "SELECT opened_at, closes_at, opened_by FROM notify_bundle_windows WHERE patient_id = $1",
        patient,
    )
    assert len(rows) == 1
    return rows[0]["opened_at"], rows[0]["closes_at"], rows[0]["opened_by"]


async def _cleanup(pool: Any, patient: str) -> None:
    await pool.execute("DELETE FROM notify_bundle_windows WHERE patient_id = $1", patient)


async def test_a_patients_first_burst_on_two_instances_opens_one_window(pool: Any) -> None:
    """No window yet: the first instance inserts it; the second waits for that row, then finds
    the window open (its alert joins the follow-up) instead of opening its own."""
    patient = f"P-race-{uuid.uuid4().hex[:8]}"
    try:
        opened_first, (opened_second, window, follow_up) = await _race(
            pool, patient, T0, T0 + timedelta(seconds=1), first_commits=True
        )
        assert opened_first is True
        assert opened_second is False
        assert window == BundleWindow(opened_at=T0, closes_at=T0 + GROUP_WAIT)
        assert follow_up is None
        assert await _window_row(pool, patient) == (
            T0,
            T0 + GROUP_WAIT,
            f"{patient}:PUMP_OCCLUSION",
        )
    finally:
        await _cleanup(pool, patient)


async def test_a_burst_after_a_closed_window_on_two_instances_opens_one_window(pool: Any) -> None:
    """The patient's last window has closed: the first instance replaces it; the second waits
    for the row's lock, then sees the new window (read after the lock, not the closed one it
    would have seen in a snapshot taken before) and does not replace it again."""
    patient = f"P-race-{uuid.uuid4().hex[:8]}"
    earlier = T0 - timedelta(minutes=10)
    await pool.execute(
        "INSERT INTO notify_bundle_windows (patient_id, opened_at, closes_at, opened_by) "
        "VALUES ($1, $2, $3, $4)",
        patient,
        earlier,
        earlier + GROUP_WAIT,
        f"{patient}:EARLIER",
    )
    try:
        opened_first, (opened_second, window, _) = await _race(
            pool, patient, T0, T0 + timedelta(seconds=1), first_commits=True
        )
        assert (opened_first, opened_second) == (True, False)
        assert window == BundleWindow(opened_at=T0, closes_at=T0 + GROUP_WAIT)
        assert await _window_row(pool, patient) == (
            T0,
            T0 + GROUP_WAIT,
            f"{patient}:PUMP_OCCLUSION",
        )
    finally:
        await _cleanup(pool, patient)


async def test_a_claim_rolled_back_leaves_the_window_to_the_other_instance(pool: Any) -> None:
    """The first instance's transaction rolls back (it crashed, or its alert was a redelivery):
    the second, which waited for it, opens the window itself: a window is never lost to a
    transaction that did not commit."""
    patient = f"P-race-{uuid.uuid4().hex[:8]}"
    second_at = T0 + timedelta(seconds=1)
    try:
        opened_first, (opened_second, window, _) = await _race(
            pool, patient, T0, second_at, first_commits=False
        )
        assert (opened_first, opened_second, window) == (True, True, None)
        assert await _window_row(pool, patient) == (
            second_at,
            second_at + GROUP_WAIT,
            f"{patient}:INFUSION_STOPPED",
        )
    finally:
        await _cleanup(pool, patient)


async def test_the_statement_that_opens_a_window_turns_synchronous_commit_off(pool: Any) -> None:
    """The alert that opens its patient's window is paged at once, and its transaction commits
    without waiting for the disk: the opening statement turns ``synchronous_commit`` off for the
    transaction and says so. An alert that finds the window open (it is held for the
    follow-up, whose placement commits durably) leaves the setting alone."""
    patient = f"P-sync-{uuid.uuid4().hex[:8]}"
    told: list[str] = []
    try:
        async with pool.acquire() as conn:
            default = await conn.fetchval("SHOW synchronous_commit")
            for code, at in (
                ("PUMP_OCCLUSION", T0),
                ("INFUSION_STOPPED", T0 + timedelta(seconds=1)),
            ):
                async with conn.transaction():
                    bundles = PostgresBundles(
                        conn, commit_without_flush=functools.partial(told.append, code)
                    )
                    opened, _, _ = await bundles.claim_window(
                        make_alert(patient_id=patient, code=code, at=at), _opening(at)
                    )
                    setting = await conn.fetchval("SHOW synchronous_commit")
                    assert (opened, setting) == (
                        (True, "off") if code == "PUMP_OCCLUSION" else (False, default)
                    )
            assert await conn.fetchval("SHOW synchronous_commit") == default
        assert told == ["PUMP_OCCLUSION"]
    finally:
        await _cleanup(pool, patient)


async def test_a_unit_of_work_that_opened_a_window_commits_durably_when_asked(
    pg_dsn: str,
) -> None:
    """Inside a unit of work: a commit that need not wait for the disk sends nothing more
    before COMMIT (the window's statement turned the setting off), and a durable commit sets
    ``synchronous_commit`` back to the session's default before COMMIT, so it waits."""
    sent: list[str] = []

    def logged(record: Any) -> None:
        sent.append(" ".join(record.query.split()))

    async def init(conn: Any) -> None:
        conn.add_query_logger(logged)

    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, init=init)
    patients = [f"P-uow-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    try:
        unit_of_work = unit_of_work_factory(pool)
        for patient, durable in zip(patients, (False, True), strict=True):
            async with unit_of_work() as uow:
                opened, _, _ = await uow.bundles.claim_window(
                    make_alert(patient_id=patient, at=T0), _opening(T0)
                )
                assert opened
                await uow.commit(durable=durable)
        # asyncpg tells its query loggers after the fact.
        await eventually(
            lambda: sent.count("COMMIT;") == 2, timeout_s=10, what="both commits to be logged"
        )
        tails: list[list[str]] = []
        for query in sent:
            if query.startswith("INSERT INTO notify_bundle_windows"):
                tails.append([])
            elif tails and "COMMIT;" not in tails[-1]:
                tails[-1].append(query)
        assert tails == [["COMMIT;"], ["SET LOCAL synchronous_commit TO DEFAULT", "COMMIT;"]]
    finally:
        for patient in patients:
            await _cleanup(pool, patient)
        await pool.close()
