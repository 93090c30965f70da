"""The FHIR interface over real HTTP against the stack's PostgreSQL: search, read, the
CapabilityStatement and bulk export, with the API's authentication and care-team scoping.
Every resource an answer carries is validated with the R4 models of ``fhir.resources``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import bind_device, upsert_device
from tests.api.conftest import World, bearer
from tests.api.test_fhir_mapping import validate
from tests.polling import eventually

pytestmark = pytest.mark.stack

LOINC_TEMPERATURE = "http://loinc.org|8310-5"


@dataclass
class Course:
    """What the fixture added to team A's patient on top of the shared API world."""

    pump: str
    flag_id: str
    page_id: str
    implausible: str
    pump_statuses: int


@pytest.fixture(scope="module")
async def course(api_world: World, stack_env: dict[str, str]) -> AsyncIterator[Course]:
    """Patient A gets a pump with statuses, an implausible reading, and a fever episode with a
    page and an acknowledgement (notify's tables, as notify writes them)."""
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    now = datetime.now(UTC)
    patient, team = api_world.patient_a, api_world.team_a
    pump = f"pump-{patient}"
    try:
        await upsert_device(conn, pump, "pump")
        await bind_device(conn, pump, patient, now - timedelta(days=2))
        for minutes in range(0, 60, 10):
            await conn.execute(
                """
                INSERT INTO pump_status (device_time, ingest_time, patient_id, device_id,
                    message_id, seq, state, rate_ml_h, volume_remaining_ml, bag_volume_ml,
                    battery_pct) VALUES ($1, $1, $2, $3, $4, $5, 'running', 10, $6, 240, 80)
                """,
                now - timedelta(minutes=minutes),
                patient,
                pump,
                uuid.uuid4(),
                minutes,
                100.0 + minutes,
            )
        implausible = uuid.uuid4()
        await conn.execute(
            """
            INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id,
                message_id, seq, value_c, original_value, original_unit, site, flags)
            VALUES ($1, $1, $2, $3, $4, 9999, 24.0, 24.0, 'C', 'axillary',
                    '{implausible_temperature}')
            """,
            now - timedelta(minutes=1),
            patient,
            f"thermo-{patient}",
            implausible,
        )
        alert_id = await conn.fetchval(
            "SELECT alert_id FROM alerts WHERE dedup_key = $1", api_world.alert_a
        )
        escalation_id, page_id = uuid.uuid4(), uuid.uuid4()
        acked_at = now - timedelta(minutes=2)
        await conn.execute(
            """
            INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id, care_team_id,
                snapshot, status, acknowledged_by, acknowledged_at, opened_at)
            VALUES ($1, $2, $3, $4, $5, '{}'::jsonb, 'acknowledged', 'nurse-on-call', $6, $7)
            """,
            escalation_id,
            api_world.alert_a,
            alert_id,
            patient,
            team,
            acked_at,
            now - timedelta(minutes=5),
        )
        await conn.execute(
            """
            INSERT INTO pages (page_id, alert_id, dedup_key, patient_id, care_team_id, channel,
                recipient, idempotency_key, status, created_at, escalation_id, recipient_ref,
                purpose)
            VALUES ($1, $2, $3, $4, $5, 'email', 'oncall@a.test', $6, 'sent', $7, $8,
                    'person:nurse-on-call', 'alert')
            """,
            page_id,
            alert_id,
            api_world.alert_a,
            patient,
            team,
            f"fhir-test-{page_id}",
            now - timedelta(minutes=4),
            escalation_id,
        )
        await conn.execute(
            "INSERT INTO delivery_attempts (page_id, attempt, channel, recipient, status, at) "
            "VALUES ($1, 1, 'email', 'oncall@a.test', 'sent', $2)",
            page_id,
            now - timedelta(minutes=4),
        )
    finally:
        await conn.close()
    yield Course(pump, str(alert_id), str(page_id), f"temp-{implausible}", 6)


async def client_for(world: World, label: str) -> httpx.AsyncClient:
    token = await world.token(label)
    return httpx.AsyncClient(base_url=f"{world.base_url}/fhir", headers=bearer(token))


def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    validate(bundle)
    return [e["resource"] for e in bundle.get("entry", [])]


async def test_every_fhir_endpoint_refuses_a_request_without_a_token(api_world: World) -> None:
    """Every operation of the FHIR application's OpenAPI answers 401 (an OperationOutcome) to
    an anonymous caller, metadata included."""
    schema = create_app(ApiSettings()).routes[-1].app.openapi()  # type: ignore[attr-defined]
    fill = {
        "patient_id": api_world.patient_a,
        "device_id": f"thermo-{api_world.patient_a}",
        "observation_id": "temp-x",
        "flag_id": str(uuid.uuid4()),
        "communication_id": str(uuid.uuid4()),
        "job_id": "x",
        "file_name": "Flag.ndjson",
    }
    operations = [
        (method.upper(), path.format(**fill))
        for path, methods in schema["paths"].items()
        for method in methods
    ]
    assert len(operations) >= 14  # the list really enumerates the FHIR interface
    async with httpx.AsyncClient(base_url=f"{api_world.base_url}/fhir") as client:
        for method, path in operations:
            response = await client.request(method, path, params={"patient": api_world.patient_a})
            assert response.status_code == 401, (method, path, response.status_code)
            assert validate(response.json()).issue[0].code == "login"


