"""Per-patient thresholds from the real PostgreSQL (migration 0004) into a pinned RulesConfig:
the care-team protocol, the patient's override on top, the newest version of each, the weight
and the newest treatment cycle as the profile, and a digest version that follows the content.
Only monitored patients (a binding open or closed lately, or a recent cycle) are in it."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.rules.adapters.config_store import (
    CONFIG_LOADED,
    RulesConfigSource,
    content_hash,
    load_rules_config,
)
from services.rules.domain.config import Thresholds
from vigil.audit.store import APPEND_LOCK_KEY

pytestmark = pytest.mark.stack

SIGNED = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def bind(
    conn: asyncpg.Connection,
    patient: str,
    *,
    ago: timedelta = timedelta(days=1),
    closed_ago: timedelta | None = None,
) -> None:
    """Bind a thermometer of the patient's own (open, or closed ``closed_ago`` back)."""
    device = f"thermo-{patient}"
    now = datetime.now(UTC)
    await conn.execute(
        "INSERT INTO devices (device_id, kind) VALUES ($1, 'thermometer') ON CONFLICT DO NOTHING",
        device,
    )
    await conn.execute(
        "INSERT INTO device_bindings (device_id, patient_id, valid_from, valid_to)"
        " VALUES ($1, $2, $3, $4)",
        device,
        patient,
        now - ago,
        None if closed_ago is None else now - closed_ago,
    )


async def unbind(conn: asyncpg.Connection, patients: list[str]) -> None:
    await conn.execute("DELETE FROM device_bindings WHERE patient_id = ANY($1)", patients)
    await conn.execute(
        "DELETE FROM devices WHERE device_id = ANY($1)", [f"thermo-{p}" for p in patients]
    )


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
        await bind(conn, patient)
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
    await unbind(conn, list(patients))
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


async def test_a_reload_builds_nothing_while_the_rows_are_unchanged_and_sees_every_change(
    conn: asyncpg.Connection,
) -> None:
    """The reload path: unchanged rows give back the last config without building it; a change
    to any row a config is made of (protocol, override, weight, team, cycle, step-up day) is
    a new config, never the old one kept."""
    run = uuid.uuid4().hex[:8]
    team, child, other = await seed(conn, run)
    second_team = f"team-{run}-b"
    await conn.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) "
        "VALUES ($1, $1, 'x@example.org')",
        second_team,
    )
    try:
        source = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
        current = await source.load(conn)
        assert await source.load(conn) is current
        assert source.skipped == 1
        changes = [
            (
                "INSERT INTO rule_protocols (care_team_id, version, overrides, signed_off_by, "
                "signed_off_at) VALUES ($1, 3, '{\"fever_single_c\": 38.4}'::jsonb, 'b', $2)",
                team,
                SIGNED,
            ),
            (
                "INSERT INTO patient_rule_overrides (patient_id, version, overrides, "
                "signed_off_by, signed_off_at) VALUES "
                "($1, 2, '{\"interruption_page_minutes\": 15}'::jsonb, 'a', $2)",
                child,
                SIGNED,
            ),
            ("UPDATE patients SET weight_kg = 19.0 WHERE patient_id = $1", child),
            ("UPDATE patients SET care_team_id = $2 WHERE patient_id = $1", other, second_team),
            (
                "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) "
                "VALUES ($1, $2, 8)",
                other,
                datetime(2026, 11, 21, tzinfo=UTC),
            ),
            ("UPDATE patient_cycles SET step_up_day = 9 WHERE patient_id = $1", other),
        ]
        for sql, *args in changes:
            await conn.execute(sql, *args)
            changed = await source.load(conn)
            assert changed is not current, sql
            assert changed.config_version != current.config_version, sql
            assert source.skipped == 1, sql
            current = changed
        assert current.thresholds_for(child).interruption_page_minutes == 15
        assert current.profiles[other].care_team_id == second_team
        assert current.profiles[other].step_up_day == 9
        # Unchanged again after the last change: skipped again.
        assert await source.load(conn) is current
        assert source.skipped == 2
    finally:
        await conn.execute("DELETE FROM patient_cycles WHERE patient_id = $1", other)
        await conn.execute(
            "UPDATE patients SET care_team_id = $2 WHERE patient_id = $1", other, team
        )
        await cleanup(conn, team, (child, other))
        await conn.execute("DELETE FROM care_teams WHERE care_team_id = $1", second_team)


