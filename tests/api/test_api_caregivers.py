"""Caregiver contacts and the unit's 24-hour number through the care-team API, on the real
stack's PostgreSQL: consent recorded with who and when, roles, care-team scope, validation,
withdrawal, audit."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from tests.api.conftest import World, bearer

pytestmark = pytest.mark.stack


async def call(
    world: World, label: str, method: str, path: str, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=world.base_url, timeout=30) as client:
        return await client.request(
            method, path, json=body, headers=bearer(await world.token(label))
        )


def actions(world: World, action: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    return [e for e in world.audit.entries if e[1] == action]


async def test_contact_added_with_consent_changed_and_withdrawn(
    api_world: World, stack_env: dict[str, str]
) -> None:
    w = api_world
    path = f"/api/patients/{w.patient_a}/caregivers"
    r = await call(
        w,
        "nurse_a",
        "POST",
        path,
        {
            "sms": "+441632960001",
            "email": "home@example.test",
            "language": "fr",
            "consent_note": "signed form at discharge",
            "preferred_from": "08:00:00",
            "preferred_until": "21:00:00",
        },
    )
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["consent"] == "given"
    assert added["consent_by"] == w.users["nurse_a"]
    assert added["language"] == "fr" and added["preferred_from"] == "08:00:00"
    contact_id = added["contact_id"]
    assert actions(w, "caregiver.added")[-1][2] == f"patient:{w.patient_a}"

    r = await call(w, "clinician_a", "GET", path)
    assert r.status_code == 200
    assert [c["contact_id"] for c in r.json()] == [contact_id]
    assert actions(w, "caregivers.read")

    r = await call(w, "nurse_a", "PATCH", f"{path}/{contact_id}", {"language": "es"})
    assert r.status_code == 200 and r.json()["language"] == "es"
    assert r.json()["sms"] == "+441632960001"  # left out: unchanged
    changed = actions(w, "caregiver.changed")[-1][3]
    assert changed["old"]["language"] == "fr" and changed["new"]["language"] == "es"

    r = await call(w, "nurse2_a", "POST", f"{path}/{contact_id}/withdraw-consent")
    assert r.status_code == 200
    assert r.json()["consent"] == "withdrawn"
    assert r.json()["withdrawn_by"] == w.users["nurse2_a"]
    r = await call(w, "nurse_a", "POST", f"{path}/{contact_id}/withdraw-consent")
    assert r.status_code == 409
    r = await call(w, "nurse_a", "PATCH", f"{path}/{contact_id}", {"language": "en"})
    assert r.status_code == 409

    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        row = await conn.fetchrow(
            "SELECT consent_by, consent_at, withdrawn_by, withdrawn_at FROM caregiver_contacts "
            "WHERE contact_id = $1::uuid",
            contact_id,
        )
    finally:
        await conn.close()
    assert row["consent_by"] == w.users["nurse_a"] and row["consent_at"] is not None
    assert row["withdrawn_by"] == w.users["nurse2_a"] and row["withdrawn_at"] is not None


async def test_roles_scope_and_validation(api_world: World) -> None:
    w = api_world
    path = f"/api/patients/{w.patient_a}/caregivers"
    contact = {"sms": "+441632960002", "language": "en"}
    assert (await call(w, "clinician_a", "POST", path, contact)).status_code == 403
    assert (await call(w, "auditor_a", "POST", path, contact)).status_code == 403
    # Another team's patient is not found, for reading and for writing.
    assert (await call(w, "clinician_b", "GET", path)).status_code == 404
    other = f"/api/patients/{w.patient_b}/caregivers"
    assert (await call(w, "nurse_a", "POST", other, contact)).status_code == 404
    for bad, field in (
        ({"language": "en"}, "sms"),
        ({"sms": "01632 960002", "language": "en"}, "sms"),
        ({"email": "not-an-address", "language": "en"}, "email"),
        ({"sms": "+441632960002", "language": "de"}, "language"),
        ({"sms": "+441632960002", "language": "en", "preferred_from": "08:00:00"}, None),
        ({"sms": "+441632960002", "language": "en", "name": "Alex"}, "name"),
    ):
        r = await call(w, "nurse_a", "POST", path, bad)
        assert r.status_code == 422, (bad, r.text)
        if field is not None:
            assert field in str(r.json()["detail"])


async def test_unit_phone(api_world: World) -> None:
    w = api_world
    path = f"/api/care-teams/{w.team_a}/unit-phone"
    r = await call(w, "clinician_a", "GET", path)
    assert r.status_code == 200
    assert r.json()["unit_phone"] is None
    assert (
        await call(w, "clinician_a", "PUT", path, {"unit_phone": "+441632960000"})
    ).status_code == 403
    r = await call(w, "nurse_a", "PUT", path, {"unit_phone": "+441632960000"})
    assert r.status_code == 200 and r.json()["unit_phone"] == "+441632960000"
    r = await call(w, "nurse_a", "PUT", path, {"unit_phone": "+441632960009"})
    assert actions(w, "caregiver.unit_phone_changed")[-1][3] == {
        "old": "+441632960000",
        "new": "+441632960009",
    }
    assert (await call(w, "clinician_a", "GET", path)).json()["unit_phone"] == "+441632960009"
    assert (await call(w, "nurse_a", "PUT", path, {"unit_phone": "999"})).status_code == 422
    other = f"/api/care-teams/{w.team_b}/unit-phone"
    assert (await call(w, "nurse_a", "GET", other)).status_code == 404
    assert (
        await call(w, "nurse_a", "PUT", other, {"unit_phone": "+441632960000"})
    ).status_code == 404


async def test_guidance_takes_a_second_sign_off(api_world: World) -> None:
    w = api_world
    path = f"/api/care-teams/{w.team_a}/caregiver-guidance/pump_alarm/en"
    text = {"text": "Check the pump line for kinks and keep the pump upright."}
    assert (await call(w, "clinician_a", "PUT", path, text)).status_code == 403
    other = f"/api/care-teams/{w.team_b}/caregiver-guidance/pump_alarm/en"
    assert (await call(w, "nurse_a", "PUT", other, text)).status_code == 404
    bad = f"/api/care-teams/{w.team_a}/caregiver-guidance/pump_alarm/de"
    assert (await call(w, "nurse_a", "PUT", bad, text)).status_code == 422
    r = await call(w, "nurse_a", "PUT", path, text)
    assert r.status_code == 202, r.text
    proposal = r.json()
    assert proposal["status"] == "pending" and proposal["based_on_version"] == 0
    current = f"/api/care-teams/{w.team_a}/caregiver-guidance"
    assert (await call(w, "clinician_a", "GET", current)).json() == []
    pending = await call(w, "clinician_a", "GET", "/api/caregiver-guidance-proposals")
    assert [p["proposal_id"] for p in pending.json()] == [proposal["proposal_id"]]
    approve = f"/api/caregiver-guidance-proposals/{proposal['proposal_id']}/approve"
    assert (await call(w, "nurse_a", "POST", approve)).status_code == 403  # the proposer
    assert (await call(w, "clinician_b", "POST", approve)).status_code == 403
    r = await call(w, "nurse2_a", "POST", approve)
    assert r.status_code == 200 and r.json()["version"] == 1
    assert (await call(w, "nurse2_a", "POST", approve)).status_code == 409
    (version,) = (await call(w, "clinician_a", "GET", current)).json()
    assert version["text"] == text["text"] and version["version"] == 1
    assert version["proposed_by"] == w.users["nurse_a"]
    assert version["signed_off_by"] == w.users["nurse2_a"]
    changed = actions(w, "caregiver_guidance.changed")[-1]
    assert changed[2] == f"care_team:{w.team_a}" and changed[3]["new"] == text["text"]
