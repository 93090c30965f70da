"""The notify alert log (``adapters.postgres``) against a real database.

Runs against the test stack's PostgreSQL (``pg_dsn`` from conftest); the migrations are applied
here too (idempotently). Every test uses its
own patient, alert and page ids, so tests share a database without seeing each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from schemas.events import (
    Alert,
    AlertPhase,
    AlertState,
)
from services.notify.adapters.postgres import PostgresNotifyRepository, alert_from_row
from tests.factories import fever_evidence, make_alert
from vigil.db.migrate import apply_migrations

pytestmark = pytest.mark.stack

T0 = datetime(2025, 3, 1, 2, 0, 0, tzinfo=UTC)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    await apply_migrations(pg_dsn)
    connections = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=4)
    try:
        yield connections
    finally:
        await connections.close()


@pytest.fixture
def repository(pool: Any) -> PostgresNotifyRepository:
    return PostgresNotifyRepository(pool)


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def _alert(patient_id: str, phase: AlertPhase = AlertPhase.START) -> Alert:
    return make_alert(
        patient_id=patient_id,
        code="FEVER_SINGLE",
        phase=phase,
        at=T0 + timedelta(seconds=2),
        alert_id=uuid.uuid4(),
        dedup_key=f"{patient_id}:fever",
        device_id="thermo-17",
        state=AlertState.ACTIVE,
        device_time=T0,
        evidence=(fever_evidence(T0, message_id=uuid.uuid4()),),
        rule_version="2025.03.1",
    )


async def test_alert_record_is_idempotent(repository: PostgresNotifyRepository) -> None:
    """Recording the same alert phase twice stores it once and says the second was not new."""
    alert = _alert(f"P-{_tag()}")
    assert await repository.record_alert(alert) is True
    assert await repository.record_alert(alert) is False


async def test_recorded_alert_reads_back_as_the_same_alert(
    pool: Any, repository: PostgresNotifyRepository
) -> None:
    """``alert_from_row`` gives back exactly the Alert ``record_alert`` stored, evidence
    included (the escalation store composes every page from it)."""
    alert = _alert(f"P-{_tag()}")
    await repository.record_alert(alert)
    row = await pool.fetchrow("SELECT * FROM alerts WHERE alert_id = $1", alert.alert_id)
    assert alert_from_row(row) == alert