async def test_a_load_whose_recording_failed_is_built_and_recorded_by_the_next(
    conn: asyncpg.Connection, pg_dsn: str
) -> None:
    """A config that could not be recorded (the audit log's append lock held past the
    statement timeout) still loads; the next reload of the same rows builds it again and
    records it, instead of skipping it as already loaded."""
    run = uuid.uuid4().hex[:8]
    team, child, other = await seed(conn, run)
    holder = await asyncpg.connect(pg_dsn)
    try:
        source = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
        await holder.execute("SELECT pg_advisory_lock($1)", APPEND_LOCK_KEY)
        await conn.execute("SET statement_timeout = '500ms'")
        try:
            unrecorded = await source.load(conn)
        finally:
            await conn.execute("RESET statement_timeout")
            await holder.execute("SELECT pg_advisory_unlock($1)", APPEND_LOCK_KEY)
        digest = content_hash(unrecorded)
        count_loaded = "SELECT count(*) FROM audit_log WHERE action = $1 AND subject = $2"
        assert await conn.fetchval(count_loaded, CONFIG_LOADED, digest) == 0
        again = await source.load(conn)
        assert source.skipped == 0
        assert again.config_version == unrecorded.config_version
        assert await conn.fetchval(count_loaded, CONFIG_LOADED, digest) == 1
        assert await source.load(conn) is again
        assert source.skipped == 1
    finally:
        await holder.close()
        await cleanup(conn, team, (child, other))


async def test_a_changed_config_is_built_off_the_event_loop(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build (hundreds of ms of CPU at thousands of patients) runs in a worker thread, not
    on the loop that decides alerts; the config it builds is the one the load returns, and an
    unchanged reload builds nothing, in any thread."""
    run = uuid.uuid4().hex[:8]
    team, child, other = await seed(conn, run)
    loop_thread = threading.get_ident()
    built_in: list[int] = []
    build = RulesConfigSource._build

    def spying(self: RulesConfigSource, *rows: list[object]) -> object:
        built_in.append(threading.get_ident())
        return build(self, *rows)

    monkeypatch.setattr(RulesConfigSource, "_build", spying)
    try:
        source = RulesConfigSource(Thresholds(), allowed_lateness_s=60)
        config = await source.load(conn)
        assert child in config.profiles and other in config.profiles
        assert len(built_in) == 1 and built_in[0] != loop_thread
        assert await source.load(conn) is config
        assert len(built_in) == 1
    finally:
        await cleanup(conn, team, (child, other))


async def test_only_monitored_patients_are_in_the_config(conn: asyncpg.Connection) -> None:
    """An open binding, a binding closed two days ago and a cycle started ten days ago each
    make a patient monitored; a binding closed eight days ago (past the seven-day window) with
    no recent cycle, or an old cycle alone, does not: an unbound patient is not loaded. A
    patient discharged eight days ago stays, with the discharge in their profile: the engine
    may still hold a timer of theirs, which the defaults (no discharge) would page."""
    run = uuid.uuid4().hex[:8]
    team = f"team-{run}"
    await conn.execute(
        "INSERT INTO care_teams (care_team_id, name, oncall_email) "
        "VALUES ($1, $1, 'x@example.org')",
        team,
    )
    keys = ("open", "closed2", "cycle10", "closed8", "cycle60", "discharged8")
    names = {k: f"P-{run}-{k}" for k in keys}
    for patient in names.values():
        await conn.execute(
            "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
        )
    now = datetime.now(UTC)
    try:
        await bind(conn, names["open"])
        await bind(conn, names["closed2"], ago=timedelta(days=30), closed_ago=timedelta(days=2))
        await bind(conn, names["closed8"], ago=timedelta(days=30), closed_ago=timedelta(days=8))
        await bind(conn, names["discharged8"], ago=timedelta(days=30), closed_ago=timedelta(days=8))
        discharged_at = now - timedelta(days=8)
        await conn.execute(
            "UPDATE patients SET infusion_ended_at = $2, discharged_at = $2, "
            "discharge_reason = 'home', discharged_by = 'nurse' WHERE patient_id = $1",
            names["discharged8"],
            discharged_at,
        )
        for key, days in (("cycle10", 10), ("cycle60", 60)):
            await conn.execute(
                "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day)"
                " VALUES ($1, $2, 8)",
                names[key],
                now - timedelta(days=days),
            )
        config = await load_rules_config(conn, Thresholds(), allowed_lateness_s=60)
        inside = {k for k, p in names.items() if p in config.profiles}
        assert inside == {"open", "closed2", "cycle10", "discharged8"}
        assert config.profiles[names["discharged8"]].discharged_at == discharged_at
    finally:
        await cleanup(conn, team, tuple(names.values()))