async def test_observation_search_by_patient_code_and_date(
    api_world: World, course: Course
) -> None:
    """Temperatures by LOINC code and date (device time), pump statuses by their code, both
    without a code; every entry a valid Observation of that patient, in device-time order."""
    async with await client_for(api_world, "clinician_a") as client:
        every = (await client.get("/Observation", params={"patient": api_world.patient_a})).json()
        assert every["total"] == 20 + 1 + course.pump_statuses
        temps = (
            await client.get(
                "/Observation",
                params={"patient": f"Patient/{api_world.patient_a}", "code": LOINC_TEMPERATURE},
            )
        ).json()
        assert temps["total"] == 21
        found = entries(temps)
        assert all(o["code"]["coding"][0]["code"] == "8310-5" for o in found)
        times = [o["effectiveDateTime"] for o in found]
        assert times == sorted(times)
        pumps = entries(
            (
                await client.get(
                    "/Observation",
                    params={
                        "patient": api_world.patient_a,
                        "code": "urn:vigil:observation-code|pump-status",
                    },
                )
            ).json()
        )
        assert len(pumps) == course.pump_statuses
        assert all(o["device"]["reference"] == f"Device/{course.pump}" for o in pumps)
        # Readings every 30 minutes over the last 10 hours: the last 3 hours hold 6 or 7.
        since = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
        recent = (
            await client.get(
                "/Observation",
                params={
                    "patient": api_world.patient_a,
                    "code": "8310-5",
                    "date": f"ge{since}",
                },
            )
        ).json()
        assert 6 <= recent["total"] <= 8 < temps["total"]
        implausible = [o for o in found if o["id"] == course.implausible]
        assert implausible and "valueQuantity" not in implausible[0]
        assert implausible[0]["dataAbsentReason"]["coding"][0]["code"] == "error"


async def test_observation_paging(api_world: World, course: Course) -> None:
    """``_count`` pages the result; following ``next`` links visits every reading once."""
    async with await client_for(api_world, "clinician_a") as client:
        url: str | None = f"/Observation?patient={api_world.patient_a}&_count=8"
        seen: list[str] = []
        while url is not None:
            bundle = (await client.get(url)).json()
            seen.extend(o["id"] for o in entries(bundle))
            url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        assert len(seen) == len(set(seen)) == 21 + course.pump_statuses


async def test_reads_and_bad_searches(api_world: World, course: Course) -> None:
    """Device, Patient, Observation, Flag and Communication read by id; a malformed date or a
    search without its patient is a 400 OperationOutcome."""
    async with await client_for(api_world, "clinician_a") as client:
        device = (await client.get(f"/Device/{course.pump}")).json()
        assert validate(device).patient.reference == f"Patient/{api_world.patient_a}"
        patient = (await client.get(f"/Patient/{api_world.patient_a}")).json()
        assert validate(patient).identifier[0].value == api_world.patient_a
        by_identifier = (
            await client.get(
                "/Patient", params={"identifier": f"urn:vigil:patient|{api_world.patient_a}"}
            )
        ).json()
        assert [p["id"] for p in entries(by_identifier)] == [api_world.patient_a]
        observation = (await client.get(f"/Observation/{course.implausible}")).json()
        assert validate(observation).id == course.implausible
        flag = (await client.get(f"/Flag/{course.flag_id}")).json()
        assert validate(flag).identifier[0].value == api_world.alert_a
        page = (await client.get(f"/Communication/{course.page_id}")).json()
        assert validate(page).status == "completed"
        for path, params in (
            ("/Observation", {"patient": api_world.patient_a, "date": "yesterday"}),
            ("/Observation", {}),
            ("/Flag", {}),
        ):
            response = await client.get(path, params=params)
            assert response.status_code == 400, (path, params)
            assert validate(response.json()).issue[0].severity == "error"


async def test_flags_and_communications(api_world: World, course: Course) -> None:
    """The fever episode is an active high-priority Flag; its page a stat Communication about
    it, and the acknowledgement a Communication from the nurse in response to the page."""
    async with await client_for(api_world, "clinician_a") as client:
        flags = entries((await client.get("/Flag", params={"patient": api_world.patient_a})).json())
        assert [f["id"] for f in flags] == [course.flag_id]
        assert flags[0]["status"] == "active"
        assert flags[0]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "PH"
        comms = entries(
            (await client.get("/Communication", params={"patient": api_world.patient_a})).json()
        )
        page, ack = comms
        assert page["id"] == course.page_id and page["priority"] == "stat"
        assert page["about"] == [{"reference": f"Flag/{course.flag_id}"}]
        assert ack["sender"]["display"] == "nurse-on-call"
        assert ack["inResponseTo"] == [{"reference": f"Communication/{course.page_id}"}]


