"""The care team's paging registry in the care-team API, over real HTTP and PostgreSQL: the team,
its people, on-call schedules and overrides, who is on call now and next, the escalation policy,
quiet hours, the early-cycle escalation, and snoozing an alert. For each route: the role that may
(charge nurse to change, any member to read), a role that may not (403), and another team's
resource (404)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.api.conftest import World, bearer

pytestmark = pytest.mark.stack

BERLIN = "Europe/Berlin"


@pytest.fixture(scope="module")
async def tokens(api_world: World) -> dict[str, dict[str, Any]]:
    return {
        label: bearer(await api_world.token(label))
        for label in ("clinician_a", "nurse_a", "auditor_a", "clinician_b")
    }


@pytest.fixture
async def client(api_world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api_world.base_url) as c:
        yield c


def team(world: World, tail: str = "", *, other: bool = False) -> str:
    return f"/api/care-teams/{world.team_b if other else world.team_a}{tail}"


def person_body(name: str) -> dict[str, Any]:
    return {"name": name, "contact_methods": [{"channel": "email", "address": f"{name}@ward.test"}]}


def schedule_body(world: World) -> dict[str, Any]:
    return {
        "name": "Nights",
        "timezone": BERLIN,
        "start_date": "2025-01-01",
        "handoff_time": "08:00",
        "shift_days": 1,
        "participants": [f"ana-{world.run}", f"ben-{world.run}"],
    }


def policy_body(world: World) -> dict[str, Any]:
    return {
        "policy_id": f"policy-{world.run}",
        "name": "Fever chain",
        "steps": [
            {"targets": [{"kind": "schedule", "ref": f"nights-{world.run}"}], "wait_minutes": 5},
            {"targets": [{"kind": "person", "ref": f"ben-{world.run}"}], "wait_minutes": 10},
        ],
        "repeat_count": 1,
    }


QUIET = {"timezone": BERLIN, "start": "22:00:00", "end": "07:00:00"}
EARLY = {"ack_wait_minutes": 2, "extra_targets": [{"kind": "email", "ref": "md@ward.test"}]}


async def set_up_team_a(world: World, client: httpx.AsyncClient, nurse: dict[str, Any]) -> None:
    """What a charge nurse of team A sets up; each answer is the route's success."""
    run = world.run
    puts = [
        (
            team(world),
            {"name": "Oncology A", "oncall_email": "oncall@a.test", "timezone": BERLIN},
        ),
        (team(world, f"/people/ana-{run}"), person_body("ana")),
        (team(world, f"/people/ben-{run}"), person_body("ben")),
        (team(world, f"/schedules/nights-{run}"), schedule_body(world)),
        (team(world, "/escalation-policy"), policy_body(world)),
        (team(world, "/quiet-hours"), QUIET),
        (team(world, "/early-cycle-escalation"), EARLY),
    ]
    for path, body in puts:
        response = await client.put(path, json=body, headers=nurse)
        assert response.status_code == 204, (path, response.text)


