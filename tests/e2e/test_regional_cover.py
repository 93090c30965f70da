"""End to end on the real stack: regional cover. Two partner teams are covered by a regional
team from 00:00 to 06:00 and from 20:00 to 08:00 of their own zones, each agreement signed off
through the care-team API by a manager of each side. The zones are chosen so that the moment the
test runs is about 02:00 for the first partner and about 10:00 for the second: no clock is
moved, no sleep. A fever over MQTT of the first partner's patient pages the regional on-call,
who acknowledges it through the API; the same fever of the second partner's patient pages that
team's own on-call; the regional clinician may read the first patient and not the second (the
second's window is closed); the first partner's morning summary lists the night's episode."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

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
from tests.api.conftest import PASSWORD, bearer, free_port, until_serving
from tests.e2e.conftest import Pipeline, publish, temperature
from tests.polling import eventually

pytestmark = pytest.mark.stack


def zone_at(local_hour: int, now: datetime) -> str:
    """A fixed-offset zone in which ``now`` is ``local_hour`` and some minutes."""
    offset = (local_hour - now.astimezone(UTC).hour) % 24
    if offset > 14:
        offset -= 24
    # Etc/GMT names count the other way: Etc/GMT+5 is five hours behind UTC.
    return f"Etc/GMT{-offset:+d}"


@pytest.fixture(scope="module")
async def api(stack_env: dict[str, str]) -> AsyncIterator[str]:
    """The care-team API, with notify's real acknowledgement, served on loopback."""
    port = free_port()
    settings = ApiSettings(port=port, stream_poll_s=0.2)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
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
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def token(client: httpx.AsyncClient, username: str) -> dict[str, Any]:
    r = await client.post("/auth/token", data={"username": username, "password": PASSWORD})
    r.raise_for_status()
    return bearer(str(r.json()["access_token"]))


