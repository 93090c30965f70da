"""End to end on the real stack: a fever on cycle day 2 (the cytokine-release-syndrome window)
published over MQTT pages the care team's on-call address and its on-call physician at once, and
both again after the team's shorter early-cycle acknowledgement wait, not the usual 5 minutes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message

import asyncpg
import pytest

from tests.e2e.conftest import Pipeline, publish, register_patient, temperature
from tests.polling import eventually

pytestmark = pytest.mark.stack

#: The team's early-cycle acknowledgement wait; its usual chain (no policy of its own: the
#: on-call address) waits 300 s between pages.
EARLY_WAIT_S = 10


@dataclass
class CrsPatient:
    patient: str
    device: str
    team: str
    oncall: str
    physician: str


@pytest.fixture(scope="module")
async def crs_patient(stack_env: dict[str, str]) -> AsyncIterator[CrsPatient]:
    """A patient on cycle day 2 (step-up on day 8) whose team pages its on-call physician too,
    at once, on early-cycle fevers, and waits EARLY_WAIT_S for an acknowledgement."""
    dsn = stack_env["VIGIL_PG_DSN"]
    tag = uuid.uuid4().hex[:8]
    patient, device, oncall = await register_patient(dsn, tag, "crs")
    team = f"team-e2e-{tag}"
    physician = f"physician-{tag}@hospital.test"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) VALUES ($1, $2, 8)",
            patient,
            datetime.now(UTC) - timedelta(days=1, hours=2),
        )
        await conn.execute(
            "INSERT INTO people (person_id, name, care_team_id) "
            "VALUES ($1, 'On-call physician', $2)",
            f"physician-{tag}",
            team,
        )
        await conn.execute(
            "INSERT INTO contact_methods (person_id, rank, channel, address) "
            "VALUES ($1, 0, 'email', $2)",
            f"physician-{tag}",
            physician,
        )
        await conn.execute(
            "INSERT INTO escalation_early_cycle (care_team_id, ack_wait_s, extra_targets, "
            "updated_at, updated_by) VALUES ($1, $2, $3::jsonb, now(), 'person:e2e-lead-nurse')",
            team,
            EARLY_WAIT_S,
            json.dumps([{"kind": "person", "ref": f"physician-{tag}"}]),
        )
    finally:
        await conn.close()
    try:
        yield CrsPatient(patient, device, team, oncall, physician)
    finally:
        # Stop this chain: it would page every few seconds for other notify instances ticking
        # the shared table.
        conn = await asyncpg.connect(dsn)
        try:
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
                team,
            )
        finally:
            await conn.close()


@pytest.fixture(scope="module")
async def pipeline(crs_patient: CrsPatient, pipeline: Pipeline) -> Pipeline:
    """The shared pipeline, started after the patient's cycle is on record, so the rules load
    it with their configuration at start-up."""
    return pipeline


def _to(pipeline: Pipeline, patient: str, address: str) -> list[Message]:
    return [m for m in pipeline.mail.for_patient(patient) if m["To"] == address]


async def test_day_two_fever_pages_both_targets_at_once_then_again_after_the_short_wait(
    pipeline: Pipeline, stack_env: dict[str, str], crs_patient: CrsPatient
) -> None:
    crs = crs_patient
    await publish(
        stack_env, f"vigil/v1/dev/{crs.device}/temperature", temperature(crs.device, 38.6, 1)
    )

    await eventually(
        lambda: (
            _to(pipeline, crs.patient, crs.oncall) and _to(pipeline, crs.patient, crs.physician)
        ),
        timeout_s=60,
        interval_s=0.1,
        what="the day-2 fever page to the on-call address and the physician",
    )
    for page in (
        _to(pipeline, crs.patient, crs.oncall)[0],
        _to(pipeline, crs.patient, crs.physician)[0],
    ):
        body = page.get_payload(decode=True).decode()  # type: ignore[union-attr]
        assert "cycle day 2: CRS window" in body
        assert f"acknowledge within {EARLY_WAIT_S} s" in body
        assert "38.6" in body

    await eventually(
        lambda: (
            len(_to(pipeline, crs.patient, crs.oncall)) >= 2
            and len(_to(pipeline, crs.patient, crs.physician)) >= 2
        ),
        timeout_s=60,
        interval_s=0.1,
        what="the repeat page after the early-cycle wait",
    )
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        rows = await conn.fetch(
            "SELECT recipient, created_at FROM pages WHERE patient_id = $1 "
            "AND purpose = 'alert' ORDER BY created_at, recipient",
            crs.patient,
        )
        snapshot = json.loads(
            await conn.fetchval(
                "SELECT snapshot FROM escalations WHERE patient_id = $1", crs.patient
            )
        )
    finally:
        await conn.close()
    sent: dict[str, list[datetime]] = {}
    for row in rows:
        sent.setdefault(row["recipient"], []).append(row["created_at"])
    # Both paged by the same step, in the same transaction: at once.
    assert sent[crs.oncall][0] == sent[crs.physician][0]
    assert sent[crs.oncall][1] == sent[crs.physician][1]
    gap = (sent[crs.oncall][1] - sent[crs.oncall][0]).total_seconds()
    # Not before the early-cycle wait, and long before the usual chain's 300 s.
    assert EARLY_WAIT_S <= gap < 60, gap

    assert snapshot["policy_id"] == f"default:{crs.team}+early-cycle"
    assert snapshot["early_cycle"]["cycle_day"] == 2
    assert snapshot["early_cycle"]["ack_wait_s"] == EARLY_WAIT_S
    assert [s["wait_s"] for s in snapshot["steps"]] == [EARLY_WAIT_S]
