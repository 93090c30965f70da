"""The whole-course temperature endpoint (served from the ``temperature_hourly`` aggregate), the
care team's zone on the alert list, and a °F reading on the patient page, over real HTTP."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import PASSWORD, World, bearer

pytestmark = pytest.mark.stack

PATH = "/api/patients/{}/temperature-hourly"


def floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


@pytest.fixture
async def conn(stack_env: dict[str, str]) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        yield connection
    finally:
        await connection.close()


async def refresh_backfill(conn: asyncpg.Connection, start: datetime, end: datetime) -> None:
    """Readings stored for hours older than the aggregate's refresh look-back (3 days) reach
    the TimescaleDB continuous aggregate only when a refresh covers them (docs/storage.md,
    backfill): what an operator runs after such a backfill. Plain PostgreSQL's view needs
    nothing. Recent late readings need no refresh: the API reads those hours from the rows."""
    if await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"):
        await conn.execute(
            "CALL refresh_continuous_aggregate("
            "'temperature_hourly', $1::timestamptz, $2::timestamptz)",
            start,
            end,
        )


async def add_reading(
    conn: asyncpg.Connection,
    patient: str,
    at: datetime,
    value_c: float,
    original: tuple[float, str] | None = None,
) -> None:
    value, unit = original or (value_c, "C")
    await conn.execute(
        """
        INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id,
            message_id, seq, value_c, original_value, original_unit, site)
        VALUES ($1, $1, $2, $3, $4, 0, $5, $6, $7, 'axillary')
        """,
        at,
        patient,
        f"thermo-{patient}",
        uuid.uuid4(),
        value_c,
        value,
        unit,
    )


async def expected_hours(conn: asyncpg.Connection, patient: str, since: datetime) -> list[Any]:
    """The hours computed here from the rows, to compare with what the aggregate serves."""
    rows = await conn.fetch(
        "SELECT device_time, value_c FROM temperature_readings "
        "WHERE patient_id = $1 AND device_time >= $2",
        patient,
        since,
    )
    by_hour: dict[datetime, list[float]] = defaultdict(list)
    for r in rows:
        by_hour[floor_hour(r["device_time"].astimezone(UTC))].append(r["value_c"])
    return [(hour, len(v), min(v), max(v), sum(v) / len(v)) for hour, v in sorted(by_hour.items())]


def served_hours(body: dict[str, Any]) -> list[Any]:
    return [
        (
            datetime.fromisoformat(h["bucket"]).astimezone(UTC),
            h["readings"],
            h["min_c"],
            h["max_c"],
            pytest.approx(h["mean_c"]),
        )
        for h in body["hours"]
    ]


def test_the_endpoint_is_in_the_openapi_document() -> None:
    schema = create_app(ApiSettings()).openapi()
    operation = schema["paths"]["/api/patients/{patient_id}/temperature-hourly"]["get"]
    assert [p["name"] for p in operation["parameters"] if p["in"] == "query"] == ["since"]


async def test_hourly_temperature_is_scoped_audited_and_defaults_to_28_days(
    api_world: World, conn: asyncpg.Connection
) -> None:
    """Team A's clinician gets A's patient's hours (the hours the rows give), B's patient is a
    404 like every other patient read, and the read is audited. With no cycle recorded the
    window is the 28 days before the current hour."""
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        own = await client.get(PATH.format(api_world.patient_a))
        other = await client.get(PATH.format(api_world.patient_b))
    assert own.status_code == 200, own.text
    assert other.status_code == 404
    body = own.json()
    until = datetime.fromisoformat(body["until"])
    since = datetime.fromisoformat(body["since"])
    assert body["basis"] == "course_length" and body["capped"] is False
    assert since == floor_hour(until) - timedelta(days=28)
    assert body["timezone"] == "UTC"
    # The world's 20 readings over the last 10 hours, hour by hour, as the rows give them.
    assert sum(h["readings"] for h in body["hours"]) == 20
    assert served_hours(body) == await expected_hours(conn, api_world.patient_a, since)
    assert (
        f"clinician_a-{api_world.run}",
        "patient.temperature_hourly",
        f"patient:{api_world.patient_a}",
    ) in [entry[:3] for entry in api_world.audit.entries]
    assert not [e for e in api_world.audit.entries if e[2] == f"patient:{api_world.patient_b}"]


async def test_the_window_starts_at_the_current_cycle(
    api_world: World, conn: asyncpg.Connection
) -> None:
    """The newest cycle start not in the future is the default start (on its hour); a cycle
    recorded for next week is not the current one."""
    patient = api_world.patient_a
    now = datetime.now(UTC)
    current = now - timedelta(hours=4, minutes=20)
    await conn.execute(
        "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) VALUES "
        "($1, $2, 8), ($1, $3, 8), ($1, $4, 8)",
        patient,
        now - timedelta(days=40),
        current,
        now + timedelta(days=7),
    )
    try:
        token = await api_world.token("clinician_a")
        async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
            body = (await client.get(PATH.format(patient))).json()
    finally:
        await conn.execute("DELETE FROM patient_cycles WHERE patient_id = $1", patient)
    since = datetime.fromisoformat(body["since"])
    assert body["basis"] == "cycle_start" and body["capped"] is False
    assert since == floor_hour(current)
    assert served_hours(body) == await expected_hours(conn, patient, since)
    assert 0 < sum(h["readings"] for h in body["hours"]) < 20


async def test_since_is_capped_at_28_days_and_needs_an_offset(
    api_world: World, conn: asyncpg.Connection
) -> None:
    """A since 40 days back is moved up to 28 days before the current hour (and says so): a
    reading 30 days old is not served, one 27 days old is. A since without an offset, or after
    now, is 422."""
    patient = api_world.patient_a
    now = datetime.now(UTC)
    await add_reading(conn, patient, now - timedelta(days=30), 36.4)
    await add_reading(conn, patient, now - timedelta(days=27), 36.9)
    await refresh_backfill(conn, now - timedelta(days=31), now - timedelta(days=26))
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        capped = await client.get(
            PATH.format(patient), params={"since": (now - timedelta(days=40)).isoformat()}
        )
        recent = await client.get(
            PATH.format(patient), params={"since": (now - timedelta(hours=3)).isoformat()}
        )
        naive = await client.get(PATH.format(patient), params={"since": "2025-01-15T02:00:00"})
        future = await client.get(
            PATH.format(patient), params={"since": (now + timedelta(hours=1)).isoformat()}
        )
        other = await client.get(
            PATH.format(api_world.patient_b),
            params={"since": (now - timedelta(hours=3)).isoformat()},
        )
    assert capped.status_code == 200, capped.text
    body = capped.json()
    since = datetime.fromisoformat(body["since"])
    assert body["basis"] == "requested" and body["capped"] is True
    assert since == floor_hour(datetime.fromisoformat(body["until"])) - timedelta(days=28)
    buckets = [datetime.fromisoformat(h["bucket"]) for h in body["hours"]]
    assert floor_hour(now - timedelta(days=27)) in buckets
    assert floor_hour(now - timedelta(days=30)) not in buckets
    assert min(buckets) >= since
    assert sum(h["readings"] for h in body["hours"]) == 21

    assert recent.status_code == 200
    window = recent.json()
    assert window["basis"] == "requested" and window["capped"] is False
    assert datetime.fromisoformat(window["since"]) == floor_hour(now - timedelta(hours=3))
    assert served_hours(window) == await expected_hours(
        conn, patient, floor_hour(now - timedelta(hours=3))
    )
    assert naive.status_code == 422 and future.status_code == 422
    assert other.status_code == 404


async def test_alert_list_carries_the_care_teams_zone(
    api_world: World, conn: asyncpg.Connection
) -> None:
    """Each alert in /api/alerts names its care team's zone, so the dashboard can show the
    times in it; a change of the team's zone shows at the next read."""
    token = await api_world.token("clinician_a")
    await conn.execute(
        "UPDATE care_teams SET timezone = 'Asia/Kolkata' WHERE care_team_id = $1",
        api_world.team_a,
    )
    try:
        async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
            items = (await client.get("/api/alerts", params={"limit": 500})).json()["items"]
    finally:
        await conn.execute(
            "UPDATE care_teams SET timezone = 'UTC' WHERE care_team_id = $1", api_world.team_a
        )
    mine = [a for a in items if a["dedup_key"] == api_world.alert_a]
    assert len(mine) == 1 and mine[0]["timezone"] == "Asia/Kolkata"


async def test_patient_page_shows_a_fahrenheit_reading_in_both_units_and_the_course_plot(
    api_world: World, conn: asyncpg.Connection
) -> None:
    """A reading sent as 100.4 °F is the temperature card's 38.0 °C and 100.4 °F as sent; the
    whole-course plot draws one bar per hour the endpoint serves, with both fever lines."""
    patient = api_world.patient_a
    await add_reading(conn, patient, datetime.now(UTC), 38.0, (100.4, "F"))
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        await client.post(
            "/auth/token", data={"username": api_world.users["clinician_a"], "password": PASSWORD}
        )
        html = (await client.get(f"/patients/{patient}")).text
        body = (await client.get(PATH.format(patient))).json()
    assert '<strong id="latest-temperature">38.0 °C</strong>' in html
    assert '<span id="latest-original">100.4 °F as sent</span>' in html
    assert "38.0 °C (100.4 °F as sent) at" in html  # the 24-hour plot's point
    start = html.index('id="course-plot"')
    course = html[start : html.index("</svg>", start)]
    assert course.count('class="hour"') == len(body["hours"]) > 0
    assert course.count('class="threshold"') == 2
    assert 'class="mean"' in course
