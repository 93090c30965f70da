"""In a real browser: a clinician sees a simulated fever appear live and acknowledges it, with
the alert's time in the care team's zone (not the browser's), then opens the patient page: a
reading sent in °F shown in both units and the whole-course plot drawn.

Debian's Chromium driven by Playwright (no browser downloaded by the test tool), the API served
over HTTP on loopback, and the whole pipeline (Mosquitto, ingest, Kafka, rules, notify,
PostgreSQL) behind it. Screenshots of the dashboard and the patient page are kept in
``test-artifacts/``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from tests.api.test_api_temperature_hourly import refresh_backfill
from tests.e2e.conftest import Pipeline, free_port, publish, register_patient, temperature
from tests.polling import eventually
from tests.support.dashboard import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    add_user,
    log_in,
    served,
)

pytestmark = pytest.mark.stack

#: The care team's zone, and a different one for the browser: the list must show the team's.
TEAM_ZONE = "Asia/Kolkata"
BROWSER_ZONE = "America/New_York"


@pytest.fixture(scope="module")
async def api_base_url(stack_env: dict[str, str]) -> AsyncIterator[str]:
    settings = ApiSettings(port=free_port(), stream_poll_s=0.3)
    async with served(create_app(settings), settings) as base_url:
        yield base_url


async def test_clinician_sees_a_fever_live_and_acknowledges_it(
    pipeline: Pipeline, stack_env: dict[str, str], api_base_url: str
) -> None:
    """Log in, watch the fever of a simulated reading appear without reloading, acknowledge it,
    and see it move to acknowledged (in the page and in notify's escalation record)."""
    from playwright.async_api import async_playwright

    dsn = stack_env["VIGIL_PG_DSN"]
    patient, device, _ = await register_patient(dsn, pipeline.run_id, "browser")
    username = f"nurse-{pipeline.run_id}"
    team = f"team-e2e-{pipeline.run_id}"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE care_teams SET timezone = $1 WHERE care_team_id = $2", TEAM_ZONE, team
        )
    finally:
        await conn.close()
    await add_user(dsn, f"u-{pipeline.run_id}", username, "Night nurse", Role.CLINICIAN, [team])

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(
                viewport={"width": 1200, "height": 700}, timezone_id=BROWSER_ZONE
            )
            await log_in(page, api_base_url, username)
            await page.wait_for_selector("#live:text('live')", timeout=15_000)
            row = page.locator(f"tr[data-dedup-key^='{patient}:']")
            assert await row.count() == 0

            await publish(
                stack_env, f"vigil/v1/dev/{device}/temperature", temperature(device, 39.1, 1)
            )
            # No reload: the row arrives through the server-sent event stream.
            await row.wait_for(timeout=60_000)
            assert await row.get_attribute("data-status") == "open"
            assert "Fever 39.1" in (await row.inner_text())
            # Opened at the reading's device time, shown in the team's zone with the zone named.
            opened_at = await _opened_at(dsn, patient)
            local = opened_at.astimezone(ZoneInfo(TEAM_ZONE))
            opened = row.locator("td.opened time")
            assert await opened.inner_text() == f"{local:%d %b %H:%M} ({TEAM_ZONE})"
            iso = await opened.get_attribute("datetime")
            assert iso is not None and datetime.fromisoformat(iso) == opened_at
            await page.screenshot(path=str(ARTIFACTS / "dashboard-alert-open.png"))

            await row.locator("button.ack").click()
            await page.wait_for_selector(
                f"tr[data-dedup-key^='{patient}:'][data-status='acknowledged']", timeout=15_000
            )
            assert username in (await row.inner_text())
            await page.screenshot(path=str(ARTIFACTS / "dashboard-alert-acknowledged.png"))

            # The roster: the child's row, with the newest reading and the acknowledged fever.
            await page.goto(f"{api_base_url}/roster")
            roster_row = page.locator(f"tr[data-patient='{patient}']")
            await roster_row.wait_for(timeout=15_000)
            alerts_cell = await roster_row.locator("td.alerts").inner_text()
            assert alerts_cell.startswith("1 open"), alerts_cell
            assert "not acknowledged" not in alerts_cell and f"ack {username}" in alerts_cell
            assert "Fever 39.1" in alerts_cell
            assert (await roster_row.locator("td.temperature").inner_text()).startswith("39.1 °C")
            await page.screenshot(path=str(ARTIFACTS / "dashboard-roster.png"), full_page=True)

            # The alert's own page, from the roster: raised, paged by e-mail, acknowledged.
            await roster_row.locator("td.alerts a").first.click()
            await page.wait_for_selector("#timeline")
            assert await page.locator("#status").inner_text() == "acknowledged"
            steps = await page.locator("#timeline tbody tr").all_inner_texts()
            text = "\n".join(steps)
            assert "Raised by the rules: Fever 39.1" in text, text
            assert " by email: sent" in text, text
            assert f"Acknowledged by {username} (via dashboard)" in text, text
            raised = next(i for i, s in enumerate(steps) if "Raised by the rules" in s)
            acked = next(i for i, s in enumerate(steps) if "Acknowledged by" in s)
            assert raised < acked
            await page.screenshot(
                path=str(ARTIFACTS / "dashboard-alert-timeline.png"), full_page=True
            )

            # The patient page: the caregiver read 98.6 °F; the course began ten days ago.
            await _course_history(dsn, patient, device)
            fahrenheit = json.loads(temperature(device, 98.6, 2))
            fahrenheit["unit"] = "F"
            await publish(
                stack_env, f"vigil/v1/dev/{device}/temperature", json.dumps(fahrenheit).encode()
            )
            await _stored_in_fahrenheit(dsn, patient)
            await page.goto(f"{api_base_url}/patients/{patient}")
            assert await page.locator("#latest-temperature").inner_text() == "37.0 °C"
            assert await page.locator("#latest-original").inner_text() == "98.6 °F as sent"
            course = page.locator("#course-plot")
            await course.scroll_into_view_if_needed()
            # One bar per hour with readings (all of them fall in this cycle's window).
            bars = await course.locator("rect.hour").count()
            assert bars == await _hours_with_readings(dsn, patient) >= 240
            assert await course.locator("polyline.mean").count() >= 1
            assert await course.locator("line.threshold").count() == 2
            assert "day 8" in (await course.text_content() or "")
            box = await course.bounding_box()
            assert box is not None and box["width"] > 700 and box["height"] > 200
            await page.screenshot(
                path=str(ARTIFACTS / "dashboard-patient-course.png"), full_page=True
            )
        finally:
            await browser.close()

    conn = await asyncpg.connect(dsn)
    try:
        acknowledged_by = await conn.fetchval(
            "SELECT acknowledged_by FROM escalations WHERE patient_id = $1", patient
        )
    finally:
        await conn.close()
    assert acknowledged_by == username


