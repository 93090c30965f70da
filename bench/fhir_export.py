"""Bulk FHIR export of one 28-day course, timed end to end over real HTTP.

Stores one patient's 28-day course in the benchmark stack's PostgreSQL: a continuous patch
thermometer every 5 minutes (8,064 readings, a few flagged implausible), a pump status every
minute (40,320), and 40 alert episodes with two pages each, half acknowledged. Then the API
(in this process, on loopback) answers a Bulk Data kick-off for that patient; the client polls
the status URL every 10 ms and downloads every NDJSON file. Prints one JSON line: the time from
kick-off to the last file, the job's own time, the process's CPU time over the export (API and
client together; steadier than the wall clock on a shared machine), resources and bytes. A
figure, not a test.

Run: ``make bench-fhir-export`` (the Makefile's BENCH_STACK).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import stack_environment
from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)

DAYS = 28
PASSWORD = "benchmark password of enough length"


async def seed(dsn: str, run: str) -> tuple[str, str, dict[str, int]]:
    """One patient's course; returns the patient, the username and what was stored."""
    team, patient = f"bench-fhir-{run}", f"BF-{run}"
    thermo, pump = f"thermo-{patient}", f"pump-{patient}"
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(days=DAYS)
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "Benchmark oncology", "oncall@bench.test")
        await upsert_patient(conn, patient, team, 19.5)
        for device, kind in ((thermo, "thermometer"), (pump, "pump")):
            await upsert_device(conn, device, kind)
            await bind_device(conn, device, patient, start - timedelta(hours=1))
        temps = []
        for i in range(DAYS * 24 * 12):
            at = start + timedelta(minutes=5 * i)
            value = 36.8 + (i % 24) * 0.05
            flags = ["implausible_temperature"] if i % 997 == 0 else []
            temps.append(
                (
                    at,
                    at + timedelta(seconds=1),
                    patient,
                    thermo,
                    uuid.uuid4(),
                    i,
                    value,
                    value,
                    "C",
                    "skin_patch",
                    flags,
                )
            )
        await conn.copy_records_to_table(
            "temperature_readings",
            records=temps,
            columns=[
                "device_time",
                "ingest_time",
                "patient_id",
                "device_id",
                "message_id",
                "seq",
                "value_c",
                "original_value",
                "original_unit",
                "site",
                "flags",
            ],
        )
        statuses = []
        for i in range(DAYS * 24 * 60):
            at = start + timedelta(minutes=i)
            remaining = 240.0 - (i % 1440) / 6
            statuses.append(
                (
                    at,
                    at + timedelta(seconds=1),
                    patient,
                    pump,
                    uuid.uuid4(),
                    i,
                    "running",
                    10.0,
                    remaining,
                    240.0,
                    90.0,
                )
            )
        await conn.copy_records_to_table(
            "pump_status",
            records=statuses,
            columns=[
                "device_time",
                "ingest_time",
                "patient_id",
                "device_id",
                "message_id",
                "seq",
                "state",
                "rate_ml_h",
                "volume_remaining_ml",
                "bag_volume_ml",
                "battery_pct",
            ],
        )
        pages = 0
        for n in range(40):
            at = start + timedelta(hours=16 * n + 3)
            dedup = f"{patient}:fever:{n}"
            alert_id = uuid.uuid4()
            evidence = [
                {
                    "name": "temperature",
                    "value": 38.6,
                    "unit": "Cel",
                    "limit": 38.3,
                    "comparator": ">=",
                    "device_time": at.isoformat(),
                    "message_id": str(temps[n * 190][4]),
                }
            ]
            for phase, when in (("start", at), ("end", at + timedelta(hours=2))):
                await conn.execute(
                    """
                    INSERT INTO alerts (alert_id, dedup_key, patient_id, device_id, kind, code,
                        priority, phase, state, title, device_time, ingest_time, evidence,
                        rule_id, rule_version, received_at)
                    VALUES ($1, $2, $3, $4, 'physiological', 'fever_single', 'high', $5,
                            'active', 'Fever 38.6 °C', $6, $6, $7::jsonb, 'fever', 'bench', $6)
                    """,
                    alert_id if phase == "start" else uuid.uuid4(),
                    dedup,
                    patient,
                    thermo,
                    phase,
                    when,
                    json.dumps(evidence),
                )
            escalation_id = uuid.uuid4()
            acked = n % 2 == 0
            await conn.execute(
                """
                INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                    care_team_id, snapshot, status, acknowledged_by, acknowledged_at, opened_at)
                VALUES ($1, $2, $3, $4, $5, '{}'::jsonb, $6, $7, $8, $9)
                """,
                escalation_id,
                dedup,
                alert_id,
                patient,
                team,
                "acknowledged" if acked else "resolved",
                "nurse-bench" if acked else None,
                at + timedelta(minutes=6) if acked else None,
                at,
            )
            for k in range(2):
                page_id = uuid.uuid4()
                await conn.execute(
                    """
                    INSERT INTO pages (page_id, alert_id, dedup_key, patient_id, care_team_id,
                        channel, recipient, idempotency_key, status, created_at, escalation_id,
                        purpose)
                    VALUES ($1, $2, $3, $4, $5, 'email', 'oncall@bench.test', $6, 'sent', $7,
                            $8, 'alert')
                    """,
                    page_id,
                    alert_id,
                    dedup,
                    patient,
                    team,
                    f"bench-{page_id}",
                    at + timedelta(minutes=5 * k),
                    escalation_id,
                )
                await conn.execute(
                    "INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, "
                    "status, at) VALUES ($1, 1, 'email', 'oncall@bench.test', 'sent', $2)",
                    page_id,
                    at + timedelta(minutes=5 * k, seconds=1),
                )
                pages += 1
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        username = f"bench-fhir-{run}"
        await ApiRepository(pool).create_user(
            username, username, "Benchmark", hash_password(PASSWORD), Role.CLINICIAN, [team]
        )
    finally:
        await pool.close()
    return (
        patient,
        username,
        {
            "temperatures": len(temps),
            "pump_statuses": len(statuses),
            "alert_episodes": 40,
            "pages": pages,
        },
    )


