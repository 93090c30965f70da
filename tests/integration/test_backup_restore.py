"""Backup and restore of PostgreSQL as docs/backup.md describes it, on the real stack.

Notify pages on the stack's database (an escalation that climbs a step and is acknowledged, one
that ends with an all clear, over a real SMTP server), readings are stored (on TimescaleDB one
chunk compressed), then ``pg_dump`` takes a custom-format backup. A fresh PostgreSQL cluster
(``initdb`` in a temporary directory, on a free loopback port, with the stack's PostgreSQL
binaries) gets the owner role, the services' role and an empty database, and ``pg_restore``
(between ``timescaledb_pre_restore()`` and ``timescaledb_post_restore()`` on TimescaleDB) fills
it. Every table of the schema must then match the original row for row, privileges included;
``vigil migrate`` finds nothing to do; ``vigil audit verify --expect-head`` passes as the
services' role, and fails once a restored audit row is altered (the positive control).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from schemas.events import Alert, AlertPhase
from tests.factories import fever_evidence, make_alert
from tests.support.escalation import escalation_service, smtp_sender
from tests.support.notify import ManualClock, SmtpSink
from tests.support.notify_desk import NotifyDesk
from vigil.db.migrate import apply_migrations
from vigil.db.privileges import grant_service_role
from vigil_tools.stack import StackSettings
from vigil_tools.stack.credentials import PG_APP_DATABASE, PG_SUPERUSER, StackSecrets, load_secrets
from vigil_tools.stack.postgres import (
    app_dsn,
    cluster_dir,
    component,
    provision,
    socket_dir,
    start_server,
)
from vigil_tools.stack.process import await_exit, make_traversable, signal_component

pytestmark = pytest.mark.stack

# The services' least-privilege role (vigil/db/privileges.py); the stack's `vigil` role owns the
# database and runs the migrations, as `vigil_owner` does in the compose deployment.
SERVICE_ROLE = "vigil_app"
SECRET = b"backup-restore-test-ack-secret-0123456789"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    """One PostgreSQL cluster of the stack's kind, reached as its superuser over the socket."""

    settings: StackSettings
    superuser_password: str
    # The database owner's DSN over TCP (the role that runs `vigil migrate`).
    owner_dsn: str = ""

    def client_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PGHOST": str(socket_dir(self.settings)),
            "PGPORT": str(self.settings.pg_port),
            "PGUSER": PG_SUPERUSER,
            "PGPASSWORD": self.superuser_password,
            "PGDATABASE": PG_APP_DATABASE,
            "TZ": "UTC",
        }

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL client program of the stack's bin dir; its output kept for the report."""
        result = subprocess.run(
            [str(self.settings.pg_bin_dir / tool), *args],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"{tool} failed ({result.returncode}):\n{result.stderr}"
        return result

    async def connect(self, database: str = PG_APP_DATABASE) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=str(socket_dir(self.settings)),
            port=self.settings.pg_port,
            user=PG_SUPERUSER,
            password=self.superuser_password,
            database=database,
        )


@pytest.fixture(scope="module")
def source(stack_env: dict[str, str]) -> Cluster:
    settings = StackSettings()
    return Cluster(settings, load_secrets(settings).pg_superuser_password)


@pytest.fixture(scope="module")
def fresh_cluster(stack_env: dict[str, str]) -> Iterator[Cluster]:
    """A new cluster (initdb) on a free loopback port, in a temporary directory, with the same
    binaries as the stack's; stopped and deleted afterwards."""
    # Under /tmp, not pytest's deeper tmp_path: the socket path must fit in 107 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="vigil-restore-"))
    make_traversable(data_dir)
    settings = StackSettings(data_dir=data_dir, pg_port=_free_port())
    settings.pids_dir.mkdir()
    password = uuid.uuid4().hex
    secrets = StackSecrets(pg_superuser_password=password, pg_vigil_password=uuid.uuid4().hex)
    try:
        start_server(settings, secrets)
        # The owner role and its empty database (and the TimescaleDB extension where the binaries
        # have it): what the deployment's database set-up creates before any migration.
        provision(settings, secrets)
        yield Cluster(settings, password, app_dsn(settings, secrets.pg_vigil_password))
    finally:
        pid = signal_component(component(settings))
        if pid is not None:
            await_exit(component(settings), pid, settings.stop_timeout_s)
        shutil.rmtree(data_dir, ignore_errors=True)


