"""The care-team API's authentication and object-level authorization, over real HTTP."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from services.api.app import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import PASSWORD, World, bearer

pytestmark = pytest.mark.stack


def api_paths(world: World) -> list[tuple[str, str]]:
    """Every operation in the OpenAPI schema except login, with team A's ids in the path."""
    schema = create_app(ApiSettings()).openapi()
    fill = {"patient_id": world.patient_a, "dedup_key": quote(world.alert_a, safe="")}
    return [
        (method.upper(), path.format(**fill))
        for path, operations in schema["paths"].items()
        if path not in ("/auth/token", "/auth/logout")
        for method in operations
    ]


async def test_every_endpoint_refuses_a_request_without_a_token(api_world: World) -> None:
    """No /api endpoint answers anything but 401 to an anonymous caller."""
    paths = api_paths(api_world)
    assert len(paths) >= 9  # the list really enumerates the API, not nothing
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        for method, path in paths:
            response = await client.request(method, path)
            assert response.status_code == 401, (method, path, response.status_code)


async def test_a_forged_token_is_refused(api_world: World) -> None:
    """A token signed with another secret is no token."""
    from datetime import UTC, datetime, timedelta

    from services.api.adapters.credentials import issue_token
    from services.api.domain.access import Principal, Role

    forged = issue_token(
        Principal(f"clinician_a-{api_world.run}", "x", Role.ADMIN, frozenset()),
        "some-other-secret-of-at-least-32-bytes",
        datetime.now(UTC),
        timedelta(minutes=5),
    )
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        r = await client.get("/api/patients", headers=bearer(forged))
    assert r.status_code == 401


async def test_clinician_sees_only_their_teams_patients(api_world: World) -> None:
    """A clinician of team A lists A's patient and not B's; B's patient answers 404 everywhere."""
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        listing = (await client.get("/api/patients", params={"limit": 500})).json()
        ids = {p["patient_id"] for p in listing["items"]}
        assert api_world.patient_a in ids and api_world.patient_b not in ids
        for path in ("", "/readings", "/pump"):
            own = await client.get(f"/api/patients/{api_world.patient_a}{path}")
            other = await client.get(f"/api/patients/{api_world.patient_b}{path}")
            assert own.status_code == 200, path
            assert other.status_code == 404, path
        other_alert = await client.get(f"/api/alerts/{quote(api_world.alert_b, safe='')}")
        assert other_alert.status_code == 404
        ack_other = await client.post(f"/api/alerts/{quote(api_world.alert_b, safe='')}/ack")
        assert ack_other.status_code == 404
        alerts = (await client.get("/api/alerts", params={"limit": 500})).json()["items"]
        keys = {a["dedup_key"] for a in alerts}
        assert api_world.alert_a in keys and api_world.alert_b not in keys


async def test_read_only_role_cannot_acknowledge(api_world: World) -> None:
    """An auditor reads team A's alert but acknowledging it is 403, and nothing is acknowledged."""
    token = await api_world.token("auditor_a")
    path = f"/api/alerts/{quote(api_world.alert_a, safe='')}"
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        assert (await client.get(path)).status_code == 200
        r = await client.post(f"{path}/ack")
    assert r.status_code == 403
    assert not [c for c in api_world.actions.calls if c[1] == api_world.alert_a]


async def test_clinician_acknowledges_but_may_not_resolve(api_world: World) -> None:
    """A clinician's acknowledgement reaches notify; resolving is the charge nurse's."""
    token = await api_world.token("clinician_a")
    path = f"/api/alerts/{quote(api_world.alert_a, safe='')}"
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        assert (await client.post(f"{path}/ack")).status_code == 200
        assert (await client.post(f"{path}/resolve")).status_code == 403
    assert ("ack", api_world.alert_a, api_world.users["clinician_a"]) in api_world.actions.calls
    nurse = await api_world.token("nurse_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(nurse)) as client:
        assert (await client.post(f"{path}/resolve")).status_code == 200


async def test_cookie_writes_need_the_csrf_header(api_world: World) -> None:
    """With the dashboard cookie, a POST without X-Requested-By is refused (CSRF defence)."""
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        login = await client.post(
            "/auth/token", data={"username": api_world.users["clinician_a"], "password": PASSWORD}
        )
        assert login.status_code == 200 and "vigil_session" in client.cookies
        path = f"/api/alerts/{quote(api_world.alert_a, safe='')}/ack"
        assert (await client.post(path)).status_code == 403
        ok = await client.post(path, headers={"X-Requested-By": "vigil-dashboard"})
        assert ok.status_code == 200


async def test_login_is_throttled_after_repeated_failures(api_world: World) -> None:
    """Five wrong passwords for one user, then even the right one waits: 429 with Retry-After."""
    username = api_world.users["clinician_b"]
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        for _ in range(5):
            r = await client.post("/auth/token", data={"username": username, "password": "nope"})
            assert r.status_code == 401
        r = await client.post("/auth/token", data={"username": username, "password": PASSWORD})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1


async def test_patient_reads_are_audited(api_world: World) -> None:
    """Reading a patient's readings writes who read which patient to the audit trail."""
    token = await api_world.token("nurse_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        assert (
            await client.get(f"/api/patients/{api_world.patient_a}/readings")
        ).status_code == 200
    assert (f"nurse_a-{api_world.run}", "patient.readings", f"patient:{api_world.patient_a}") in [
        entry[:3] for entry in api_world.audit.entries
    ]


async def test_lists_are_paginated(api_world: World) -> None:
    """limit and offset page through alerts; total counts them all."""
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        first = (await client.get("/api/alerts", params={"limit": 1})).json()
        assert len(first["items"]) == 1 and first["total"] >= 1 and first["limit"] == 1
        bad = await client.get("/api/alerts", params={"limit": 0})
    assert bad.status_code == 422