async def test_a_charge_nurse_sets_up_paging_and_every_member_reads_it(
    api_world: World, tokens: dict[str, dict[str, Any]], client: httpx.AsyncClient
) -> None:
    world, run = api_world, api_world.run
    await set_up_team_a(world, client, tokens["nurse_a"])
    override = await client.post(
        team(world, f"/schedules/nights-{run}/overrides"),
        json={
            "person_id": f"ben-{run}",
            "starts_at": "2030-01-01T00:00:00+00:00",
            "ends_at": "2030-01-02T00:00:00+00:00",
        },
        headers=tokens["nurse_a"],
    )
    assert override.status_code == 201, override.text
    for reader in ("clinician_a", "auditor_a"):
        headers = tokens[reader]
        got = (await client.get(team(world), headers=headers)).json()
        assert (got["name"], got["timezone"]) == ("Oncology A", BERLIN)
        people = (await client.get(team(world, "/people"), headers=headers)).json()
        assert [p["person_id"] for p in people] == [f"ana-{run}", f"ben-{run}"]
        ana = (await client.get(team(world, f"/people/ana-{run}"), headers=headers)).json()
        assert ana["contact_methods"] == [{"channel": "email", "address": "ana@ward.test"}]
        schedules = (await client.get(team(world, "/schedules"), headers=headers)).json()
        assert [s["schedule_id"] for s in schedules] == [f"nights-{run}"]
        nights = (await client.get(team(world, f"/schedules/nights-{run}"), headers=headers)).json()
        assert nights["participants"] == [f"ana-{run}", f"ben-{run}"]
        assert [o["override_id"] for o in nights["overrides"]] == [override.json()["override_id"]]
        policy = (await client.get(team(world, "/escalation-policy"), headers=headers)).json()
        assert [s["wait_minutes"] for s in policy["steps"]] == [5, 10]
        assert policy["repeat_count"] == 1
        quiet = (await client.get(team(world, "/quiet-hours"), headers=headers)).json()
        assert (quiet["start"], quiet["end"], quiet["updated_by"]) == (
            "22:00:00",
            "07:00:00",
            f"nurse_a-{run}",
        )
        early = (await client.get(team(world, "/early-cycle-escalation"), headers=headers)).json()
        assert early["ack_wait_minutes"] == 2 and early["updated_by"] == f"nurse_a-{run}"


