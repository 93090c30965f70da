"""End of infusion and discharge through the care-team API, over the stack's PostgreSQL: the
manager of the patient's team ends the infusion and discharges; the bindings end with a
validity end, the open escalation is resolved by notify with the reason `discharged` on its
timeline, the patient leaves the roster and is listed as discharged, the record stays readable;
repeating answers the same record, another reason is 409; other roles and teams are refused;
every answer is declared in the OpenAPI document."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import asyncpg
import httpx
import pytest

from services.notify.domain.escalation import (
    PolicySnapshot,
    StepSnapshot,
    Target,
    snapshot_to_json,
)
from services.rules.domain.identity import alert_id_for
from tests.api.conftest import World, bearer

pytestmark = pytest.mark.stack


async def call(
    world: World, label: str, method: str, path: str, body: object = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=world.base_url, timeout=30) as client:
        return await client.request(
            method, path, json=body, headers=bearer(await world.token(label))
        )


async def open_escalation(conn: asyncpg.Connection, world: World) -> uuid.UUID:
    """An open escalation of patient A's fever alert, as notify keeps one after paging."""
    escalation_id = uuid.uuid4()
    policy = PolicySnapshot(
        policy_id="onc",
        steps=(StepSnapshot(targets=(Target("person", "nurse"),), wait_s=300),),
        repeat_count=1,
        schedules={},
    )
    await conn.execute(
        """
        INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id, care_team_id,
                                 snapshot, status, due_at, paged, opened_at)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, 'open', now() + interval '5 min',
                ARRAY['person:nurse'], now())
        """,
        escalation_id,
        world.alert_a,
        alert_id_for(world.alert_a, "start"),
        world.patient_a,
        world.team_a,
        json.dumps(snapshot_to_json(policy)),
    )
    return escalation_id


async def test_discharge_stops_paging_and_keeps_the_record(
    api_world: World, stack_env: dict[str, str]
) -> None:
    w = api_world
    patient = w.patient_a
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        escalation_id = await open_escalation(conn, w)
        roster = (await call(w, "clinician_a", "GET", "/api/roster")).json()
        assert patient in [p["patient_id"] for p in roster["patients"]]

        # Only a manager of the patient's team: a clinician is 403, another team's patient 404.
        refused = await call(
            w,
            "clinician_a",
            "POST",
            f"/api/patients/{patient}/discharge",
            {"reason": "course completed"},
        )
        assert refused.status_code == 403
        other = await call(
            w,
            "nurse_a",
            "POST",
            f"/api/patients/{w.patient_b}/discharge",
            {"reason": "course completed"},
        )
        assert other.status_code == 404
        future = await call(
            w,
            "nurse_a",
            "POST",
            f"/api/patients/{patient}/end-infusion",
            {"at": "2099-01-01T00:00:00Z"},
        )
        assert future.status_code == 422 and future.json()["detail"][0]["loc"][-1] == "at"

        ended = await call(w, "nurse_a", "POST", f"/api/patients/{patient}/end-infusion", {})
        assert ended.status_code == 200, ended.text
        assert ended.json()["patient"]["status"] == "infusion_ended"
        assert ended.json()["devices_unbound"] == []  # a thermometer only: fever still watched

        done = await call(
            w,
            "nurse_a",
            "POST",
            f"/api/patients/{patient}/discharge",
            {"reason": "course completed"},
        )
        assert done.status_code == 200, done.text
        body = done.json()
        assert body["patient"]["status"] == "discharged" and body["changed"] is True
        assert body["patient"]["discharge_reason"] == "course completed"
        assert body["patient"]["discharged_by"] == f"nurse_a-{w.run}"
        assert [d["device_id"] for d in body["devices_unbound"]] == [f"thermo-{patient}"]
        assert body["escalations_closed"] == 1
        discharged_at = datetime.fromisoformat(body["patient"]["discharged_at"])

        binding = await conn.fetchrow(
            "SELECT valid_to FROM device_bindings WHERE patient_id = $1", patient
        )
        assert binding["valid_to"] == discharged_at
        status = await conn.fetchval(
            "SELECT status FROM escalations WHERE escalation_id = $1", escalation_id
        )
        assert status == "resolved"
        resolved = await conn.fetchval(
            "SELECT detail FROM escalation_events WHERE escalation_id = $1 AND kind = 'resolved'",
            escalation_id,
        )
        assert json.loads(resolved)["reason"] == "discharged"

        # The same request again answers the same record; another reason is refused.
        again = await call(
            w,
            "nurse_a",
            "POST",
            f"/api/patients/{patient}/discharge",
            {"reason": "course completed"},
        )
        assert again.status_code == 200
        assert again.json()["patient"] == body["patient"] and again.json()["changed"] is False
        conflict = await call(
            w, "nurse_a", "POST", f"/api/patients/{patient}/discharge", {"reason": "admitted"}
        )
        assert conflict.status_code == 409
        late = await call(w, "nurse_a", "POST", f"/api/patients/{patient}/end-infusion", {})
        assert late.status_code == 409

        # Off the roster, listed as discharged; the record, readings and alert stay readable.
        roster = (await call(w, "clinician_a", "GET", "/api/roster")).json()
        assert patient not in [p["patient_id"] for p in roster["patients"]]
        listed = (await call(w, "clinician_a", "GET", "/api/discharged")).json()
        assert [(p["patient_id"], p["status"]) for p in listed] == [(patient, "discharged")]
        assert (await call(w, "clinician_b", "GET", "/api/discharged")).json() == []
        assert (await call(w, "clinician_a", "GET", f"/api/patients/{patient}")).status_code == 200
        readings = await call(w, "clinician_a", "GET", f"/api/patients/{patient}/readings")
        assert readings.status_code == 200 and readings.json()["items"]
        alert = await call(w, "clinician_a", "GET", f"/api/alerts/{w.alert_a}")
        assert alert.status_code == 200
        audited = [(e[0], e[1], e[2]) for e in w.audit.entries if e[2] == f"patient:{patient}"]
        assert (f"nurse_a-{w.run}", "patient.infusion_ended", f"patient:{patient}") in audited
        assert (f"nurse_a-{w.run}", "patient.discharged", f"patient:{patient}") in audited
        assert sum(1 for a in audited if a[1] == "patient.discharged") == 1
    finally:
        await conn.close()


async def test_the_openapi_document_declares_every_answer(api_world: World) -> None:
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        document = (await client.get("/openapi.json")).json()
    for path in ("/api/patients/{patient_id}/end-infusion", "/api/patients/{patient_id}/discharge"):
        declared = set(document["paths"][path]["post"]["responses"])
        assert declared == {"200", "401", "403", "404", "409", "422"}, (path, declared)
    assert set(document["paths"]["/api/discharged"]["get"]["responses"]) == {"200", "401", "403"}