async def test_a_night_fever_pages_the_covering_on_call_and_a_day_fever_the_home_team(
    pipeline: Pipeline, api: str, stack_env: dict[str, str]
) -> None:
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    if now.minute >= 55:  # keep clear of an hour's turn while the fever travels
        now += timedelta(minutes=10)
    night_zone, day_zone = zone_at(2, now), zone_at(10, now)
    regional, night, day = f"regional-{run}", f"partner-n-{run}", f"partner-d-{run}"
    pn, pd = f"P-cov-n-{run}", f"P-cov-d-{run}"
    oncall = {t: f"oncall-{t}@hospital.test" for t in (regional, night, day)}
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            for team, zone in ((regional, "UTC"), (night, night_zone), (day, day_zone)):
                await upsert_care_team(conn, team, f"Oncology {team}", oncall[team])
                await conn.execute(
                    "UPDATE care_teams SET timezone = $2 WHERE care_team_id = $1", team, zone
                )
            for patient, team in ((pn, night), (pd, day)):
                await upsert_patient(conn, patient, team, weight_kg=18.5)
                await upsert_device(conn, f"thermo-{patient}", "thermometer", "test-thermometer")
                await bind_device(conn, f"thermo-{patient}", patient, now - timedelta(days=1))
        repository = ApiRepository(pool)
        users = {
            "nurse_r": (Role.CHARGE_NURSE, regional),
            "clinician_r": (Role.CLINICIAN, regional),
            "nurse_n": (Role.CHARGE_NURSE, night),
            "nurse_d": (Role.CHARGE_NURSE, day),
        }
        for label, (role, team) in users.items():
            name = f"{label}-{run}"
            await repository.create_user(name, name, label, hash_password(PASSWORD), role, [team])
    finally:
        await pool.close()

    async with httpx.AsyncClient(base_url=api) as client:
        h = {label: await token(client, f"{label}-{run}") for label in users}
        agreements: list[str] = []
        try:
            for team, zone, starts, ends, partner in (
                (night, night_zone, "00:00", "06:00", "nurse_n"),
                (day, day_zone, "20:00", "08:00", "nurse_d"),
            ):
                proposed = await client.post(
                    "/api/cover-agreements",
                    json={
                        "covering_team_id": regional,
                        "covered_team_id": team,
                        "timezone": zone,
                        "days": [0, 1, 2, 3, 4, 5, 6],
                        "starts": starts,
                        "ends": ends,
                    },
                    headers=h["nurse_r"],
                )
                assert proposed.status_code == 202, proposed.text
                agreements.append(proposed.json()["agreement_id"])
                approved = await client.post(
                    f"/api/cover-agreements/{proposed.json()['agreement_id']}/versions/1/approve",
                    headers=h[partner],
                )
                assert approved.status_code == 200, approved.text

            for patient in (pn, pd):
                device = f"thermo-{patient}"
                await publish(
                    stack_env, f"vigil/v1/dev/{device}/temperature", temperature(device, 38.9, 1)
                )

            def paged(patient: str) -> list[str]:
                return [str(m["To"]) for m in pipeline.mail.for_patient(patient)]

            await eventually(
                lambda: paged(pn) and paged(pd), timeout_s=60, interval_s=0.1, what="both pages"
            )
            assert set(paged(pn)) == {oncall[regional]}  # about 02:00 in the partner's zone
            assert set(paged(pd)) == {oncall[day]}  # about 10:00 in the other partner's zone

            # The regional clinician sees the covered patient now, and acknowledges there.
            assert (
                await client.get(f"/api/patients/{pn}", headers=h["clinician_r"])
            ).status_code == 200
            alerts = await client.get(
                "/api/alerts", params={"patient_id": pn}, headers=h["clinician_r"]
            )
            (episode,) = alerts.json()["items"]
            key = episode["dedup_key"]
            ack = await client.post(
                f"/api/alerts/{quote(key, safe='')}/ack", headers=h["clinician_r"]
            )
            assert ack.status_code == 200 and ack.json()["changed"] is True
            # Outside its window, the other partner's patient and alert are refused.
            assert (
                await client.get(f"/api/patients/{pd}", headers=h["clinician_r"])
            ).status_code == 404
            other = await client.get(
                "/api/alerts", params={"patient_id": pd}, headers=h["clinician_r"]
            )
            assert other.json()["items"] == []

            # The partner's morning: the night's episode, paged to and acknowledged by the region.
            local_now = now.astimezone(ZoneInfo(night_zone))
            morning = local_now.replace(hour=9, minute=0, second=0, microsecond=0)
            summary = await client.get(
                f"/api/care-teams/{night}/cover-summary",
                params={"at": morning.isoformat()},
                headers=h["nurse_n"],
            )
            assert summary.status_code == 200, summary.text
            (patient,) = summary.json()["patients"]
            (night_alert,) = patient["alerts"]
            assert patient["patient_id"] == pn and night_alert["dedup_key"] == key
            assert night_alert["paged_team_id"] == regional
            assert night_alert["acknowledged_by"] == f"clinician_r-{run}"
        finally:
            await _leave_nothing_open(client, h, agreements, patients=(pn, pd))


async def _leave_nothing_open(
    client: httpx.AsyncClient,
    h: dict[str, dict[str, Any]],
    agreements: list[str],
    *,
    patients: tuple[str, str],
) -> None:
    """On a stack that later tests reuse, notify's rounds act on the whole database: the
    agreements are revoked and every episode still open is acknowledged by its patient's team
    (the night patient's covered team, the day patient's own)."""
    for agreement_id in agreements:
        revoked = await client.post(
            f"/api/cover-agreements/{agreement_id}/revoke",
            json={"reason": "end of test"},
            headers=h["nurse_r"],
        )
        assert revoked.status_code == 200, revoked.text
    for patient, nurse in zip(patients, ("nurse_n", "nurse_d"), strict=True):
        listed = await client.get(
            "/api/alerts", params={"patient_id": patient, "state": "open"}, headers=h[nurse]
        )
        assert listed.status_code == 200, listed.text
        for episode in listed.json()["items"]:
            key = quote(episode["dedup_key"], safe="")
            acked = await client.post(f"/api/alerts/{key}/ack", headers=h[nurse])
            assert acked.status_code == 200, acked.text