async def test_who_is_on_call_now_and_next_in_the_teams_zone(
    api_world: World, tokens: dict[str, dict[str, Any]], client: httpx.AsyncClient
) -> None:
    world, run = api_world, api_world.run
    await set_up_team_a(world, client, tokens["nurse_a"])
    # 2025-01-02 06:00 UTC is 07:00 in Berlin: day 0's person (ana) hands over to ben at 08:00.
    at = quote("2025-01-02T06:00:00+00:00")
    response = await client.get(team(world, f"/on-call?at={at}"), headers=tokens["clinician_a"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["timezone"] == BERLIN and body["at"] == "2025-01-02T07:00:00+01:00"
    [nights] = body["schedules"]
    assert (nights["person_id"], nights["person_name"]) == (f"ana-{run}", "ana")
    assert nights["until"] == "2025-01-02T08:00:00+01:00"
    assert "Europe/Berlin" in nights["until_local"]
    assert (nights["next_person_id"], nights["next_person_name"]) == (f"ben-{run}", "ben")
    naive = await client.get(
        team(world, "/on-call?at=2025-01-02T06:00:00"), headers=tokens["clinician_a"]
    )
    assert naive.status_code == 422


WRITES = [
    ("put", "", {"name": "X", "oncall_email": "x@x.test"}),
    ("put", "/people/{run}-p", person_body("p")),
    ("put", "/schedules/{run}-s", None),
    ("post", "/schedules/nights-{run}/overrides", None),
    ("put", "/escalation-policy", None),
    ("put", "/quiet-hours", QUIET),
    ("delete", "/quiet-hours", None),
    ("put", "/early-cycle-escalation", EARLY),
    ("delete", "/early-cycle-escalation", None),
]


def write_body(world: World, path: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
    if body is not None:
        return body
    if path.startswith("/schedules/") and path.endswith("/overrides"):
        return {
            "person_id": f"ana-{world.run}",
            "starts_at": "2030-01-01T00:00:00+00:00",
            "ends_at": "2030-01-02T00:00:00+00:00",
        }
    if path.startswith("/schedules/"):
        return schedule_body(world)
    if path == "/escalation-policy":
        return policy_body(world)
    return None


async def test_clinicians_and_auditors_may_not_change_paging(
    api_world: World, tokens: dict[str, dict[str, Any]], client: httpx.AsyncClient
) -> None:
    world = api_world
    await set_up_team_a(world, client, tokens["nurse_a"])
    for role in ("clinician_a", "auditor_a"):
        for method, tail, body in WRITES:
            path = tail.format(run=world.run)
            response = await client.request(
                method,
                team(world, path),
                json=write_body(world, path, body),
                headers=tokens[role],
            )
            assert response.status_code == 403, (role, method, path, response.status_code)


READS = [
    "",
    "/people",
    "/people/ana-{run}",
    "/schedules",
    "/schedules/nights-{run}",
    "/on-call",
    "/escalation-policy",
    "/quiet-hours",
    "/early-cycle-escalation",
]


async def test_another_teams_paging_answers_404(
    api_world: World, tokens: dict[str, dict[str, Any]], client: httpx.AsyncClient
) -> None:
    world = api_world
    await set_up_team_a(world, client, tokens["nurse_a"])
    for tail in READS:
        path = tail.format(run=world.run)
        # Team A's own paging, read by team B's clinician: as if it did not exist.
        other = await client.get(team(world, path), headers=tokens["clinician_b"])
        assert other.status_code == 404, (path, other.status_code)
        # Team B's paging, asked by team A's charge nurse.
        assert (
            await client.get(team(world, path, other=True), headers=tokens["nurse_a"])
        ).status_code == 404, path
    for method, tail, body in WRITES:
        path = tail.format(run=world.run)
        response = await client.request(
            method,
            team(world, path, other=True),
            json=write_body(world, path, body),
            headers=tokens["nurse_a"],
        )
        assert response.status_code == 404, (method, path, response.status_code)


async def test_a_person_or_schedule_of_another_team_is_not_reachable_through_ones_own(
    api_world: World,
    tokens: dict[str, dict[str, Any]],
    client: httpx.AsyncClient,
    stack_env: dict[str, str],
) -> None:
    world, run = api_world, api_world.run
    await set_up_team_a(world, client, tokens["nurse_a"])
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        await conn.execute(
            "INSERT INTO people (person_id, name, care_team_id) VALUES ($1, 'B', $2) "
            "ON CONFLICT DO NOTHING",
            f"bea-{run}",
            world.team_b,
        )
        await conn.execute(
            "INSERT INTO oncall_schedules (schedule_id, care_team_id, name, timezone, "
            "start_date, handoff_time, shift_days, participants) VALUES ($1, $2, 'B', 'UTC', "
            "'2025-01-01', '08:00', 1, $3) ON CONFLICT DO NOTHING",
            f"days-b-{run}",
            world.team_b,
            [f"bea-{run}"],
        )
        await conn.execute(
            "INSERT INTO escalation_policies (policy_id, care_team_id, name, steps) "
            "VALUES ($1, $2, 'B', "
            "'[{\"wait_s\": 300, \"targets\": [{\"kind\": \"email\", \"ref\": \"b@h.test\"}]}]') "
            "ON CONFLICT DO NOTHING",
            f"policy-b-{run}",
            world.team_b,
        )
    finally:
        await conn.close()
    nurse = tokens["nurse_a"]
    bea, days_b = team(world, f"/people/bea-{run}"), team(world, f"/schedules/days-b-{run}")
    assert (await client.get(bea, headers=nurse)).status_code == 404
    assert (await client.put(bea, json=person_body("x"), headers=nurse)).status_code == 404
    assert (await client.get(days_b, headers=nurse)).status_code == 404
    assert (await client.put(days_b, json=schedule_body(world), headers=nurse)).status_code == 404
    # Naming them in team A's rotation, override or policy is refused.
    stolen = {**schedule_body(world), "participants": [f"bea-{run}"]}
    refused = await client.put(team(world, f"/schedules/nights-{run}"), json=stolen, headers=nurse)
    assert refused.status_code == 422 and f"person:bea-{run}" in refused.text
    cover = await client.post(
        team(world, f"/schedules/nights-{run}/overrides"),
        json={
            "person_id": f"bea-{run}",
            "starts_at": "2030-01-01T00:00:00+00:00",
            "ends_at": "2030-01-02T00:00:00+00:00",
        },
        headers=nurse,
    )
    assert cover.status_code == 422
    policy = policy_body(world)
    policy["steps"][0]["targets"] = [{"kind": "schedule", "ref": f"days-b-{run}"}]
    refused = await client.put(team(world, "/escalation-policy"), json=policy, headers=nurse)
    assert refused.status_code == 422 and f"schedule:days-b-{run}" in refused.text
    # Policy ids are shared by every team: one that is another team's is refused.
    taken = {**policy_body(world), "policy_id": f"policy-b-{run}"}
    conflict = await client.put(team(world, "/escalation-policy"), json=taken, headers=nurse)
    assert conflict.status_code == 409


async def test_quiet_hours_in_an_unknown_zone_or_without_a_window_are_refused(
    api_world: World, tokens: dict[str, dict[str, Any]], client: httpx.AsyncClient
) -> None:
    """422 for a zone that does not exist, start == end, or a time with an offset; a valid
    body is accepted (the control)."""
    path, nurse = team(api_world, "/quiet-hours"), tokens["nurse_a"]
    for bad in (
        {**QUIET, "timezone": "Europe/Atlantis"},
        {**QUIET, "end": QUIET["start"]},
        {**QUIET, "start": "22:00:00+01:00"},
    ):
        assert (await client.put(path, json=bad, headers=nurse)).status_code == 422, bad
    assert (await client.put(path, json=QUIET, headers=nurse)).status_code == 204


async def test_changes_are_audited_with_the_caller(
    api_world: World,
    tokens: dict[str, dict[str, Any]],
    client: httpx.AsyncClient,
    stack_env: dict[str, str],
) -> None:
    world, run = api_world, api_world.run
    since = datetime.now(UTC)
    await set_up_team_a(world, client, tokens["nurse_a"])
    assert (
        await client.delete(team(world, "/quiet-hours"), headers=tokens["nurse_a"])
    ).status_code == 204
    assert (
        await client.delete(team(world, "/quiet-hours"), headers=tokens["nurse_a"])
    ).status_code == 404  # nothing left to remove
    subject = f"care_team:{world.team_a}"
    audited = {action for actor, action, subj, _ in world.audit.entries if subj == subject}
    assert {
        "care_team.changed",
        "care_team.person_changed",
        "care_team.schedule_changed",
        "care_team.escalation_policy_changed",
    } <= audited
    # Quiet hours and the early-cycle escalation are audited by notify in the change's own
    # transaction, in the tamper-evident log, with the caller as the actor.
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        rows = await conn.fetch(
            "SELECT actor, action, details FROM audit_log WHERE subject = $1 AND at >= $2 "
            "ORDER BY seq",
            subject,
            since,
        )
    finally:
        await conn.close()
    actions = [(r["actor"], r["action"]) for r in rows]
    assert (f"nurse_a-{run}", "notify.quiet_hours_changed") in actions
    assert (f"nurse_a-{run}", "notify.early_cycle_escalation_changed") in actions
    assert '"after": null' in rows[-1]["details"]  # the removal


async def test_an_alert_is_snoozed_by_a_member_who_may_acknowledge(
    api_world: World, tokens: dict[str, dict[str, Any]], client: httpx.AsyncClient
) -> None:
    world = api_world
    own = f"/api/alerts/{quote(world.alert_a, safe='')}/snooze"
    other = f"/api/alerts/{quote(world.alert_b, safe='')}/snooze"
    body = {"minutes": 15}
    snoozed = await client.post(own, json=body, headers=tokens["clinician_a"])
    assert snoozed.status_code == 200, snoozed.text
    until = datetime.fromisoformat(snoozed.json()["snoozed_until"])
    assert 14 * 60 < (until - datetime.now(UTC)).total_seconds() <= 15 * 60
    assert ("snooze", world.alert_a, world.users["clinician_a"]) in world.actions.calls
    assert any(a == "alert.snooze" for _, a, _, _ in world.audit.entries)
    assert (await client.post(own, json=body, headers=tokens["auditor_a"])).status_code == 403
    assert (await client.post(other, json=body, headers=tokens["clinician_a"])).status_code == 404
    too_long = await client.post(own, json={"minutes": 60 * 25}, headers=tokens["clinician_a"])
    assert too_long.status_code == 422
