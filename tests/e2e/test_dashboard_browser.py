"""In a real browser: a clinician sees a simulated fever appear live and acknowledges it.

Debian's Chromium driven by Playwright (no browser downloaded by the test tool), the API served
over HTTP on loopback, and the whole pipeline (Mosquitto, ingest, Kafka, rules, notify,
PostgreSQL) behind it. A screenshot of the dashboard is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import uvicorn

from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.app import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from tests.e2e.conftest import Pipeline, free_port, publish, register_patient, temperature

pytestmark = pytest.mark.stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "a long enough test password"
# The flags keep Chromium from reaching for the network this machine does not have.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
async def api_base_url(stack_env: dict[str, str]) -> AsyncIterator[str]:
    port = free_port()
    app = create_app(ApiSettings(port=port, stream_poll_s=0.3))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_clinician_sees_a_fever_live_and_acknowledges_it(
    pipeline: Pipeline, stack_env: dict[str, str], api_base_url: str
) -> None:
    """Log in, watch the fever of a simulated reading appear without reloading, acknowledge it,
    and see it move to acknowledged (in the page and in notify's escalation record)."""
    from playwright.async_api import async_playwright

    dsn = stack_env["VIGIL_PG_DSN"]
    patient, device, _ = await register_patient(dsn, pipeline.run_id, "browser")
    username = f"nurse-{pipeline.run_id}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await ApiRepository(pool).create_user(
            f"u-{pipeline.run_id}",
            username,
            "Night nurse",
            hash_password(PASSWORD),
            Role.CLINICIAN,
            [f"team-e2e-{pipeline.run_id}"],
        )
    finally:
        await pool.close()

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 700})
            await page.goto(f"{api_base_url}/login")
            await page.fill("#username", username)
            await page.fill("#password", PASSWORD)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{api_base_url}/")
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
            await page.screenshot(path=str(ARTIFACTS / "dashboard-alert-open.png"))

            await row.locator("button.ack").click()
            await page.wait_for_selector(
                f"tr[data-dedup-key^='{patient}:'][data-status='acknowledged']", timeout=15_000
            )
            assert username in (await row.inner_text())
            await page.screenshot(path=str(ARTIFACTS / "dashboard-alert-acknowledged.png"))
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
