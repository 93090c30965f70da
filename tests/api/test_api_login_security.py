"""Login and session security over real HTTP: a guesser cannot lock the account's owner out,
a forwarded address is believed only from a configured proxy, and logout ends the token."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn

from services.api.app import server_options
from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import PASSWORD, World, bearer, free_port, until_serving

pytestmark = pytest.mark.stack


@asynccontextmanager
async def serving(**settings: object) -> AsyncIterator[str]:
    """An API of its own (its own login throttles), served as ``vigil api serve`` serves it."""
    port = free_port()
    config = ApiSettings(port=port, **settings)  # type: ignore[arg-type]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            **server_options(config),
        )
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def login(client: httpx.AsyncClient, username: str, password: str, address: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"X-Forwarded-For": address} if address else {}
    return client.post(
        "/auth/token", data={"username": username, "password": password}, headers=headers
    )


async def test_wrong_passwords_from_one_place_do_not_lock_the_owner_out(api_world: World) -> None:
    """Behind the hospital's proxy: five wrong passwords from one workstation make that one
    wait (429), and the account's owner at another workstation logs in."""
    username = api_world.users["clinician_a"]
    async with (
        serving(trusted_proxies="127.0.0.1") as base,
        httpx.AsyncClient(base_url=base) as client,
    ):
        for _ in range(5):
            assert (await login(client, username, "guess", "10.1.0.66")).status_code == 401
        blocked = await login(client, username, PASSWORD, "10.1.0.66")
        assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
        owner = await login(client, username, PASSWORD, "10.1.0.12")
        assert owner.status_code == 200, owner.text


async def test_a_forwarded_address_is_believed_only_from_a_trusted_proxy(
    api_world: World,
) -> None:
    """Fifty failed logins, each claiming another address in X-Forwarded-For. Without a trusted
    proxy (the default) they all count against the connection's own address, and the next try
    waits. Positive control: with the proxy trusted, each claimed address counts apart."""

    async def flood(base: str, addresses: Callable[[int], str]) -> int:
        async with httpx.AsyncClient(base_url=base) as client:
            for n in range(50):
                r = await login(client, f"nobody-{uuid.uuid4().hex[:8]}", "x", addresses(n))
                assert r.status_code == 401, (n, r.status_code)
            r = await login(client, f"nobody-{uuid.uuid4().hex[:8]}", "x", addresses(50))
            return r.status_code

    async with serving() as base:
        assert await flood(base, lambda n: f"10.2.0.{n}") == 429
    async with serving(trusted_proxies="127.0.0.1") as base:
        assert await flood(base, lambda n: f"10.3.0.{n}") == 401


async def test_logout_revokes_the_token(api_world: World) -> None:
    first = await api_world.token("auditor_a")
    second = await api_world.token("auditor_a")
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        assert (await client.get("/auth/me", headers=bearer(first))).status_code == 200
        out = await client.post("/auth/logout", headers=bearer(first))
        assert out.status_code == 204
        assert (await client.get("/auth/me", headers=bearer(first))).status_code == 401
        assert (await client.get("/api/patients", headers=bearer(first))).status_code == 401
        # Only that session ended: the same user's other token still works.
        assert (await client.get("/auth/me", headers=bearer(second))).status_code == 200
        # Logging out again, or without a token, answers the same and changes nothing.
        assert (await client.post("/auth/logout", headers=bearer(first))).status_code == 204
        assert (await client.post("/auth/logout")).status_code == 204
