"""Reads of patient data land in Vigil's hash-chained audit log, which still verifies."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
import uvicorn

from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import (
    PASSWORD,
    RecordingAlertActions,
    build_world,
    free_port,
    until_serving,
)

pytestmark = pytest.mark.stack


async def test_patient_read_is_written_to_the_audit_log(stack_env: dict[str, str]) -> None:
    """A clinician's read of a patient's readings becomes an audit_log row naming who and whom."""
    from vigil.audit.store import verify

    dsn = stack_env["VIGIL_PG_DSN"]
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ApiSettings(port=port), alert_actions=RecordingAlertActions()),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    try:
        base = f"http://127.0.0.1:{port}"
        world = await build_world(dsn, base, RecordingAlertActions(), None)
        async with httpx.AsyncClient(base_url=base) as client:
            login = await client.post(
                "/auth/token", data={"username": world.users["clinician_a"], "password": PASSWORD}
            )
            token = login.json()["access_token"]
            r = await client.get(
                f"/api/patients/{world.patient_a}/readings",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT actor, action FROM audit_log WHERE subject = $1",
            f"patient:{world.patient_a}",
        )
        assert ("clinician_a-" + world.run, "patient.readings") in [
            (r["actor"], r["action"]) for r in rows
        ]
        report = await verify(conn)
    finally:
        await conn.close()
    assert report.broken is None, report