def _alert(patient: str, at: datetime, phase: AlertPhase = AlertPhase.START) -> Alert:
    return make_alert(
        patient_id=patient,
        phase=phase,
        at=at,
        title="Fever 38.7 °C",
        evidence=(fever_evidence(at, value=38.7),),
    )


@dataclass
class Activity:
    tag: str
    acked_escalation: uuid.UUID
    ended_escalation: uuid.UUID


@pytest.fixture(scope="module")
async def activity(pg_dsn: str, source: Cluster) -> AsyncIterator[Activity]:
    """Alerts, escalations, pages and an acknowledgement (with its audit entry) made by notify's
    own service and API on the stack's database, and readings as ingest stores them."""
    tag = uuid.uuid4().hex[:8]
    admin = await source.connect()
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", SERVICE_ROLE):
            await admin.execute(f"CREATE ROLE {SERVICE_ROLE} NOLOGIN")
    finally:
        await admin.close()
    # What `vigil migrate --grant-to vigil_app` does after the migrations.
    await apply_migrations(pg_dsn)
    await grant_service_role(pg_dsn, SERVICE_ROLE)

    pool = await asyncpg.create_pool(pg_dsn, min_size=2, max_size=4)
    clock = ManualClock(datetime.now(UTC))
    fallback = f"fallback-{tag}@h.test"
    with SmtpSink() as smtp:
        service = escalation_service(
            pool, clock, email=smtp_sender(smtp.port), ack_secret=SECRET, fallback_email=fallback
        )
        team, desk = f"CT-bk-{tag}", NotifyDesk(pool, clock=clock)
        await desk.care_team(team, oncall_email=f"oncall-{tag}@h.test")
        for role in ("primary", "secondary"):
            await desk.person(
                f"{role}-{tag}",
                name=role,
                care_team_id=team,
                contact_methods=[{"channel": "email", "address": f"{role}-{tag}@h.test"}],
            )
        await desk.policy(
            team,
            {
                "policy_id": f"pol-bk-{tag}",
                "name": "onc",
                "steps": [
                    {"targets": [{"kind": "person", "ref": f"{role}-{tag}"}], "wait_minutes": 5}
                    for role in ("primary", "secondary")
                ],
                "repeat_count": 0,
            },
        )
        acked, ended = f"P-bk-ack-{tag}", f"P-bk-end-{tag}"
        for patient in (acked, ended):
            await pool.execute(
                "INSERT INTO patients (patient_id, care_team_id) VALUES ($1, $2)", patient, team
            )
        # Paged, not acknowledged for 5 minutes (the secondary is paged), then acknowledged.
        assert await service.handle_alert(_alert(acked, clock()))
        clock.advance(minutes=5)
        await service.tick()
        await service.deliver_due()
        acked_id = await service.escalation_id_for(f"{acked}:FEVER")
        assert acked_id is not None
        await service.acknowledge(acked_id, by=f"person:primary-{tag}", via="api")
        # Paged, then the fever ends: the all clear goes to whoever was paged.
        assert await service.handle_alert(_alert(ended, clock()))
        clock.advance(minutes=1)
        await service.handle_alert(_alert(ended, clock(), AlertPhase.END))
        await service.deliver_due()
        ended_id = await service.escalation_id_for(f"{ended}:FEVER")
        assert ended_id is not None
        assert len(smtp.to(f"primary-{tag}@h.test")) == 3  # two pages, one all clear
        assert len(smtp.to(f"secondary-{tag}@h.test")) == 1

    # Readings as ingest writes them, one a month old (a chunk TimescaleDB compresses below).
    now = datetime.now(UTC)
    await pool.executemany(
        """
        INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id,
            message_id, seq, value_c, original_value, original_unit, site)
        VALUES ($1, $1, $2, $3, $4, $5, $6, $6, 'C', 'axillary')
        """,
        [
            (now - timedelta(days=30), acked, f"thermo-{tag}", uuid.uuid4(), 1, 37.0),
            (now - timedelta(minutes=10), acked, f"thermo-{tag}", uuid.uuid4(), 2, 38.7),
            (now - timedelta(minutes=5), ended, f"thermo-{tag}", uuid.uuid4(), 3, 38.9),
        ],
    )
    admin = await source.connect()
    try:
        if await _timescaledb(admin):
            await admin.execute(
                "SELECT compress_chunk(c, if_not_compressed => true) "
                "FROM show_chunks('temperature_readings', older_than => interval '20 days') c"
            )
    finally:
        await admin.close()
    await pool.close()
    yield Activity(tag, acked_id, ended_id)