async def test_care_team_scoping(api_world: World, course: Course) -> None:
    """A clinician of team B reads none of team A's patient (404, as for no patient), while
    team A's clinician reads the same URLs (positive control); B reads B's own."""
    paths = [
        (f"/Patient/{api_world.patient_a}", {}),
        (f"/Device/{course.pump}", {}),
        (f"/Observation/{course.implausible}", {}),
        (f"/Flag/{course.flag_id}", {}),
        (f"/Communication/{course.page_id}", {}),
        ("/Observation", {"patient": api_world.patient_a}),
        ("/Flag", {"patient": api_world.patient_a}),
        ("/Communication", {"patient": api_world.patient_a}),
        ("/Device", {"patient": api_world.patient_a}),
    ]
    async with (
        await client_for(api_world, "clinician_b") as other,
        await client_for(api_world, "clinician_a") as own,
    ):
        for path, params in paths:
            refused = await other.get(path, params=params)
            assert refused.status_code == 404, (path, refused.status_code)
            assert validate(refused.json()).issue[0].code == "not-found"
            assert (await own.get(path, params=params)).status_code == 200, path
        nobody = await other.get(
            "/Patient", params={"identifier": f"urn:vigil:patient|{api_world.patient_a}"}
        )
        assert nobody.json()["total"] == 0
        exported = await other.get(
            "/Patient/$export",
            params={"patient": api_world.patient_a},
            headers={"Prefer": "respond-async"},
        )
        assert exported.status_code == 404
        mine = await other.get("/Flag", params={"patient": api_world.patient_b})
        assert [f["identifier"][0]["value"] for f in entries(mine.json())] == [api_world.alert_b]


async def test_capability_statement(api_world: World) -> None:
    """metadata is a valid R4 CapabilityStatement; every search parameter it lists for
    Observation is accepted by the server."""
    async with await client_for(api_world, "clinician_a") as client:
        response = await client.get("/metadata")
        assert response.headers["content-type"].startswith("application/fhir+json")
        statement = validate(response.json())
        assert statement.fhirVersion == "4.0.1"
        types = {r.type for r in statement.rest[0].resource}
        assert types == {"Patient", "Device", "Observation", "Flag", "Communication"}


async def wait_for_export(client: httpx.AsyncClient, status_url: str) -> dict[str, Any]:
    """Poll the status URL as a Bulk Data client does, until it is no longer 202."""

    async def finished() -> httpx.Response | None:
        response = await client.get(status_url)
        if response.status_code == 202:
            assert "X-Progress" in response.headers
            return None
        return response

    response = await eventually(finished, timeout_s=60, what="the export to finish")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_bulk_export_of_a_patient_course(api_world: World, course: Course) -> None:
    """Kick-off answers 202 with Content-Location; the manifest lists one NDJSON file per
    type, each line a valid resource of that type and the counts right; another user cannot
    poll the job; a kick-off without Prefer: respond-async is refused; the export is audited."""
    async with await client_for(api_world, "clinician_a") as client:
        refused = await client.get("/Patient/$export", params={"patient": api_world.patient_a})
        assert refused.status_code == 400
        kick = await client.get(
            "/Patient/$export",
            params={"patient": api_world.patient_a},
            headers={"Prefer": "respond-async", "Accept": "application/fhir+json"},
        )
        assert kick.status_code == 202
        status_url = kick.headers["Content-Location"]
        async with await client_for(api_world, "auditor_a") as stranger:
            assert (await stranger.get(status_url)).status_code == 404
        manifest = await wait_for_export(client, status_url)
        assert manifest["requiresAccessToken"] is True
        counts = {o["type"]: o["count"] for o in manifest["output"]}
        assert counts == {
            "Patient": 1,
            "Device": 2,
            "Observation": 21 + course.pump_statuses,
            "Flag": 1,
            "Communication": 2,
        }
        for output in manifest["output"]:
            file = await client.get(output["url"])
            assert file.headers["content-type"].startswith("application/fhir+ndjson")
            lines = file.content.splitlines()
            assert len(lines) == output["count"]
            for line in lines:
                resource = orjson.loads(line)
                assert resource["resourceType"] == output["type"]
                validate(resource)
        assert (await client.delete(status_url)).status_code == 202
        assert (await client.get(status_url)).status_code == 404
    exports = [e for e in api_world.audit.entries if e[1] == "fhir.export"]
    assert exports and exports[-1][3]["patients"] == [api_world.patient_a]


async def test_post_kick_off_with_parameters(api_world: World, course: Course) -> None:
    """The POST kick-off takes a Parameters body: one patient, only Flags."""
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "patient", "valueReference": {"reference": f"Patient/{api_world.patient_a}"}},
            {"name": "_type", "valueString": "Flag"},
        ],
    }
    validate(body)
    async with await client_for(api_world, "clinician_a") as client:
        kick = await client.post(
            "/Patient/$export",
            content=json.dumps(body),
            headers={"Prefer": "respond-async", "Content-Type": "application/fhir+json"},
        )
        assert kick.status_code == 202, kick.text
        manifest = await wait_for_export(client, kick.headers["Content-Location"])
        assert [(o["type"], o["count"]) for o in manifest["output"]] == [("Flag", 1)]
