"""Bulk export jobs shared by API replicas (migration 0036): a job started on one replica is
polled and downloaded on another; a job whose replica stopped is reported failed, not lost."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import orjson
import pytest
import uvicorn

from services.api.bootstrap import create_app
from services.api.service_layer.fhir_export import SILENT
from services.api.settings import ApiSettings
from tests.api.conftest import World, bearer, free_port, until_serving
from tests.api.test_fhir_api import wait_for_export
from tests.api.test_fhir_mapping import validate

pytestmark = pytest.mark.stack


@pytest.fixture
async def second_replica(api_world: World) -> AsyncIterator[str]:
    """Another API process's worth: a second application on its own port, the same database."""
    port = free_port()
    app = create_app(ApiSettings(port=port))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_a_job_is_polled_and_downloaded_on_another_replica(
    api_world: World, second_replica: str
) -> None:
    """Kick-off on the first replica; the second answers the same status URL (202 until the
    files are stored, then the manifest) and serves the same files, every line valid; the
    first serves them too (positive control); a delete on the second removes it for both."""
    token = await api_world.token("clinician_a")
    async with (
        httpx.AsyncClient(base_url=f"{api_world.base_url}/fhir", headers=bearer(token)) as first,
        httpx.AsyncClient(base_url=f"{second_replica}/fhir", headers=bearer(token)) as second,
    ):
        kick = await first.get(
            "/Patient/$export",
            params={"patient": api_world.patient_a},
            headers={"Prefer": "respond-async"},
        )
        assert kick.status_code == 202, kick.text
        status_path = kick.headers["Content-Location"].split("/fhir", 1)[1]
        # The manifest from the replica that ran the job (it answers as soon as the files are
        # made), each file then asked of the other first (it waits for them to be stored).
        manifest = await wait_for_export(first, status_path)
        assert {o["type"] for o in manifest["output"]} >= {"Patient", "Observation", "Flag"}
        for output in manifest["output"]:
            path = output["url"].split("/fhir", 1)[1]
            stored = await second.get(path)
            held = await first.get(path)
            assert stored.status_code == held.status_code == 200
            assert stored.headers["content-type"].startswith("application/fhir+ndjson")
            assert stored.content == held.content
            lines = stored.content.splitlines()
            assert len(lines) == output["count"]
            for line in lines:
                resource = orjson.loads(line)
                assert resource["resourceType"] == output["type"]
                validate(resource)
        remote = await wait_for_export(second, status_path)
        listed = [(o["type"], o["count"]) for o in manifest["output"]]
        assert listed == [(o["type"], o["count"]) for o in remote["output"]]
        async with httpx.AsyncClient(
            base_url=f"{second_replica}/fhir", headers=bearer(await api_world.token("nurse_a"))
        ) as stranger:
            assert (await stranger.get(status_path)).status_code == 404
        assert (await second.delete(status_path)).status_code == 202
        assert (await first.get(status_path)).status_code == 404
        assert (await second.get(status_path)).status_code == 404


async def test_a_job_whose_replica_stopped_is_reported_failed(
    api_world: World, stack_env: dict[str, str]
) -> None:
    """A running job its replica stopped touching (the replica died or restarted) answers 500
    with an OperationOutcome on any replica, and no longer counts against the user's limit; a
    running job touched just now still answers 202 (positive control)."""
    user = f"clinician_a-{api_world.run}"
    now = datetime.now(UTC)
    silent, alive = uuid.uuid4().hex, uuid.uuid4().hex
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        for job_id, touched in ((silent, now - SILENT - timedelta(seconds=5)), (alive, now)):
            await conn.execute(
                """
                INSERT INTO fhir_export_jobs (job_id, owner, request_url, transaction_time,
                    patient_ids, types, status, alive_at)
                VALUES ($1, $2, 'http://replica.test/fhir/Patient/$export', $3, $4,
                        '{Patient}', 'running', $3)
                """,
                job_id,
                user,
                touched,
                [api_world.patient_a],
            )
        token = await api_world.token("clinician_a")
        async with httpx.AsyncClient(
            base_url=f"{api_world.base_url}/fhir", headers=bearer(token)
        ) as client:
            # Two running jobs would refuse a third kick-off (429): the silent one is failed first.
            kick = await client.get(
                "/Patient/$export",
                params={"patient": api_world.patient_a, "_type": "Patient"},
                headers={"Prefer": "respond-async"},
            )
            assert kick.status_code == 202, kick.text
            await wait_for_export(client, kick.headers["Content-Location"])
            assert (await client.delete(kick.headers["Content-Location"])).status_code == 202
            running = await client.get(f"/$export-status/{alive}")
            assert running.status_code == 202
            failed = await client.get(f"/$export-status/{silent}")
            assert failed.status_code == 500
            outcome = validate(failed.json())
            assert "stopped" in (outcome.issue[0].diagnostics or "")
        status = await conn.fetchval(
            "SELECT status FROM fhir_export_jobs WHERE job_id = $1", silent
        )
        assert status == "failed"
    finally:
        await conn.execute(
            "DELETE FROM fhir_export_jobs WHERE job_id = ANY($1::text[])", [silent, alive]
        )
        await conn.close()


async def test_a_replica_that_shuts_down_fails_its_running_jobs(
    api_world: World, stack_env: dict[str, str]
) -> None:
    """A job still running when its replica stops is failed in the database at shutdown."""
    from services.api.adapters.fhir import FhirRepository, Row
    from services.api.service_layer.fhir_export import ExportJobs

    pool = await asyncpg.create_pool(stack_env["VIGIL_PG_DSN"], min_size=1, max_size=4)
    try:
        repository = FhirRepository(pool)
        hold = asyncio.Event()

        class Stalled(FhirRepository):
            async def devices_of(self, patient_id: str) -> list[Row]:
                await hold.wait()  # the export never gets past its first read
                return []

        jobs = ExportJobs(Stalled(pool), lambda: datetime.now(UTC))
        job = await jobs.start(
            owner=f"clinician_a-{api_world.run}",
            teams=frozenset({api_world.team_a}),
            request_url="http://replica.test/fhir/Patient/$export",
            patient_ids=[api_world.patient_a],
            types=("Device",),
            since=None,
        )
        row = await repository.export_job(job.job_id)
        assert row is not None and row["status"] == "running"
        await jobs.close()
        row = await repository.export_job(job.job_id)
        assert row is not None and row["status"] == "failed"
        assert "stopped" in row["error"]
        await repository.delete_exports(job_id=job.job_id, finished_before=datetime.now(UTC))
    finally:
        await pool.close()
