"""`vigil admin` on the local stack: enrol, add a device in one step (its account works on the
broker at once), swap, history, the refusals' exit codes, and the operator in the audit log."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import pytest

from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from vigil_tools.admin import EXIT_CONFLICT, EXIT_INVALID, EXIT_NOT_FOUND, main

pytestmark = pytest.mark.stack


def admin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """Run `vigil admin --local --json ...`; returns the exit code, the JSON printed, stderr."""
    code = main(["--local", "--operator", "test-operator", "--json", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


async def _fetch(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


def fetch(dsn: str, query: str, *args: Any) -> list[dict[str, Any]]:
    return asyncio.run(_fetch(dsn, query, *args))


async def connects(config: dict[str, Any]) -> None:
    async with aiomqtt.Client(
        config["host"],
        config["port"],
        username=config["username"],
        password=config["password"],
        identifier=config["client_id"],
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_params=aiomqtt.TLSParameters(ca_certs=config["ca_certificate"]),
    ):
        pass


def test_enrol_onboard_and_swap_from_the_command_line(
    stack_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    team, patient = f"team-cli-{run}", f"P-cli-{run}"
    pump_a, pump_b, thermo = f"pump-a-{run}", f"pump-b-{run}", f"thermo-{run}"

    async def team_row() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await upsert_care_team(conn, team, "Oncology CLI", f"oncall@{team}.test")
        finally:
            await conn.close()

    asyncio.run(team_row())
    cycle_start = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
    code, enrolled, err = admin(
        capsys,
        "enrol",
        patient,
        "--team",
        team,
        "--weight-kg",
        "18.4",
        "--birth-date",
        "2019-05-01",
        "--cycle-start",
        cycle_start.isoformat(),
        "--step-up-day",
        "8",
    )
    assert code == 0, err
    assert enrolled["birth_date"] == "2019-05-01"
    assert fetch(
        dsn, "SELECT cycle_start, step_up_day FROM patient_cycles WHERE patient_id = $1", patient
    ) == [{"cycle_start": cycle_start, "step_up_day": 8}]

    code, added, err = admin(
        capsys,
        "add-device",
        thermo,
        "--kind",
        "thermometer",
        "--reporting",
        "spot_check",
        "--patient",
        patient,
    )
    assert code == 0, err
    config = added["configure the device with"]
    assert added["binding"]["patient_id"] == patient
    asyncio.run(connects(config))  # the account works at once, over TLS

    start = (datetime.now(UTC) - timedelta(hours=3)).replace(microsecond=0)
    assert (
        admin(
            capsys,
            "add-device",
            pump_a,
            "--kind",
            "pump",
            "--patient",
            patient,
            "--from",
            start.isoformat(),
        )[0]
        == 0
    )
    assert admin(capsys, "add-device", pump_b, "--kind", "pump", "--team", team)[0] == 0

    # Refusals and their exit codes.
    assert admin(capsys, "add-device", pump_b, "--kind", "pump", "--team", team)[0] == EXIT_CONFLICT
    assert admin(capsys, "bind", pump_b, patient, "--from", start.isoformat())[0] == 0
    code, _, err = admin(capsys, "bind", pump_b, patient, "--from", start.isoformat())
    assert code == EXIT_CONFLICT and "overlaps" in err
    assert admin(capsys, "weight", f"P-none-{run}", "19")[0] == EXIT_NOT_FOUND
    assert admin(capsys, "swap", patient, pump_a, thermo)[0] == EXIT_INVALID
    assert admin(capsys, "unbind", pump_b, "--at", start.isoformat())[0] == EXIT_INVALID

    # pump_b was bound from start; end it, then swap it in for pump_a.
    at = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    assert (
        admin(capsys, "unbind", pump_b, "--at", (start + timedelta(minutes=30)).isoformat())[0] == 0
    )
    code, swapped, err = admin(capsys, "swap", patient, pump_a, pump_b, "--at", at.isoformat())
    assert code == 0, err
    assert swapped["ended"]["valid_to"] == swapped["started"]["valid_from"] == at.isoformat()

    code, history, _ = admin(capsys, "device-history", pump_b)
    assert [(b["valid_from"], b["valid_to"]) for b in history["bindings"]] == [
        (start.isoformat(), (start + timedelta(minutes=30)).isoformat()),
        (at.isoformat(), None),
    ]
    assert [e["action"] for e in history["credential_events"]] == ["issued"]
    assert admin(capsys, "weight", patient, "18.9")[1]["weight_kg"] == 18.9

    audited = fetch(
        dsn,
        "SELECT action FROM audit_log WHERE actor = 'operator:test-operator' AND "
        "subject = ANY($1::text[]) ORDER BY seq",
        [f"patient:{patient}", f"device:{pump_a}", f"device:{pump_b}", f"device:{thermo}"],
    )
    assert [a["action"] for a in audited] == [
        "patient.enrolled",
        "device.registered",
        "device.registered",
        "device.registered",
        "device.bound",
        "device.unbound",
        "device.swapped",
        "device.history",
        "patient.weight_changed",
    ]
    for device in (thermo, pump_a, pump_b):
        assert admin(capsys, "revoke-credential", device)[0] == 0
    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connects(config))


def test_help_shows_examples_and_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in (
        "enrol",
        "weight",
        "add-device",
        "bind",
        "unbind",
        "swap",
        "device-history",
        "end-infusion",
        "discharge",
    ):
        assert f"vigil admin {command}" in text or command in text
    assert "vigil admin enrol P-0107" in text and "exit codes" in text


def test_end_infusion_and_discharge_from_the_command_line(
    stack_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """End the infusion (the pump is unbound, the thermometer stays), then discharge (every
    binding ends); the same discharge again prints the same record, another reason is exit 4;
    both changes are audited under the operator."""
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    team, patient = f"team-cli-out-{run}", f"P-cli-out-{run}"
    pump, thermo = f"pump-out-{run}", f"thermo-out-{run}"

    async def registered() -> None:
        since = datetime.now(UTC) - timedelta(days=20)
        conn = await asyncpg.connect(dsn)
        try:
            await upsert_care_team(conn, team, "Oncology CLI", f"oncall@{team}.test")
            await upsert_patient(conn, patient, team, 18.4)
            for device, kind in ((pump, "pump"), (thermo, "thermometer")):
                await upsert_device(conn, device, kind)
                await bind_device(conn, device, patient, since)
        finally:
            await conn.close()

    asyncio.run(registered())
    ended_at = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
    code, ended, err = admin(capsys, "end-infusion", patient, "--at", ended_at.isoformat())
    assert code == 0, err
    assert ended["status"] == "infusion_ended"
    assert [d["device_id"] for d in ended["devices_unbound"]] == [pump]

    code, done, err = admin(capsys, "discharge", patient, "--reason", "course completed")
    assert code == 0, err
    assert (done["status"], done["infusion_ended_at"]) == ("discharged", ended_at.isoformat())
    assert done["discharged_by"] == "operator:test-operator" and done["changed"] is True
    assert [d["device_id"] for d in done["devices_unbound"]] == [thermo]
    open_bindings = fetch(
        dsn,
        "SELECT device_id FROM device_bindings WHERE patient_id = $1 AND valid_to IS NULL",
        patient,
    )
    assert open_bindings == []

    code, again, err = admin(capsys, "discharge", patient, "--reason", "course completed")
    assert code == 0, err
    assert again["discharged_at"] == done["discharged_at"] and again["changed"] is False
    code, _, err = admin(capsys, "discharge", patient, "--reason", "admitted")
    assert code == EXIT_CONFLICT and "already discharged" in err
    code, _, err = admin(capsys, "end-infusion", f"P-none-{run}")
    assert code == EXIT_NOT_FOUND
    audited = fetch(
        dsn,
        "SELECT action FROM audit_log WHERE actor = 'operator:test-operator' AND subject = $1 "
        "ORDER BY seq",
        f"patient:{patient}",
    )
    assert [r["action"] for r in audited] == ["patient.infusion_ended", "patient.discharged"]