async def _timescaledb(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
        )
    )


_TABLES = """
SELECT c.relname FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
ORDER BY c.relname
"""


async def _snapshot(conn: asyncpg.Connection) -> dict[str, Any]:
    """Every row of every table of the schema (as JSON text, sorted), each relation's owner and
    privileges, and on TimescaleDB the hypertables, compressed chunks and policy jobs."""
    tables: dict[str, list[str]] = {}
    for (name,) in await conn.fetch(_TABLES):
        rows = await conn.fetch(f'SELECT to_jsonb(t)::text AS row FROM "{name}" t')
        tables[name] = sorted(r["row"] for r in rows)
    acl = [
        tuple(r)
        for r in await conn.fetch(
            "SELECT relname, relkind::text, pg_get_userbyid(relowner), relacl::text FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S') "
            "ORDER BY relname"
        )
    ]
    snapshot: dict[str, Any] = {"tables": tables, "acl": acl}
    if await _timescaledb(conn):
        snapshot["hypertables"] = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT hypertable_name, compression_enabled, num_chunks "
                "FROM timescaledb_information.hypertables ORDER BY 1"
            )
        ]
        snapshot["compressed_chunks"] = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT hypertable_name, range_start FROM timescaledb_information.chunks "
                "WHERE is_compressed ORDER BY 1, 2"
            )
        ]
        snapshot["jobs"] = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT proc_name, hypertable_name, schedule_interval::text, config::text "
                "FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL ORDER BY 1, 2"
            )
        ]
    return snapshot


def _rows_of(snapshot: dict[str, Any], table: str, **match: str) -> list[dict[str, Any]]:
    rows = [json.loads(text) for text in snapshot["tables"][table]]
    return [r for r in rows if all(str(r.get(k)) == v for k, v in match.items())]


