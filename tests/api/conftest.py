"""Fixtures for the care-team API: a real PostgreSQL, a real HTTP server on loopback, and two
care teams with patients, users of every role and alerts, all with ids unique to this run."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.app import server_options
from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.rules.domain.identity import alert_id_for
from tests.polling import eventually

PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RecordingAlertActions:
    """Acknowledge/resolve port that records calls; the API's own checks are under test."""

    def __init__(self, pool: asyncpg.Pool | None = None) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def acknowledge(self, dedup_key: str, by: str, at: datetime) -> bool:
        self.calls.append(("ack", dedup_key, by))
        return True

    async def resolve(self, dedup_key: str, by: str, at: datetime) -> bool:
        self.calls.append(("resolve", dedup_key, by))
        return True

    async def snooze(self, dedup_key: str, by: str, minutes: float) -> datetime | None:
        self.calls.append(("snooze", dedup_key, by))
        return datetime.now(UTC) + timedelta(minutes=minutes)


class RecordingAudit:
    """Audit port that keeps entries in memory, so tests can assert what was audited."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, str, dict[str, Any]]] = []

    async def record(self, actor: str, action: str, subject: str, details: dict[str, Any]) -> None:
        self.entries.append((actor, action, subject, details))


@dataclass
class World:
    base_url: str
    run: str
    team_a: str
    team_b: str
    patient_a: str
    patient_b: str
    alert_a: str
    alert_b: str
    users: dict[str, str] = field(default_factory=dict)  # label -> username
    actions: RecordingAlertActions = field(default_factory=RecordingAlertActions)
    audit: RecordingAudit = field(default_factory=RecordingAudit)

    async def token(self, label: str) -> str:
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            r = await client.post(
                "/auth/token", data={"username": self.users[label], "password": PASSWORD}
            )
            r.raise_for_status()
            return str(r.json()["access_token"])


async def insert_alert(
    conn: asyncpg.Connection, patient_id: str, device_id: str, at: datetime, value: float
) -> str:
    dedup_key = f"{patient_id}:fever:{at.isoformat()}"
    await conn.execute(
        """
        INSERT INTO alerts (alert_id, dedup_key, patient_id, device_id, kind, code, priority,
                            phase, state, title, device_time, ingest_time, evidence, rule_id,
                            rule_version)
        VALUES ($1, $2, $3, $4, 'physiological', 'fever_single', 'high', 'start', 'active',
                $5, $6, $6, $7::jsonb, 'fever', '1.0.0+test')
        ON CONFLICT DO NOTHING
        """,
        alert_id_for(dedup_key, "start"),
        dedup_key,
        patient_id,
        device_id,
        f"Fever {value:.1f} °C",
        at,
        json.dumps(
            [
                {
                    "name": "temperature",
                    "value": value,
                    "unit": "Cel",
                    "limit": 38.3,
                    "comparator": ">=",
                    "device_time": at.isoformat(),
                }
            ]
        ),
    )
    return dedup_key


async def build_world(
    dsn: str, base_url: str, actions: RecordingAlertActions, audit: RecordingAudit | None
) -> World:
    run = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    world = World(
        base_url=base_url,
        run=run,
        team_a=f"team-a-{run}",
        team_b=f"team-b-{run}",
        patient_a=f"PA-{run}",
        patient_b=f"PB-{run}",
        alert_a="",
        alert_b="",
        actions=actions,
        audit=audit or RecordingAudit(),
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            for team, patient in ((world.team_a, world.patient_a), (world.team_b, world.patient_b)):
                await upsert_care_team(conn, team, f"Oncology {team}", f"oncall@{team}.test")
                await upsert_patient(conn, patient, team, 19.5)
                device = f"thermo-{patient}"
                await upsert_device(conn, device, "thermometer")
                await bind_device(conn, device, patient, now - timedelta(days=2))
                for minutes in range(0, 600, 30):
                    at = now - timedelta(minutes=minutes)
                    await conn.execute(
                        """
                        INSERT INTO temperature_readings (device_time, ingest_time, patient_id,
                            device_id, message_id, seq, value_c, original_value, original_unit,
                            site) VALUES ($1, $1, $2, $3, $4, $5, $6, $6, 'C', 'axillary')
                        """,
                        at,
                        patient,
                        device,
                        uuid.uuid4(),
                        minutes,
                        37.0 + (minutes % 90) / 60,
                    )
            world.alert_a = await insert_alert(
                conn, world.patient_a, f"thermo-{world.patient_a}", now - timedelta(minutes=5), 38.7
            )
            world.alert_b = await insert_alert(
                conn, world.patient_b, f"thermo-{world.patient_b}", now - timedelta(minutes=7), 38.9
            )
        repository = ApiRepository(pool)
        for label, role, teams in (
            ("clinician_a", Role.CLINICIAN, [world.team_a]),
            ("nurse_a", Role.CHARGE_NURSE, [world.team_a]),
            ("nurse2_a", Role.CHARGE_NURSE, [world.team_a]),
            ("auditor_a", Role.AUDITOR, [world.team_a]),
            ("clinician_b", Role.CLINICIAN, [world.team_b]),
            # Only the login-throttle test uses it: its failures lock no other test out.
            ("lockout_b", Role.CLINICIAN, [world.team_b]),
        ):
            username = f"{label}-{run}"
            await repository.create_user(
                f"{label}-{run}", username, label, hash_password(PASSWORD), role, teams
            )
            world.users[label] = username
    finally:
        await pool.close()
    return world


async def until_serving(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    """Wait for uvicorn to have bound its socket; a server that failed to start raises."""

    def started() -> bool:
        if task.done():
            task.result()
        return bool(server.started)

    await eventually(started, timeout_s=30, what="the API server to start")


@pytest.fixture(scope="module")
async def api_world(stack_env: dict[str, str]) -> AsyncIterator[World]:
    """The API served over real HTTP on loopback, against the test stack's PostgreSQL."""
    port = free_port()
    actions = RecordingAlertActions()
    audit = RecordingAudit()
    settings = ApiSettings(port=port, stream_poll_s=0.2)
    app = create_app(settings, alert_actions=actions, audit=audit)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            **server_options(settings),
        )
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    try:
        yield await build_world(
            stack_env["VIGIL_PG_DSN"], f"http://127.0.0.1:{port}", actions, audit
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def bearer(token: str) -> dict[str, Any]:
    return {"Authorization": f"Bearer {token}"}