async def export_once(client: httpx.AsyncClient, patient: str) -> dict[str, float | int]:
    started = time.perf_counter()
    cpu_started = time.process_time()
    kick = await client.get(
        "/fhir/Patient/$export",
        params={"patient": patient},
        headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
    )
    kick.raise_for_status()
    status_url = kick.headers["Content-Location"]
    while True:
        status = await client.get(status_url)
        if status.status_code != 202:
            status.raise_for_status()
            break
        await asyncio.sleep(0.01)
    manifest_s = time.perf_counter() - started
    resources = size = 0
    for output in status.json()["output"]:
        file = await client.get(output["url"])
        file.raise_for_status()
        size += len(file.content)
        resources += file.content.count(b"\n")
    total_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    await client.delete(status_url)
    return {
        "export_s": round(total_s, 3),
        "manifest_s": round(manifest_s, 3),
        "cpu_s": round(cpu_s, 3),
        "resources": resources,
        "ndjson_bytes": size,
    }


async def main() -> int:
    env = stack_environment()
    run = uuid.uuid4().hex[:8]
    patient, username, stored = await seed(env["VIGIL_PG_DSN"], run)
    settings = ApiSettings(port=0)
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            token = (
                await client.post("/auth/token", data={"username": username, "password": PASSWORD})
            ).json()["access_token"]
            client.headers["Authorization"] = f"Bearer {token}"
            runs = [await export_once(client, patient) for _ in range(5)]
    finally:
        server.should_exit = True
        await task
    times = sorted(r["export_s"] for r in runs)
    print(
        json.dumps(
            {
                "bench": "fhir_export",
                "days": DAYS,
                "stored": stored,
                "runs": runs,
                "export_s_median": times[len(times) // 2],
                "export_s_max": times[-1],
                "target_s": 1.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
