"""The care team's logins through the API (``/api/users``), over real HTTP on the stack's
PostgreSQL: a charge nurse adds and manages clinicians and charge nurses of their team but no
admin or auditor; a clinician or auditor manages nobody; another team's user answers 404; a
password is shown once and logs in; a deactivation or a reset ends a live token at once; nobody
deactivates themselves; every change is in the audit log."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.domain.access import Role
from tests.api.conftest import PASSWORD, World, bearer
from tests.polling import eventually

pytestmark = pytest.mark.stack


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def login(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/auth/token", data={"username": username, "password": password})


async def token_of(client: httpx.AsyncClient, username: str, password: str) -> dict[str, str]:
    r = await login(client, username, password)
    assert r.status_code == 200, r.text
    return dict(bearer(str(r.json()["access_token"])))


async def add(
    client: httpx.AsyncClient, by: dict[str, str], username: str, role: str, teams: list[str]
) -> httpx.Response:
    return await client.post(
        "/api/users",
        json={"username": username, "role": role, "care_teams": teams},
        headers=by,
    )


async def audited(pool: asyncpg.Pool, username: str) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT actor, action FROM audit_log WHERE details->>'username' = $1 "
        "AND action LIKE 'user.%' ORDER BY seq",
        username,
    )
    return [(r["actor"], r["action"]) for r in rows]


async def test_a_charge_nurse_adds_a_clinician_whose_password_is_shown_once_and_logs_in(
    api_world: World, pool: asyncpg.Pool
) -> None:
    new = f"new-clin-{api_world.run}"
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        nurse = await token_of(client, api_world.users["nurse_a"], PASSWORD)
        created = await add(client, nurse, new, "clinician", [api_world.team_a])
        assert created.status_code == 201, created.text
        assert created.headers["cache-control"] == "no-store"
        body = created.json()
        password = body["password"]
        assert len(password) >= 20
        assert body["user"] | {"created_at": None} == {
            "username": new,
            "display_name": new,
            "role": "clinician",
            "care_teams": [api_world.team_a],
            "active": True,
            "created_at": None,
            "deactivated_at": None,
            "sessions_ended_at": None,
        }
        # The password logs in; nothing shows it, or its hash, again.
        mine = await token_of(client, new, password)
        assert (await client.get("/api/patients", headers=mine)).status_code == 200
        assert (await client.get("/api/users", headers=mine)).status_code == 403
        listing = await client.get("/api/users", headers=nurse)
        assert listing.status_code == 200
        assert password not in listing.text and "hash" not in listing.text
        listed = {u["username"]: u for u in listing.json()}
        assert listed[new]["role"] == "clinician"
        assert api_world.users["nurse2_a"] in listed
        assert api_world.users["clinician_b"] not in listed  # another team's
        again = await add(client, nurse, new, "clinician", [api_world.team_a])
        assert again.status_code == 409

        # Promoted to charge nurse (in force at once), never above.
        role = f"/api/users/{new}/role"
        promoted = await client.put(role, json={"role": "charge_nurse"}, headers=nurse)
        assert promoted.status_code == 200 and promoted.json()["changed"] is True
        assert (await client.get("/api/users", headers=mine)).status_code == 200
        assert (await client.put(role, json={"role": "admin"}, headers=nurse)).status_code == 403
    assert await audited(pool, new) == [
        (f"nurse_a-{api_world.run}", "user.created"),
        (f"nurse_a-{api_world.run}", "user.role_changed"),
    ]


async def test_roles_that_may_not_manage_users_are_refused(api_world: World) -> None:
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        nurse = await token_of(client, api_world.users["nurse_a"], PASSWORD)
        for label in ("clinician_a", "auditor_a"):
            caller = await token_of(client, api_world.users[label], PASSWORD)
            assert (await client.get("/api/users", headers=caller)).status_code == 403
            r = await add(
                client, caller, f"x-{label}-{api_world.run}", "clinician", [api_world.team_a]
            )
            assert r.status_code == 403
            deactivate = f"/api/users/{api_world.users['nurse2_a']}/deactivate"
            assert (await client.post(deactivate, headers=caller)).status_code == 403
        # A charge nurse hands out neither admin nor auditor.
        for role in ("admin", "auditor"):
            r = await add(client, nurse, f"x-{role}-{api_world.run}", role, [api_world.team_a])
            assert r.status_code == 403, r.text


async def test_another_teams_user_is_not_found(api_world: World) -> None:
    other = api_world.users["clinician_b"]
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        nurse = await token_of(client, api_world.users["nurse_a"], PASSWORD)
        for method, path, body in (
            ("POST", f"/api/users/{other}/deactivate", None),
            ("POST", f"/api/users/{other}/reset-password", None),
            ("PUT", f"/api/users/{other}/role", {"role": "clinician"}),
            ("PUT", f"/api/users/{other}/care-teams", {"care_teams": [api_world.team_a]}),
            ("POST", f"/api/users/nobody-{api_world.run}/deactivate", None),
        ):
            r = await client.request(method, path, json=body, headers=nurse)
            assert r.status_code == 404, (method, path, r.text)
        # Nor can a user of team A be added to, or moved to, team B.
        r = await add(client, nurse, f"to-b-{api_world.run}", "clinician", [api_world.team_b])
        assert r.status_code == 404
        teams = f"/api/users/{api_world.users['nurse2_a']}/care-teams"
        r = await client.put(teams, json={"care_teams": [api_world.team_b]}, headers=nurse)
        assert r.status_code == 404
    # The user of team B is untouched and still logs in.
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        assert (await login(client, other, PASSWORD)).status_code == 200


async def test_a_reset_and_a_deactivation_end_the_live_token_at_once(
    api_world: World, pool: asyncpg.Pool
) -> None:
    new = f"to-end-{api_world.run}"
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        nurse = await token_of(client, api_world.users["nurse_a"], PASSWORD)
        first = (await add(client, nurse, new, "clinician", [api_world.team_a])).json()["password"]
        live = await token_of(client, new, first)
        assert (await client.get("/api/patients", headers=live)).status_code == 200

        reset = await client.post(f"/api/users/{new}/reset-password", headers=nurse)
        assert reset.status_code == 200 and reset.headers["cache-control"] == "no-store"
        second = reset.json()["password"]
        assert second != first
        assert (await client.get("/api/patients", headers=live)).status_code == 401
        assert (await login(client, new, first)).status_code == 401
        # A token is stamped to the second: one issued in the same second as the reset counts
        # as issued before it, so a working session is one issued in a later second.

        async def fresh_session() -> dict[str, str] | None:
            session = await token_of(client, new, second)
            ok = (await client.get("/api/patients", headers=session)).status_code == 200
            return session if ok else None

        live = await eventually(fresh_session, timeout_s=5, what="a session after the reset")

        off = await client.post(f"/api/users/{new}/deactivate", headers=nurse)
        assert off.status_code == 200, off.text
        user = off.json()["user"]
        assert off.json()["changed"] is True and user["active"] is False
        assert user["deactivated_at"] is not None
        assert (await client.get("/api/patients", headers=live)).status_code == 401
        assert (await login(client, new, second)).status_code == 401
        again = await client.post(f"/api/users/{new}/deactivate", headers=nurse)
        assert again.status_code == 200 and again.json()["changed"] is False
        assert (
            await client.post(f"/api/users/{new}/reset-password", headers=nurse)
        ).status_code == 409
        active = {u["username"] for u in (await client.get("/api/users", headers=nurse)).json()}
        everyone = await client.get("/api/users", params={"include_inactive": True}, headers=nurse)
        assert new not in active and new in {u["username"] for u in everyone.json()}
    assert [a for _, a in await audited(pool, new)] == [
        "user.created",
        "user.password_reset",
        "user.deactivated",
    ]


async def test_an_admin_manages_any_role_of_their_team_but_never_deactivates_themselves(
    api_world: World, pool: asyncpg.Pool
) -> None:
    admin = f"admin_a-{api_world.run}"
    await ApiRepository(pool).create_user(
        admin, admin, "admin", hash_password(PASSWORD), Role.ADMIN, [api_world.team_a]
    )
    second = f"admin2-{api_world.run}"
    auditor = f"new-auditor-{api_world.run}"
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        me = await token_of(client, admin, PASSWORD)
        nurse = await token_of(client, api_world.users["nurse_a"], PASSWORD)
        assert (await add(client, me, second, "admin", [api_world.team_a])).status_code == 201
        assert (await add(client, me, auditor, "auditor", [api_world.team_a])).status_code == 201
        # A charge nurse manages neither.
        for username in (second, auditor):
            r = await client.post(f"/api/users/{username}/reset-password", headers=nurse)
            assert r.status_code == 403
        mine = await client.post(f"/api/users/{admin}/deactivate", headers=me)
        assert mine.status_code == 409 and "yourself" in mine.json()["detail"]
        own_role = await client.put(
            f"/api/users/{admin}/role", json={"role": "clinician"}, headers=me
        )
        assert own_role.status_code == 409
        demoted = await client.put(
            f"/api/users/{second}/role", json={"role": "clinician"}, headers=me
        )
        assert demoted.status_code == 200 and demoted.json()["user"]["role"] == "clinician"
        assert (await client.get("/api/patients", headers=me)).status_code == 200
    assert await audited(pool, second) == [(admin, "user.created"), (admin, "user.role_changed")]
