"""Per-patient thresholds from the real PostgreSQL (migration 0004) into a pinned RulesConfig:
the care-team protocol, the patient's override on top, the newest version of each, the weight
and the newest treatment cycle as the profile, and a digest version that follows the content."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.rules.adapters.config_store import load_rules_config
from services.rules.domain.config import Thresholds

pytestmark = pytest.mark.stack

SIGNED = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def seed(conn: asyncpg.Connection, run: str) -> tuple[str, str, str]:
    team, child, other = f"team-{run}", f"P-{run}-child", f"P-{run}-other"
    await conn.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) "
        "VALUES ($1, $1, 'x@example.org')",
        team,
    )
    for patient, weight in ((child, 18.5), (other, 40.0)):
        await conn.execute(
            "INSERT INTO patients (patient_id, care_team_id, weight_kg) VALUES ($1, $2, $3)",
            patient,
            team,
            weight,
        )
    for version, overrides in ((1, {"fever_single_c": 38.5}), (2, {"fever_single_c": 38.2})):
        await conn.execute(
            "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
            "signed_off_at) VALUES ($1, $2, $3::jsonb, 'protocol-board', $4)",
            team,
            version,
            json.dumps(overrides),
            SIGNED,
        )
    await conn.execute(
        "INSERT INTO patient_rule_overrides (patient_id, version, overrides, signed_off_by, "
        "signed_off_at, reason) VALUES ($1, 1, $2::jsonb, 'attending', $3, 'recent CRS')",
        child,
        json.dumps({"interruption_page_minutes": 20}),
        SIGNED,
    )
    for start in (datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC)):
        await conn.execute(
            "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) VALUES ($1, $2, 8)",
            child,
            start,
        )
    return team, child, other


async def cleanup(conn: asyncpg.Connection, team: str, patients: tuple[str, ...]) -> None:
    await conn.execute("DELETE FROM patient_cycles WHERE patient_id = ANY($1)", list(patients))
    await conn.execute(
        "DELETE FROM patient_rule_overrides WHERE patient_id = ANY($1)", list(patients)
    )
    await conn.execute("DELETE FROM rule_protocols WHERE care_team_id = $1", team)
    await conn.execute("DELETE FROM patients WHERE patient_id = ANY($1)", list(patients))
    await conn.execute("DELETE FROM care_teams WHERE care_team_id = $1", team)


async def test_protocol_override_and_profile_resolve_for_each_patient(
    conn: asyncpg.Connection,
) -> None:
    """Newest protocol version for the team, the child's override on top, the other patient
    on the protocol alone; weight and newest cycle start in the profile."""
    run = uuid.uuid4().hex[:8]
    team, child, other = await seed(conn, run)
    try:
        config = await load_rules_config(conn, Thresholds(), allowed_lateness_s=30)
        child_rules = config.thresholds_for(child)
        other_rules = config.thresholds_for(other)
        assert child_rules.fever_single_c == 38.2 and other_rules.fever_single_c == 38.2
        assert child_rules.interruption_page_minutes == 20
        assert other_rules.interruption_page_minutes == 30
        profile = config.profiles[child]
        assert profile.weight_kg == 18.5
        assert profile.cycle_start == datetime(2026, 11, 20, tzinfo=UTC)
        assert config.allowed_lateness_s == 30
        assert config.config_version.startswith("pg-")
        # The pinned config survives a JSON round trip unchanged (what a replay loads).
        assert type(config).model_validate_json(config.model_dump_json()) == config
    finally:
        await cleanup(conn, team, (child, other))


async def test_config_version_follows_the_content(conn: asyncpg.Connection) -> None:
    """A new protocol version gives a new config_version; reloading unchanged rows does not."""
    run = uuid.uuid4().hex[:8]
    team, child, other = await seed(conn, run)
    try:
        first = await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)
        again = await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)
        await conn.execute(
            "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
            'signed_off_at) VALUES ($1, 3, \'{"fever_single_c": 38.0, "fever_sustained_c": '
            "38.0, \"fever_clear_c\": 37.5}'::jsonb, 'protocol-board', $2)",
            team,
            SIGNED,
        )
        changed = await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)
        assert first.config_version == again.config_version
        assert changed.config_version != first.config_version
        assert changed.thresholds_for(other).fever_single_c == 38.0
    finally:
        await cleanup(conn, team, (child, other))


async def test_an_unreadable_override_refuses_to_load(conn: asyncpg.Connection) -> None:
    """An override naming a threshold the rules do not have stops the load: never skipped."""
    run = uuid.uuid4().hex[:8]
    team, child, other = await seed(conn, run)
    try:
        await conn.execute(
            "INSERT INTO patient_rule_overrides (patient_id, version, overrides, signed_off_by, "
            "signed_off_at) VALUES ($1, 2, '{\"fever_singel_c\": 38.0}'::jsonb, 'x', $2)",
            child,
            SIGNED,
        )
        with pytest.raises(ValueError):
            await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)
    finally:
        await cleanup(conn, team, (child, other))
