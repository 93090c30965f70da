"""The roster over real HTTP and PostgreSQL: every patient of the caller's teams, no other."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from tests.api.conftest import World, bearer

pytestmark = pytest.mark.stack


async def _pump_and_cycle(dsn: str, world: World) -> datetime:
    """Patient A: a cycle begun 3 days ago and a pump running 10 mL/h with 30 mL left."""
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        pump = f"pump-{world.patient_a}"
        await conn.execute(
            "INSERT INTO devices (device_id, kind) VALUES ($1, 'pump') ON CONFLICT DO NOTHING", pump
        )
        await conn.execute(
            "INSERT INTO device_bindings (device_id, patient_id, valid_from) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            pump,
            world.patient_a,
            now - timedelta(days=3),
        )
        await conn.execute(
            "INSERT INTO patient_cycles (patient_id, cycle_start) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING",
            world.patient_a,
            now - timedelta(days=3, hours=1),
        )
        reported = now - timedelta(minutes=4)
        await conn.execute(
            """
            INSERT INTO pump_status (device_time, ingest_time, patient_id, device_id, message_id,
                                     seq, state, rate_ml_h, volume_remaining_ml, battery_pct)
            VALUES ($1, $1, $2, $3, $4, 1, 'running', 10.0, 30.0, 76.0)
            """,
            reported,
            world.patient_a,
            pump,
            uuid.uuid4(),
        )
        return reported
    finally:
        await conn.close()


async def test_roster_lists_my_teams_patients_with_their_facts(
    api_world: World, pg_dsn: str
) -> None:
    reported = await _pump_and_cycle(pg_dsn, api_world)
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        r = await client.get("/api/roster", headers=bearer(await api_world.token("nurse_a")))
        assert r.status_code == 200, r.text
        roster = r.json()
        mine = {p["patient_id"]: p for p in roster["patients"]}
        assert api_world.patient_a in mine
        assert api_world.patient_b not in mine  # another team's child is not on my roster
        row = mine[api_world.patient_a]
        assert row["infusion_day"] == 4 and row["infusion_day_text"] == "day 4 of 28"
        assert (
            row["temperature"].endswith("°C (axillary), just now")
            or "min ago" in row["temperature"]
        )
        assert row["pump"].startswith("running, reported 4 min ago")
        assert row["pump"].endswith("battery 76 %")
        expected_empty = reported + timedelta(hours=3)
        assert datetime.fromisoformat(row["bag_empty_at"]) == expected_empty
        assert row["bag"].startswith("30 mL at 10 mL/h, empty about ")
        assert f"thermometer thermo-{api_world.patient_a}: last seen" in " ".join(row["devices"])
        assert f"pump pump-{api_world.patient_a}: last seen 4 min ago" in row["devices"]
        keys = [a["dedup_key"] for a in row["open_alerts"]]
        assert api_world.alert_a in keys
        assert row["alerts"].startswith(f"{len(keys)} open")

        # The other team's clinician sees their own patient and not team A's.
        r = await client.get("/api/roster", headers=bearer(await api_world.token("clinician_b")))
        assert r.status_code == 200
        theirs = {p["patient_id"] for p in r.json()["patients"]}
        assert api_world.patient_b in theirs and api_world.patient_a not in theirs


async def test_roster_sorts_and_refuses_an_unknown_sort(api_world: World) -> None:
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        token = await api_world.token("clinician_a")
        r = await client.get("/api/roster?sort=patient", headers=bearer(token))
        assert r.status_code == 200 and r.json()["sort"] == "patient"
        ids = [p["patient_id"] for p in r.json()["patients"]]
        assert ids == sorted(ids) and api_world.patient_a in ids
        r = await client.get("/api/roster?sort=name", headers=bearer(token))
        assert r.status_code == 422
