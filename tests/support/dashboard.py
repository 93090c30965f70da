"""What the dashboard's browser tests share: Debian's Chromium for Playwright (no browser
downloaded by the test tool) with flags that keep it from reaching for the network this machine
does not have, where screenshots are kept, the care-team API served over HTTP on loopback, a
user with the tests' password, and logging in through the login page."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI

from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.app import server_options
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from tests.api.conftest import until_serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "a long enough test password"


async def add_user(
    dsn: str, user_id: str, username: str, name: str, role: Role, teams: Sequence[str]
) -> None:
    """A user of ``teams`` whose password is PASSWORD."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        await ApiRepository(pool).create_user(
            user_id, username, name, hash_password(PASSWORD), role, teams
        )
    finally:
        await pool.close()


@asynccontextmanager
async def served(app: FastAPI, settings: ApiSettings) -> AsyncIterator[str]:
    """``app`` served on 127.0.0.1 at ``settings.port`` (its start-up run first); its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
            **server_options(settings),
        )
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def log_in(page: Any, base_url: str, username: str) -> None:
    """Through the login page, with PASSWORD, until the dashboard is shown."""
    await page.goto(f"{base_url}/login")
    await page.fill("#username", username)
    await page.fill("#password", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base_url}/")