def _audit_verify(dsn: str, *args: str) -> tuple[int, dict[str, Any]]:
    """`vigil audit verify --json` as an operator runs it, in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "vigil_tools.cli", "audit", "verify", "--json", *args],
        env={**os.environ, "VIGIL_PG_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


async def test_a_restored_backup_holds_every_alert_escalation_and_page(
    activity: Activity, source: Cluster, fresh_cluster: Cluster, tmp_path: Path
) -> None:
    backup = tmp_path / "vigil.dump"

    conn = await source.connect()
    try:
        before = await _snapshot(conn)
        head = await conn.fetchrow("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        timescaledb = await _timescaledb(conn)
    finally:
        await conn.close()
    # make test-timescale must not pass on plain tables.
    assert timescaledb or os.environ.get("VIGIL_TEST_TIMESCALEDB") != "1"
    # The backup: one consistent snapshot of the database, custom format (docs/backup.md).
    source.run("pg_dump", "--format=custom", f"--file={backup}", PG_APP_DATABASE)
    listing = source.run("pg_restore", "--list", str(backup)).stdout
    assert "TABLE DATA public audit_log" in listing

    # The restore, into the fresh cluster: the services' role first (the dump's GRANTs name
    # it), then pg_restore as the superuser, objects owned as in the original.
    target = await fresh_cluster.connect()
    app_password = uuid.uuid4().hex
    try:
        await target.execute(f"CREATE ROLE {SERVICE_ROLE} LOGIN PASSWORD '{app_password}'")
        if timescaledb:
            await target.execute("SELECT timescaledb_pre_restore()")
    finally:
        await target.close()
    fresh_cluster.run("pg_restore", "--exit-on-error", f"--dbname={PG_APP_DATABASE}", str(backup))
    target = await fresh_cluster.connect()
    try:
        if timescaledb:
            await target.execute("SELECT timescaledb_post_restore()")
        after = await _snapshot(target)
    finally:
        await target.close()

    # Row for row, every table; and the same owners and privileges on every relation.
    assert after["tables"].keys() == before["tables"].keys()
    for table, rows in before["tables"].items():
        assert after["tables"][table] == rows, f"{table} differs after the restore"
    assert after == before

    # The rows this test made are among them (the comparison above is not of empty tables).
    escalations = {
        r["escalation_id"]: r
        for r in _rows_of(after, "escalations", care_team_id=f"CT-bk-{activity.tag}")
    }
    assert escalations[str(activity.acked_escalation)]["status"] == "acknowledged"
    assert escalations[str(activity.ended_escalation)]["status"] == "resolved"
    pages = _rows_of(after, "pages", escalation_id=str(activity.acked_escalation))
    pages += _rows_of(after, "pages", escalation_id=str(activity.ended_escalation))
    assert sorted(p["status"] for p in pages) == ["sent"] * 4
    assert len(_rows_of(after, "alerts", patient_id=f"P-bk-end-{activity.tag}")) == 2
    assert _rows_of(
        after, "audit_log", action="alert.acknowledged", actor=f"person:primary-{activity.tag}"
    )
    assert len(_rows_of(after, "temperature_readings", device_id=f"thermo-{activity.tag}")) == 3
    if timescaledb:
        assert after["compressed_chunks"], "no compressed chunk was backed up"

    # The audit log's revoked privileges hold on the restored database.
    target = await fresh_cluster.connect()
    try:
        async with target.transaction():
            await target.execute(f"SET LOCAL ROLE {SERVICE_ROLE}")
            for statement in ("UPDATE audit_log SET actor = actor", "DELETE FROM audit_log"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    async with target.transaction():
                        await target.execute(statement)
            await target.execute("UPDATE alerts SET title = title WHERE false")
    finally:
        await target.close()

    # The restart order's first step: the migrator finds the schema complete.
    assert await apply_migrations(fresh_cluster.owner_dsn) == []

    # `vigil audit verify` as the services' role, against the head recorded before the backup.
    hba = cluster_dir(fresh_cluster.settings) / "pg_hba.conf"
    hba.write_text(
        hba.read_text()
        + f"host    {PG_APP_DATABASE}   {SERVICE_ROLE}   127.0.0.1/32    scram-sha-256\n"
    )
    target = await fresh_cluster.connect()
    try:
        await target.execute("SELECT pg_reload_conf()")
    finally:
        await target.close()
    app = (
        f"postgresql://{SERVICE_ROLE}:{app_password}@127.0.0.1:"
        f"{fresh_cluster.settings.pg_port}/{PG_APP_DATABASE}"
    )
    code, report = _audit_verify(app, "--expect-head", str(head["hash"]))
    assert code == 0, report
    assert report["ok"] and report["head_seq"] == head["seq"]
    assert report["rows_verified"] == len(before["tables"]["audit_log"])

    # Positive control: the same command fails once a restored row is altered (triggers
    # bypassed, as only a superuser can).
    target = await fresh_cluster.connect()
    try:
        async with target.transaction():
            await target.execute("SET LOCAL session_replication_role = replica")
            await target.execute(
                "UPDATE audit_log SET actor = 'someone-else' WHERE seq = $1", head["seq"]
            )
    finally:
        await target.close()
    code, report = _audit_verify(app)
    assert code == 1
    assert report["first_break"]["seq"] == head["seq"]
