"""Every rules config the rules service loads from PostgreSQL is recorded, so a replay can pin
what was live: the version row (named by its content hash, holding its ``config_version``
label), one ``rules_config.loaded`` audit entry per change of the loaded config, and
``--config-at`` / ``--config-version`` resolving times and alert labels to those rows."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from schemas.events import Telemetry
from services.rules.adapters.config_store import (
    CONFIG_LOADED,
    content_hash,
    load_rules_config,
)
from services.rules.domain.config import RulesConfig, Thresholds
from services.rules.domain.engine import RulesEngine
from tests.integration.test_rules_config_store import bind, unbind
from vigil.runtime import utcnow
from vigil_tools.replay import config_store
from vigil_tools.replay.cli import main as replay_main
from vigil_tools.replay.synthetic import FeverEpisode, course

pytestmark = pytest.mark.stack

SIGNED = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def child(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A patient of a team whose protocol sets fever_single_c 38.2; removed afterwards."""
    run = uuid.uuid4().hex[:8]
    team, patient = f"team-cv-{run}", f"P-cv-{run}"
    await conn.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email)"
        " VALUES ($1, $1, 'x@example.org')",
        team,
    )
    await conn.execute(
        "INSERT INTO patients (patient_id, care_team_id, weight_kg) VALUES ($1, $2, 18.5)",
        patient,
        team,
    )
    await protocol(conn, team, 1, {"fever_single_c": 38.2})
    await bind(conn, patient)
    try:
        yield patient
    finally:
        await unbind(conn, [patient])
        await conn.execute("DELETE FROM patients WHERE patient_id = $1", patient)
        await conn.execute("DELETE FROM rule_protocols WHERE care_team_id = $1", team)
        await conn.execute("DELETE FROM care_teams WHERE care_team_id = $1", team)


async def protocol(
    conn: asyncpg.Connection, team: str, version: int, overrides: dict[str, float]
) -> None:
    await conn.execute(
        "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
        "signed_off_at) VALUES ($1, $2, $3::jsonb, 'protocol-board', $4)",
        team,
        version,
        json.dumps(overrides),
        SIGNED,
    )


async def loaded_entries(conn: asyncpg.Connection, digest: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE action = $1 AND subject = $2",
            CONFIG_LOADED,
            digest,
        )
    )


async def load(conn: asyncpg.Connection) -> RulesConfig:
    return await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)


async def test_a_loaded_config_is_stored_once_and_an_alerts_label_loads_its_thresholds(
    conn: asyncpg.Connection, child: str
) -> None:
    """Loading from PostgreSQL stores the config under its content hash with its label inside
    and audits the load; loading the same rows again writes nothing. The config_version an
    alert carries loads back to the same thresholds the alert was decided with."""
    config = await load(conn)
    digest = content_hash(config)
    row = await conn.fetchrow(
        "SELECT config_version AS label, created_by FROM rules_config_manifests"
        " WHERE content_hash = $1",
        digest,
    )
    assert row is not None and row["label"] == config.config_version
    assert await loaded_entries(conn, digest) >= 1
    before = await loaded_entries(conn, digest)
    again = await load(conn)
    assert content_hash(again) == digest
    assert await loaded_entries(conn, digest) == before

    # A 38.25 °C reading pages under this team's 38.2 protocol (not under the 38.3 default).
    fever = FeverEpisode(timedelta(hours=2), timedelta(minutes=10), 38.25)
    events: list[Telemetry] = course(child, SIGNED, days=0.2, fevers=(fever,), pauses=())
    engine = RulesEngine(config)
    alerts = [a for e in events for a in engine.on_telemetry(e) if a.rule_id == "fever"]
    assert alerts and alerts[0].config_version == config.config_version

    pinned = await config_store.load_config(conn, str(alerts[0].config_version))
    assert pinned.content_hash == digest
    assert pinned.config.thresholds_for(child) == config.thresholds_for(child)
    assert pinned.config.thresholds_for(child).fever_single_c == 38.2


async def test_config_at_picks_the_config_loaded_at_that_time_even_when_one_comes_back(
    conn: asyncpg.Connection,
    child: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Config A is loaded, then B (a new protocol version), then A again (the new version
    withdrawn): ``--config-at`` names A, B and A for the three periods, although A's version
    row is older than B's; the CLI pins the same."""
    team = str(
        await conn.fetchval("SELECT care_team_id FROM patients WHERE patient_id = $1", child)
    )
    first = await load(conn)
    after_first = utcnow()
    await protocol(conn, team, 2, {"fever_single_c": 38.0})
    second = await load(conn)
    after_second = utcnow()
    await conn.execute("DELETE FROM rule_protocols WHERE care_team_id = $1 AND version = 2", team)
    back = await load(conn)
    after_back = utcnow()
    assert content_hash(back) == content_hash(first) != content_hash(second)

    at_first = await config_store.config_at(conn, after_first)
    at_second = await config_store.config_at(conn, after_second)
    at_back = await config_store.config_at(conn, after_back)
    assert at_first.content_hash == content_hash(first)
    assert at_second.content_hash == content_hash(second)
    assert at_second.config.thresholds_for(child).fever_single_c == 38.0
    assert at_back.content_hash == content_hash(first)

    out = tmp_path / "alerts.jsonl"
    code = await asyncio.to_thread(
        replay_main,
        [
            "--archive",
            "--patient",
            child,
            "--partitions",
            "3",
            "--config-at",
            after_second.isoformat(),
            "--no-audit",
            "--out",
            str(out),
        ],
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["config_hash"] == content_hash(second)
