"""SMART on FHIR style scopes over real HTTP: what the token endpoint grants, what a
``user/*.read`` and a ``patient/*.read`` token read under /fhir, and the 403 of a token without
a FHIR read scope. Every FHIR answer is validated with the R4 models of ``fhir.resources``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from services.ingest.adapters.registry_admin import bind_device, upsert_device, upsert_patient
from services.rules.domain.identity import alert_id_for
from tests.api.conftest import PASSWORD, World, bearer
from tests.api.test_fhir_api import wait_for_export
from tests.api.test_fhir_mapping import validate

pytestmark = pytest.mark.stack


@dataclass
class Sibling:
    """A second patient of team A, with a thermometer and one reading."""

    patient: str
    device: str
    observation: str


@pytest.fixture(scope="module")
async def sibling(api_world: World, stack_env: dict[str, str]) -> AsyncIterator[Sibling]:
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    now = datetime.now(UTC)
    patient = f"PA2-{api_world.run}"
    device = f"thermo-{patient}"
    message_id = uuid.uuid4()
    try:
        await upsert_patient(conn, patient, api_world.team_a, 21.0)
        await upsert_device(conn, device, "thermometer")
        await bind_device(conn, device, patient, now - timedelta(days=1))
        await conn.execute(
            """
            INSERT INTO temperature_readings (device_time, ingest_time, patient_id, device_id,
                message_id, seq, value_c, original_value, original_unit, site)
            VALUES ($1, $1, $2, $3, $4, 1, 37.2, 37.2, 'C', 'oral')
            """,
            now - timedelta(minutes=3),
            patient,
            device,
            message_id,
        )
    finally:
        await conn.close()
    yield Sibling(patient, device, f"temp-{message_id}")


async def token_answer(world: World, label: str, **form: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=world.base_url) as client:
        return await client.post(
            "/auth/token", data={"username": world.users[label], "password": PASSWORD, **form}
        )


async def fhir_client(world: World, label: str, **form: str) -> httpx.AsyncClient:
    answer = await token_answer(world, label, **form)
    assert answer.status_code == 200, answer.text
    return httpx.AsyncClient(
        base_url=f"{world.base_url}/fhir", headers=bearer(answer.json()["access_token"])
    )


def own_and_sibling_paths(world: World, sibling: Sibling) -> list[tuple[str, dict[str, Any]]]:
    """Reads and searches of patient A (own) and of the sibling, in matching pairs."""
    return [
        (f"/Patient/{world.patient_a}", {}),
        (f"/Patient/{sibling.patient}", {}),
        (f"/Device/thermo-{world.patient_a}", {}),
        (f"/Device/{sibling.device}", {}),
        ("/Observation", {"patient": world.patient_a}),
        ("/Observation", {"patient": sibling.patient}),
        ("/Device", {"patient": world.patient_a}),
        ("/Device", {"patient": sibling.patient}),
        ("/Flag", {"patient": world.patient_a}),
        ("/Flag", {"patient": sibling.patient}),
        ("/Communication", {"patient": world.patient_a}),
        ("/Communication", {"patient": sibling.patient}),
    ]


async def test_the_token_endpoint_grants_user_read_by_default(api_world: World) -> None:
    """Without a requested scope a clinician's token carries user/*.read and no patient."""
    answer = await token_answer(api_world, "clinician_a")
    assert answer.status_code == 200
    assert answer.json()["scope"] == "user/*.read"
    assert answer.json()["patient"] is None


async def test_a_user_token_reads_every_patient_of_the_team(
    api_world: World, sibling: Sibling
) -> None:
    """user/*.read: both patients of team A, reads and searches (the positive control of the
    patient-level test below)."""
    async with await fhir_client(api_world, "clinician_a", scope="user/*.read") as client:
        for path, params in own_and_sibling_paths(api_world, sibling):
            response = await client.get(path, params=params)
            assert response.status_code == 200, (path, params, response.text)
            validate(response.json())
        observation = await client.get(f"/Observation/{sibling.observation}")
        assert validate(observation.json()).subject.reference == f"Patient/{sibling.patient}"