async def _opened_at(dsn: str, patient: str) -> datetime:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT min(device_time) FROM alerts WHERE patient_id = $1", patient
        )
    finally:
        await conn.close()
    assert isinstance(value, datetime)
    return value


async def _course_history(dsn: str, patient: str, device: str) -> None:
    """A cycle that started ten days ago on the hour, and a reading every 20 minutes from its
    start up to the current hour (one hour of them with a fever)."""
    now = datetime.now(UTC)
    start = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=10)
    end = now.replace(minute=0, second=0, microsecond=0)
    rows = []
    at = start
    while at < end:
        fever = timedelta(days=2) <= at - start < timedelta(days=2, hours=1)
        value = 38.6 if fever else 36.8 + 0.4 * ((at.hour % 6) / 6)
        rows.append((at, patient, device, uuid.uuid4(), value))
        at += timedelta(minutes=20)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO patient_cycles (patient_id, cycle_start, step_up_day) VALUES ($1, $2, 8)",
            patient,
            start,
        )
        await conn.executemany(
            """
            INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id,
                message_id, seq, value_c, original_value, original_unit, site)
            VALUES ($1, $1, $2, $3, $4, 0, $5, $5, 'C', 'axillary')
            """,
            rows,
        )
        # Ten days back is older than the hourly aggregate's refresh look-back: on
        # TimescaleDB the backfill reaches the plot after the refresh an operator runs.
        await refresh_backfill(conn, start, end)
    finally:
        await conn.close()


async def _hours_with_readings(dsn: str, patient: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT count(DISTINCT date_trunc('hour', device_time AT TIME ZONE 'UTC')) "
            "FROM temperature_readings WHERE patient_id = $1",
            patient,
        )
    finally:
        await conn.close()
    return int(value)


async def _stored_in_fahrenheit(dsn: str, patient: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await eventually(
            lambda: conn.fetchval(
                "SELECT count(*) FROM temperature_readings "
                "WHERE patient_id = $1 AND original_unit = 'F'",
                patient,
            ),
            timeout_s=30,
            interval_s=0.1,
            what="the °F reading to be stored",
        )
    finally:
        await conn.close()
