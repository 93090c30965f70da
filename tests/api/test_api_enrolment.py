"""Enrolment and device onboarding through the care-team API, against the real stack: a device
registered with its patient publishes through real Mosquitto with the credentials in the answer
and its reading is stored for that patient; other teams' patients are not found; overlapping
bindings are refused; a swap keeps the history; without broker accounts nothing is written."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import httpx
import pytest
import uvicorn

from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import (
    RecordingAlertActions,
    RecordingAudit,
    World,
    bearer,
    build_world,
    free_port,
    until_serving,
)
from tests.factories import temperature_message
from tests.polling import eventually, until_ready
from vigil_tools.admin import local_broker_endpoint
from vigil_tools.stack.accounts import LocalStackBroker
from vigil_tools.stack.settings import StackSettings

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def onboarding_world(stack_env: dict[str, str]) -> AsyncIterator[World]:
    """The API with the local stack's broker accounts, as `vigil admin` has them."""
    port = free_port()
    actions, audit = RecordingAlertActions(), RecordingAudit()
    stack = StackSettings()
    app = create_app(
        ApiSettings(port=port),
        alert_actions=actions,
        audit=audit,
        broker_accounts=LocalStackBroker(stack),
        broker_endpoint=local_broker_endpoint(stack),
    )
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    try:
        yield await build_world(
            stack_env["VIGIL_PG_DSN"], f"http://127.0.0.1:{port}", actions, audit
        )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def call(
    world: World, label: str, method: str, path: str, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=world.base_url, timeout=30) as client:
        return await client.request(
            method, path, json=body, headers=bearer(await world.token(label))
        )


def enrolment(patient_id: str, team: str) -> dict[str, Any]:
    return {
        "patient_id": patient_id,
        "care_team_id": team,
        "weight_kg": 21.5,
        "age_years": 7,
        "cycle_start": (datetime.now(UTC) - timedelta(days=2)).isoformat(),
        "step_up_day": 8,
    }