async def test_a_patient_token_reads_its_patient_only(api_world: World, sibling: Sibling) -> None:
    """patient/*.read with patient A: every read and search of A answers; the same of the
    other patient of the same team answers 404, as for a patient that does not exist."""
    answer = await token_answer(
        api_world, "clinician_a", scope="patient/*.read", patient=api_world.patient_a
    )
    assert answer.json()["scope"] == "patient/*.read"
    assert answer.json()["patient"] == api_world.patient_a
    async with await fhir_client(
        api_world, "clinician_a", scope="patient/*.read", patient=api_world.patient_a
    ) as client:
        assert validate((await client.get("/metadata")).json()).fhirVersion == "4.0.1"
        pairs = own_and_sibling_paths(api_world, sibling)
        for (own, own_params), (other, other_params) in zip(pairs[::2], pairs[1::2], strict=True):
            allowed = await client.get(own, params=own_params)
            assert allowed.status_code == 200, (own, allowed.text)
            validate(allowed.json())
            refused = await client.get(other, params=other_params)
            assert refused.status_code == 404, (other, other_params, refused.status_code)
            assert validate(refused.json()).issue[0].code == "not-found"
        assert (await client.get(f"/Observation/{sibling.observation}")).status_code == 404
        flag_id = str(alert_id_for(api_world.alert_a, "start"))
        assert (await client.get(f"/Flag/{flag_id}")).status_code == 200
        by_identifier = await client.get(
            "/Patient", params={"identifier": f"urn:vigil:patient|{sibling.patient}"}
        )
        assert validate(by_identifier.json()).total == 0
        named = await client.get(
            "/Patient/$export",
            params={"patient": sibling.patient},
            headers={"Prefer": "respond-async"},
        )
        assert named.status_code == 404
        # Without a patient parameter the export holds the token's patient alone.
        kick = await client.get(
            "/Patient/$export", params={"_type": "Patient"}, headers={"Prefer": "respond-async"}
        )
        assert kick.status_code == 202, kick.text
        status_url = kick.headers["Content-Location"]
        manifest = await wait_for_export(client, status_url)
        [output] = manifest["output"]
        file = await client.get(output["url"])
        exported = [validate(orjson.loads(line)).id for line in file.content.splitlines()]
        assert exported == [api_world.patient_a]
        # The same user's user-level token reads the job; another patient's token of the
        # same user does not.
        async with await fhir_client(
            api_world, "clinician_a", scope="patient/*.read", patient=sibling.patient
        ) as sibling_client:
            assert (await sibling_client.get(status_url)).status_code == 404
        async with await fhir_client(api_world, "clinician_a") as user_client:
            assert (await user_client.get(status_url)).status_code == 200


async def test_a_token_without_a_fhir_scope_is_refused(api_world: World) -> None:
    """A token asked for with scopes other than FHIR reads gets 403 OperationOutcome on every
    FHIR read, metadata included, while the rest of the API still takes it."""
    answer = await token_answer(api_world, "clinician_a", scope="openid")
    assert answer.status_code == 200 and answer.json()["scope"] == ""
    token = answer.json()["access_token"]
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        for path, params in (
            ("/fhir/metadata", {}),
            (f"/fhir/Patient/{api_world.patient_a}", {}),
            ("/fhir/Observation", {"patient": api_world.patient_a}),
        ):
            refused = await client.get(path, params=params)
            assert refused.status_code == 403, (path, refused.status_code)
            assert validate(refused.json()).issue[0].code == "forbidden"
        assert (await client.get("/api/patients")).status_code == 200


@pytest.mark.parametrize(
    "form",
    [
        {"scope": "patient/*.read"},  # no patient named
        {"patient": "PA-x"},  # a patient without patient/*.read
        {"scope": "patient/*.read", "patient": "no-such-patient"},
    ],
)
async def test_the_token_endpoint_refuses_a_malformed_scope_request(
    api_world: World, form: dict[str, str]
) -> None:
    answer = await token_answer(api_world, "clinician_a", **form)
    assert answer.status_code == 400
    assert "invalid_scope" in answer.text


async def test_a_patient_of_another_team_cannot_be_named(api_world: World) -> None:
    """Naming team B's patient answers as for no patient at all; B's clinician may name it
    (positive control)."""
    other = await token_answer(
        api_world, "clinician_a", scope="patient/*.read", patient=api_world.patient_b
    )
    assert other.status_code == 400 and "no such patient" in other.text
    own = await token_answer(
        api_world, "clinician_b", scope="patient/*.read", patient=api_world.patient_b
    )
    assert own.status_code == 200 and own.json()["patient"] == api_world.patient_b


async def test_the_capability_statement_lists_the_scopes(api_world: World) -> None:
    async with await fhir_client(api_world, "clinician_a") as client:
        statement = validate((await client.get("/metadata")).json())
    description = statement.rest[0].security.description
    assert "user/*.read" in description and "patient/*.read" in description
