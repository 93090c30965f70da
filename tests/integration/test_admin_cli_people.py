"""`vigil admin users` and `vigil admin schedules` on the local stack, against the care-team API
served over real HTTP: a login added from the command line logs in with the password shown once;
a password reset ends the sessions open with the old one; deactivation refuses the login and
every token issued before, as logout does; a role and the care teams changed from the command
line are in force at the user's next request; a rotation set and an override added from the command
line decide who is on call, as the API answers it; the refusals' exit codes; the operator in the
audit log."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from schemas.notify import ContactMethodIn, PersonIn
from services.api.app import server_options
from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import upsert_care_team
from services.notify.public import TeamRegistry
from tests.api.conftest import free_port, until_serving
from tests.polling import eventually
from vigil_tools.admin import EXIT_CONFLICT, EXIT_INVALID, EXIT_NOT_FOUND, main

pytestmark = pytest.mark.stack


def admin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run `vigil admin --local --json ...`; returns the exit code, the JSON printed, stderr."""
    code = main(["--local", "--operator", "test-operator", "--json", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


async def run_admin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    # `vigil admin` runs its own event loop: off this test's loop.
    return await asyncio.to_thread(admin, capsys, *argv)


@asynccontextmanager
async def serving() -> AsyncIterator[str]:
    """The care-team API as `vigil api serve` serves it, on the stack's database."""
    port = free_port()
    config = ApiSettings(port=port)
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


async def token(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/auth/token", data={"username": username, "password": password})


def bearer(answer: httpx.Response) -> dict[str, str]:
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


async def team(dsn: str, care_team_id: str, zone: str = "UTC") -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, care_team_id, "Oncology CLI", f"oncall@{care_team_id}.test")
        await conn.execute(
            "UPDATE care_teams SET timezone = $2 WHERE care_team_id = $1", care_team_id, zone
        )
    finally:
        await conn.close()


async def audited(dsn: str, subject: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT actor, action FROM audit_log WHERE subject = $1 ORDER BY seq", subject
        )
        return [(r["actor"], r["action"]) for r in rows]
    finally:
        await conn.close()


async def test_a_role_and_care_teams_changed_from_the_command_line(
    stack_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    care_team, other = f"team-roles-{run}", f"team-roles-other-{run}"
    username = f"clin.{run}"
    await team(dsn, care_team)
    await team(dsn, other)
    code, added, err = await run_admin(
        capsys, "users", "add", username, "--role", "clinician", "--team", care_team
    )
    assert code == 0, err
    async with serving() as base, httpx.AsyncClient(base_url=base) as client:
        session = await token(client, username, added["password (shown once)"])
        assert (await client.get("/api/users", headers=bearer(session))).status_code == 403

        code, changed, err = await run_admin(capsys, "users", "set-role", username, "admin")
        assert code == 0, err
        assert (changed["role"], changed["changed"]) == ("admin", True)
        code, again, err = await run_admin(capsys, "users", "set-role", username, "admin")
        assert code == 0 and again["changed"] is False
        listed = await client.get("/api/users", headers=bearer(session))
        assert listed.status_code == 200  # the same token, the new role
        assert username in {u["username"] for u in listed.json()}

        code, moved, err = await run_admin(
            capsys, "users", "set-teams", username, "--team", care_team, "--team", other
        )
        assert code == 0, err
        assert moved["care_teams"] == ", ".join(sorted((care_team, other)))
        code, _, err = await run_admin(
            capsys, "users", "set-teams", username, "--team", f"nope-{run}"
        )
        assert code == EXIT_NOT_FOUND and f"nope-{run}" in err
    assert [a for _, a in await audited(dsn, f"user:{added['user_id']}")] == [
        "user.created",
        "user.role_changed",
        "user.care_teams_changed",
    ]


async def test_users_added_reset_and_deactivated_from_the_command_line(
    stack_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    care_team, other = f"team-users-{run}", f"team-users-other-{run}"
    username = f"nurse.{run}"
    await team(dsn, care_team)
    await team(dsn, other)

    code, added, err = await run_admin(
        capsys, "users", "add", username, "--role", "charge_nurse", "--team", care_team,
        "--name", "Night Nurse",
    )  # fmt: skip
    assert code == 0, err
    first_password = added["password (shown once)"]
    assert len(first_password) >= 12
    assert (added["role"], added["care_teams"], added["active"]) == (
        "charge_nurse",
        care_team,
        True,
    )
    subject = f"user:{added['user_id']}"

    # Refusals: the username taken, a care team that does not exist, a bad role (argparse).
    code, _, err = await run_admin(
        capsys, "users", "add", username, "--role", "clinician", "--team", other
    )
    assert code == EXIT_CONFLICT and "taken" in err
    code, _, err = await run_admin(
        capsys, "users", "add", f"x.{run}", "--role", "clinician", "--team", f"nope-{run}"
    )
    assert code == EXIT_NOT_FOUND and f"nope-{run}" in err
    code, _, err = await run_admin(capsys, "users", "reset-password", f"ghost.{run}")
    assert code == EXIT_NOT_FOUND

    code, listed, err = await run_admin(capsys, "users", "list", "--team", care_team)
    assert code == 0, err
    assert [u["username"] for u in listed["users"]] == [username]
    code, listed, _ = await run_admin(capsys, "users", "list", "--team", other)
    assert listed["users"] == []

    async with serving() as base, httpx.AsyncClient(base_url=base) as client:
        first = await token(client, username, first_password)
        assert first.status_code == 200
        me = await client.get("/auth/me", headers=bearer(first))
        assert me.status_code == 200 and me.json()["care_teams"] == [care_team]

        # A reset: the old password and the session opened with it end; the new one works.
        code, reset, err = await run_admin(capsys, "users", "reset-password", username)
        assert code == 0, err
        second_password = reset["password (shown once)"]
        assert second_password != first_password
        assert (await client.get("/auth/me", headers=bearer(first))).status_code == 401
        assert (await token(client, username, first_password)).status_code == 401
        # A token is stamped to the second: one issued in the same second as the reset counts
        # as issued before it, so a working session is one issued in a later second.

        async def fresh_session() -> dict[str, str] | None:
            answer = await token(client, username, second_password)
            assert answer.status_code == 200
            me = await client.get("/auth/me", headers=bearer(answer))
            return bearer(answer) if me.status_code == 200 else None

        second = await eventually(fresh_session, timeout_s=5, what="a session after the reset")

        # Deactivation: the open session ends at once, as a logout would, and no new one.
        code, off, err = await run_admin(capsys, "users", "deactivate", username)
        assert code == 0, err
        assert (off["active"], off["changed"]) == (False, True)
        assert (await client.get("/auth/me", headers=second)).status_code == 401
        assert (await client.get("/api/patients", headers=second)).status_code == 401
        assert (await token(client, username, second_password)).status_code == 401

    code, again, _ = await run_admin(capsys, "users", "deactivate", username)
    assert code == 0 and again["changed"] is False
    code, _, err = await run_admin(capsys, "users", "reset-password", username)
    assert code == EXIT_CONFLICT and "deactivated" in err
    code, listed, _ = await run_admin(capsys, "users", "list", "--team", care_team)
    assert listed["users"] == []
    code, listed, _ = await run_admin(capsys, "users", "list", "--team", care_team, "--all")
    assert [(u["username"], u["active"]) for u in listed["users"]] == [(username, False)]

    entries = await audited(dsn, subject)
    assert entries == [
        ("operator:test-operator", "user.created"),
        ("operator:test-operator", "user.password_reset"),
        ("operator:test-operator", "user.deactivated"),
    ]


async def test_schedules_rotation_override_and_on_call_from_the_command_line(
    stack_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    care_team, other = f"team-sched-{run}", f"team-sched-other-{run}"
    nights = f"nights-{run}"  # schedule ids are unique across teams
    await team(dsn, care_team, "Europe/Paris")
    await team(dsn, other)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        registry = TeamRegistry(pool, lambda: datetime.now(UTC))
        nurses = [f"nurse-{k}-{run}" for k in ("a", "b", "c")]
        for person, name in zip(nurses, ("Ana", "Ben", "Cleo"), strict=True):
            await registry.put_person(
                PersonIn(
                    person_id=person,
                    name=name,
                    care_team_id=care_team,
                    contact_methods=(ContactMethodIn(channel="email", address=f"{person}@h.test"),),
                )
            )
        outsider = f"nurse-x-{run}"
        await registry.put_person(
            PersonIn(
                person_id=outsider,
                name="Xavier",
                care_team_id=other,
                contact_methods=(ContactMethodIn(channel="email", address="x@h.test"),),
            )
        )
    finally:
        await pool.close()

    # Weekly shifts handing over at 20:00 Paris time, Ana first from a Monday two weeks back:
    # on a known instant the person on call follows from the rotation alone.
    start = (datetime.now(UTC) - timedelta(days=14)).date()
    code, schedule, err = await run_admin(
        capsys, "schedules", "set-rotation", care_team, nights,
        "--participants", nurses[0], nurses[1], "--start-date", start.isoformat(),
        "--handoff", "20:00", "--shift-days", "7",
    )  # fmt: skip
    assert code == 0, err
    assert schedule["timezone"] == "Europe/Paris"  # the team's zone, when none is given
    assert (schedule["participants"], schedule["shift_days"]) == (
        f"{nurses[0]}, {nurses[1]}",
        7,
    )
    # Day 1 of the third week at 21:00 Paris: Ana's turn again (weeks: Ana, Ben, Ana).
    at = datetime.fromisoformat(f"{start + timedelta(days=14)}T21:00:00+01:00")
    code, on_call, err = await run_admin(
        capsys, "schedules", "on-call", care_team, "--at", at.isoformat()
    )
    assert code == 0, err
    (shift,) = on_call["schedules"]
    assert shift["on call"] == f"Ana ({nurses[0]})" and shift["next"] == f"Ben ({nurses[1]})"
    assert "(Europe/Paris)" in shift["until"]

    # Change only the participants: the rest of the rotation stays.
    code, schedule, err = await run_admin(
        capsys, "schedules", "set-rotation", care_team, nights,
        "--participants", nurses[1], nurses[0],
    )  # fmt: skip
    assert code == 0, err
    assert (schedule["handoff_time"], schedule["shift_days"]) == ("20:00", 7)
    code, on_call, _ = await run_admin(
        capsys, "schedules", "on-call", care_team, "--at", at.isoformat()
    )
    assert on_call["schedules"][0]["on call"] == f"Ben ({nurses[1]})"

    # Cleo covers that night: the override decides, as the API's on-call answer says.
    code, _, err = await run_admin(
        capsys, "schedules", "override", care_team, nights, nurses[2],
        "--from", (at - timedelta(hours=1)).isoformat(),
        "--to", (at + timedelta(hours=11)).isoformat(),
    )  # fmt: skip
    assert code == 0, err
    code, on_call, _ = await run_admin(
        capsys, "schedules", "on-call", care_team, "--at", at.isoformat()
    )
    assert on_call["schedules"][0]["on call"] == f"Cleo ({nurses[2]})"
    code, listed, _ = await run_admin(capsys, "schedules", "list", care_team)
    assert [o["person_id"] for o in listed["schedules"][0]["overrides"]] == [nurses[2]]

    # Refusals: another team's person (2), a new schedule without its rotation (2), the
    # schedule through another team (3), an override that ends before it starts (2).
    code, _, err = await run_admin(
        capsys, "schedules", "set-rotation", care_team, nights, "--participants", outsider
    )
    assert code == EXIT_INVALID and outsider in err
    code, _, err = await run_admin(
        capsys, "schedules", "set-rotation", care_team, f"days-{run}", "--participants", nurses[0]
    )
    assert code == EXIT_INVALID and "start date" in err
    code, _, err = await run_admin(
        capsys, "schedules", "override", other, nights, outsider,
        "--from", at.isoformat(), "--to", (at + timedelta(hours=1)).isoformat(),
    )  # fmt: skip
    assert code == EXIT_NOT_FOUND
    code, _, err = await run_admin(
        capsys, "schedules", "override", care_team, nights, nurses[0],
        "--from", at.isoformat(), "--to", (at - timedelta(hours=1)).isoformat(),
    )  # fmt: skip
    assert code == EXIT_INVALID

    assert await audited(dsn, f"care_team:{care_team}") == [
        ("operator:test-operator", "care_team.schedule_changed"),
        ("operator:test-operator", "care_team.schedule_changed"),
        ("operator:test-operator", "care_team.override_added"),
    ]


def test_help_of_users_and_schedules_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["users", "--help"], ["schedules", "--help"], ["users", "add", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        assert "example:\n  vigil admin " in capsys.readouterr().out