def free_metrics_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_enrolled_patients_registered_thermometer_is_stored_for_them(
    onboarding_world: World, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enrol, register a thermometer with the patient, publish as it over TLS with the answer's
    credentials: ingest stores the reading for that patient (not `unknown_device`)."""
    from services.ingest.app import run
    from services.ingest.settings import IngestSettings

    w = onboarding_world
    patient, device = f"PN-{w.run}", f"thermo-new-{w.run}"
    enrolled = await call(w, "nurse_a", "POST", "/api/patients", enrolment(patient, w.team_a))
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["cycle"]["step_up_day"] == 8
    registered = await call(
        w,
        "nurse_a",
        "POST",
        "/api/devices",
        {"device_id": device, "kind": "thermometer", "model": "T-1", "patient_id": patient},
    )
    assert registered.status_code == 201, registered.text
    answer = registered.json()
    config = answer["configuration"]
    assert answer["binding"]["patient_id"] == patient
    assert answer["device"]["care_team_id"] == w.team_a
    assert (config["client_id"], config["username"]) == (device, device)
    assert config["topic_prefix"] == f"vigil/v1/dev/{device}/"
    assert config["tls"] is True and config["port"] == int(stack_env["VIGIL_MQTT_TLS_PORT"])
    # The cycle start is where the rules and the course plot read it.
    hourly = await call(w, "nurse_a", "GET", f"/api/patients/{patient}/temperature-hourly")
    assert hourly.json()["basis"] == "cycle_start"

    run_id = uuid.uuid4().hex[:8]
    metrics_port = free_metrics_port()
    monkeypatch.setenv("VIGIL_INGEST_MQTT_CLIENT_ID", f"ingest-enrol-{run_id}")
    monkeypatch.setenv("VIGIL_INGEST_MQTT_SHARE_GROUP", f"ingest-enrol-{run_id}")
    monkeypatch.setenv("VIGIL_INGEST_METRICS_PORT", str(metrics_port))
    stop = asyncio.Event()
    ingest = asyncio.create_task(run(IngestSettings(), stop))
    conn = await asyncpg.connect(stack_env["VIGIL_PG_DSN"])
    try:
        await until_ready(metrics_port, what="ingest", tasks=[ingest])
        async with aiomqtt.Client(
            config["host"],
            config["port"],
            username=config["username"],
            password=config["password"],
            identifier=config["client_id"],
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_params=aiomqtt.TLSParameters(ca_certs=config["ca_certificate"]),
        ) as client:
            message = temperature_message(device, 37.9, unit="C", site="axillary")
            await client.publish(
                config["topic_prefix"] + "temperature", json.dumps(message).encode(), qos=1
            )
        row = await eventually(
            lambda: conn.fetchrow(
                "SELECT patient_id, value_c FROM temperature_readings WHERE device_id = $1",
                device,
            ),
            timeout_s=30,
            what="the new thermometer's reading to be stored",
            interval_s=0.1,
        )
        assert (row["patient_id"], row["value_c"]) == (patient, 37.9)
    finally:
        stop.set()
        await asyncio.wait_for(ingest, 30)
        await conn.close()
    revoked = await call(w, "nurse_a", "DELETE", f"/api/devices/{device}/credentials")
    assert revoked.status_code == 204
    history = (await call(w, "clinician_a", "GET", f"/api/devices/{device}/history")).json()
    assert [e["action"] for e in history["credential_events"]] == ["issued", "revoked"]
    actions = [(e[1], e[2]) for e in w.audit.entries]
    assert ("patient.enrolled", f"patient:{patient}") in actions
    assert ("device.registered", f"device:{device}") in actions
    assert config["password"] not in repr(w.audit.entries)


async def test_other_teams_and_read_only_roles_are_refused(onboarding_world: World) -> None:
    w = onboarding_world
    cases = [
        ("nurse_a", "PUT", f"/api/patients/{w.patient_b}/weight", {"weight_kg": 20}, 404),
        ("nurse_a", "POST", "/api/patients", enrolment(f"PX-{w.run}", w.team_b), 404),
        (
            "nurse_a",
            "POST",
            "/api/devices",
            {"device_id": f"x-{w.run}", "kind": "pump", "patient_id": w.patient_b},
            404,
        ),
        ("nurse_a", "GET", f"/api/devices/thermo-{w.patient_b}/history", None, 404),
        ("clinician_a", "POST", "/api/patients", enrolment(f"PY-{w.run}", w.team_a), 403),
        ("auditor_a", "PUT", f"/api/patients/{w.patient_a}/weight", {"weight_kg": 20}, 403),
    ]
    for label, method, path, body, expected in cases:
        response = await call(w, label, method, path, body)
        assert response.status_code == expected, (label, method, path, response.text)
    # The weight a charge nurse of the team sets is the patient's.
    changed = await call(
        w, "nurse_a", "PUT", f"/api/patients/{w.patient_a}/weight", {"weight_kg": 20.25}
    )
    assert changed.status_code == 200 and changed.json()["weight_kg"] == 20.25


async def test_overlap_is_refused_and_a_swap_keeps_the_history(onboarding_world: World) -> None:
    w = onboarding_world
    x, y = f"PS-{w.run}", f"PT-{w.run}"
    for patient in (x, y):
        assert (
            await call(w, "nurse_a", "POST", "/api/patients", enrolment(patient, w.team_a))
        ).status_code == 201
    start = datetime.now(UTC) - timedelta(hours=6)
    pumps = [f"pump-{i}-{w.run}" for i in (1, 2, 3)]
    for pump, patient in zip(pumps, (x, y, None), strict=True):
        body: dict[str, Any] = {"device_id": pump, "kind": "pump", "care_team_id": w.team_a}
        if patient:
            body |= {"patient_id": patient, "bound_from": start.isoformat()}
        response = await call(w, "nurse_a", "POST", "/api/devices", body)
        assert response.status_code == 201, response.text

    # pump-2 serves y: binding it to x too, or swapping it in for x's pump, overlaps.
    overlap = await call(
        w,
        "nurse_a",
        "POST",
        f"/api/devices/{pumps[1]}/bindings",
        {"patient_id": x, "valid_from": (start + timedelta(hours=1)).isoformat()},
    )
    assert overlap.status_code == 409 and y in overlap.json()["detail"]
    refused = await call(
        w,
        "nurse_a",
        "POST",
        f"/api/patients/{x}/swap",
        {"old_device_id": pumps[0], "new_device_id": pumps[1]},
    )
    assert refused.status_code == 409
    # A device swapped for itself is refused in FastAPI's validation shape, naming the field.
    itself = await call(
        w,
        "nurse_a",
        "POST",
        f"/api/patients/{x}/swap",
        {"old_device_id": pumps[0], "new_device_id": pumps[0]},
    )
    assert itself.status_code == 422
    assert itself.json()["detail"][0]["loc"] == ["body", "new_device_id"]

    at = datetime.now(UTC).replace(microsecond=0)
    swapped = await call(
        w,
        "nurse_a",
        "POST",
        f"/api/patients/{x}/swap",
        {"old_device_id": pumps[0], "new_device_id": pumps[2], "at": at.isoformat()},
    )
    assert swapped.status_code == 200, swapped.text
    assert swapped.json()["ended"]["valid_to"] == swapped.json()["started"]["valid_from"]
    old = (await call(w, "clinician_a", "GET", f"/api/devices/{pumps[0]}/history")).json()
    new = (await call(w, "clinician_a", "GET", f"/api/devices/{pumps[2]}/history")).json()
    assert [(b["patient_id"], datetime.fromisoformat(b["valid_to"])) for b in old["bindings"]] == [
        (x, at)
    ]
    assert [
        (b["patient_id"], datetime.fromisoformat(b["valid_from"]), b["valid_to"])
        for b in new["bindings"]
    ] == [(x, at, None)]
    # The patient's device list shows both, the old one with its end.
    patient = (await call(w, "clinician_a", "GET", f"/api/patients/{x}")).json()
    assert {d["device_id"] for d in patient["devices"]} >= {pumps[0], pumps[2]}

    # After unbinding, pump-2 can serve x.
    unbound = await call(
        w, "nurse_a", "POST", f"/api/devices/{pumps[1]}/unbind", {"at": at.isoformat()}
    )
    assert unbound.status_code == 200
    bound = await call(
        w,
        "nurse_a",
        "POST",
        f"/api/devices/{pumps[1]}/bindings",
        {"patient_id": x, "valid_from": (at + timedelta(hours=1)).isoformat()},
    )
    assert bound.status_code == 201, bound.text
    for pump in pumps:
        assert (
            await call(w, "nurse_a", "DELETE", f"/api/devices/{pump}/credentials")
        ).status_code == 204


async def test_without_broker_accounts_registration_is_503_and_writes_nothing(
    api_world: World, pg_dsn: str
) -> None:
    device = f"nobroker-{api_world.run}"
    response = await call(
        api_world,
        "nurse_a",
        "POST",
        "/api/devices",
        {"device_id": device, "kind": "thermometer", "patient_id": api_world.patient_a},
    )
    assert response.status_code == 503
    assert "broker" in response.json()["detail"]
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM devices WHERE device_id = $1", device) == 0
        assert (
            await conn.fetchval("SELECT count(*) FROM device_bindings WHERE device_id = $1", device)
            == 0
        )
    finally:
        await conn.close()


async def test_the_openapi_document_declares_the_refusals(onboarding_world: World) -> None:
    async with httpx.AsyncClient(base_url=onboarding_world.base_url) as client:
        document = (await client.get("/openapi.json")).json()
    register = document["paths"]["/api/devices"]["post"]
    assert {"201", "404", "409", "422", "503"} <= set(register["responses"])
    assert document["paths"]["/api/patients"]["post"]["requestBody"]
