"""In a real browser: a charge nurse enrols a child, registers and binds their devices and swaps
a pump mid-infusion from the dashboard's forms, and sees every time in the care team's zone
with the zone named (whatever the browser's own zone). Each step checks what the nurse sees and
what the database then holds; refusals are checked for their words and for nothing written.

Debian's Chromium driven by Playwright, the API served over HTTP on loopback with the local
stack's broker accounts (as `vigil admin` has them), against the stack's PostgreSQL and
Mosquitto: the password the page shows is tried on the broker. Screenshots are kept in
``test-artifacts/``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import aiomqtt
import asyncpg
import httpx
import pytest

from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.domain.clocks import local_time
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import upsert_care_team
from tests.api.conftest import insert_alert
from tests.e2e.conftest import free_port
from tests.polling import eventually
from tests.support.dashboard import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORD,
    add_user,
    log_in,
    served,
)
from vigil_tools.admin import local_broker_endpoint
from vigil_tools.stack.accounts import LocalStackBroker
from vigil_tools.stack.settings import StackSettings

pytestmark = pytest.mark.stack

#: The care team's zone (a half-hour offset), and another for the browser.
TEAM_ZONE = "Asia/Kolkata"
BROWSER_ZONE = "America/New_York"


@dataclass
class Ward:
    base_url: str
    dsn: str
    run: str
    team: str
    username: str

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """The API as another client of it would call it (bearer token), to set a scene up."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            token = await client.post(
                "/auth/token", data={"username": self.username, "password": PASSWORD}
            )
            token.raise_for_status()
            return await client.request(
                method,
                path,
                json=body,
                headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            )

    async def enrol(self, patient: str) -> None:
        answer = await self.call(
            "POST",
            "/api/patients",
            {
                "patient_id": patient,
                "care_team_id": self.team,
                "weight_kg": 20.0,
                "age_years": 7,
                "cycle_start": (datetime.now(UTC) - timedelta(days=3)).isoformat(),
            },
        )
        assert answer.status_code == 201, answer.text

    async def register(self, device: str, kind: str, patient: str | None = None) -> None:
        body: dict[str, Any] = {"device_id": device, "kind": kind, "care_team_id": self.team}
        if patient is not None:
            body["patient_id"] = patient
        answer = await self.call("POST", "/api/devices", body)
        assert answer.status_code == 201, answer.text


@pytest.fixture(scope="module")
async def ward(stack_env: dict[str, str]) -> AsyncIterator[Ward]:
    """A care team in TEAM_ZONE, its charge nurse, and the API with the broker's accounts."""
    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    team, username = f"team-forms-{run}", f"charge-{run}"
    conn = await asyncpg.connect(dsn)
    try:
        await upsert_care_team(conn, team, "Paediatric oncology", f"oncall-{run}@hospital.test")
        await conn.execute(
            "UPDATE care_teams SET timezone = $1 WHERE care_team_id = $2", TEAM_ZONE, team
        )
    finally:
        await conn.close()
    await add_user(dsn, f"u-{run}", username, "Charge nurse", Role.CHARGE_NURSE, [team])
    settings = ApiSettings(port=free_port())
    stack = StackSettings()
    app = create_app(
        settings,
        broker_accounts=LocalStackBroker(stack),
        broker_endpoint=local_broker_endpoint(stack),
    )
    async with served(app, settings) as base_url:
        yield Ward(base_url, dsn, run, team, username)


@pytest.fixture
async def page(ward: Ward) -> AsyncIterator[Any]:
    """A logged-in page in a browser whose own zone is not the team's."""
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = await browser.new_page(
                viewport={"width": 1200, "height": 900}, timezone_id=BROWSER_ZONE
            )
            await log_in(tab, ward.base_url, ward.username)
            yield tab
        finally:
            await browser.close()


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def shown_time(element: Any) -> tuple[datetime, str]:
    """A <time> element's instant (its datetime attribute) and its words."""
    iso = await element.get_attribute("datetime")
    assert iso is not None
    at = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    assert at.tzinfo is not None
    return at, await element.inner_text()


async def test_charge_nurse_enrols_a_child_with_the_cycle_start_in_the_teams_zone(
    ward: Ward, page: Any
) -> None:
    patient = f"P-enrol-{ward.run}"
    await page.goto(f"{ward.base_url}/enrol")
    # The cycle start is entered in the team's zone, which the form names.
    assert await page.locator("form#enrol .zone").inner_text() == TEAM_ZONE
    await page.fill("#patient_id", patient)
    await page.fill("#weight_kg", "18.4")
    await page.fill("#age_years", "6")
    await page.fill("#cycle_start", "2026-12-01T08:00")
    await page.click("form#enrol button[type=submit]")
    result = page.locator("#result")
    await result.locator("time").wait_for(timeout=15_000)
    assert f"{patient} is enrolled" in await result.inner_text()
    at, words = await shown_time(result.locator("time"))
    started = datetime(2026, 12, 1, 8, 0, tzinfo=ZoneInfo(TEAM_ZONE))
    assert at == started and words == f"01 Dec 08:00 ({TEAM_ZONE})"
    await page.screenshot(path=str(ARTIFACTS / "dashboard-enrol.png"), full_page=True)

    rows = await fetch(
        ward.dsn,
        "SELECT p.care_team_id, p.weight_kg::float8, p.age_years, c.cycle_start, c.step_up_day "
        "FROM patients p JOIN patient_cycles c USING (patient_id) WHERE patient_id = $1",
        patient,
    )
    assert [tuple(r) for r in rows] == [(ward.team, 18.4, 6, started, 8)]

    # The same id again: refused in words, and nothing more is written.
    await page.click("form#enrol button[type=submit]")
    error = page.locator("#error")
    await page.wait_for_selector("#error:not(:empty)", timeout=15_000)
    assert await error.inner_text() == f"Not done: Patient id '{patient}' is already in use."
    # An id the registry cannot take and a weight no child has: a line each, naming the field.
    await page.fill("#patient_id", "new patient!")
    await page.fill("#weight_kg", "1000")
    await page.click("form#enrol button[type=submit]")
    await page.wait_for_selector("#error:text('Patient id may use only')", timeout=15_000)
    lines = (await error.inner_text()).splitlines()
    assert lines == [
        "Patient id may use only letters, digits and _ . - "
        "(at most 64, starting with a letter or digit).",
        "Weight must be less than 1000.",
    ]
    await page.screenshot(path=str(ARTIFACTS / "dashboard-enrol-refused.png"), full_page=True)
    counts = await fetch(
        ward.dsn,
        "SELECT (SELECT count(*) FROM patient_cycles WHERE patient_id = $1), "
        "(SELECT count(*) FROM patients WHERE patient_id = 'new patient!')",
        patient,
    )
    assert tuple(counts[0]) == (1, 0)


async def test_charge_nurse_registers_and_binds_devices_and_sees_the_one_time_password(
    ward: Ward, page: Any, stack_env: dict[str, str]
) -> None:
    patient = f"P-dev-{ward.run}"
    thermometer, pump = f"thermo-dev-{ward.run}", f"pump-dev-{ward.run}"
    await ward.enrol(patient)

    # From the patient's page to the registration form, the patient already filled in.
    await page.goto(f"{ward.base_url}/patients/{patient}")
    await page.click("#register-link")
    await page.wait_for_url(f"{ward.base_url}/devices?patient={patient}")
    assert await page.input_value("#register_patient") == patient
    await page.fill("#device_id", thermometer)
    await page.select_option("#kind", "thermometer")
    await page.fill("#model", "T-1")
    await page.select_option("#reporting", "spot_check")
    await page.click("form#register button[type=submit]")
    config = page.locator("#configuration")
    await config.wait_for(state="visible", timeout=15_000)
    password = await page.locator("#cfg-password").inner_text()
    assert len(password) >= 16
    assert await page.locator("#cfg-username").inner_text() == thermometer
    assert await page.locator("#cfg-client-id").inner_text() == thermometer
    broker = await page.locator("#cfg-broker").inner_text()
    port = int(stack_env["VIGIL_MQTT_TLS_PORT"])
    assert broker.startswith(f"127.0.0.1 port {port}, TLS, trusting the CA certificate ")
    topics = await page.locator("#cfg-topics").inner_text()
    assert topics == f"vigil/v1/dev/{thermometer}/temperature"
    text = await config.inner_text()
    assert "The password is shown only now." in text
    bound_at, words = await shown_time(page.locator("#cfg-binding time"))
    assert words.endswith(f"({TEAM_ZONE})") and words == local_time(bound_at, TEAM_ZONE)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-device-registered.png"), full_page=True)

    # What the device is told to use works: the broker takes that login over TLS.
    ca_file = broker.split("trusting the CA certificate ", 1)[1]
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        username=thermometer,
        password=password,
        identifier=thermometer,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_params=aiomqtt.TLSParameters(ca_certs=ca_file),
    ):
        pass
    rows = await fetch(
        ward.dsn,
        "SELECT d.kind, d.model, d.reporting, d.care_team_id, b.patient_id, b.valid_from, "
        "b.valid_to, (SELECT array_agg(action) FROM device_credential_events e "
        "WHERE e.device_id = d.device_id) FROM devices d JOIN device_bindings b USING "
        "(device_id) WHERE d.device_id = $1",
        thermometer,
    )
    assert [tuple(r) for r in rows] == [
        ("thermometer", "T-1", "spot_check", ward.team, patient, bound_at, None, ["issued"])
    ]

    # A spare pump, registered for the team, then bound with the bind form.
    await page.fill("#register_patient", "")
    await page.fill("#device_id", pump)
    await page.select_option("#kind", "pump")
    await page.click("form#register button[type=submit]")
    await page.wait_for_selector(f"#cfg-device:text('pump {pump}')", timeout=15_000)
    assert "bound to no patient yet" in await page.locator("#cfg-binding").inner_text()
    assert (await page.locator("#cfg-topics").inner_text()).splitlines() == [
        f"vigil/v1/dev/{pump}/pump-status",
        f"vigil/v1/dev/{pump}/pump-event",
    ]
    assert await fetch(ward.dsn, "SELECT 1 FROM device_bindings WHERE device_id = $1", pump) == []
    await page.fill("#bind_device", pump)
    await page.fill("#bind_patient", patient)
    await page.click("form#bind button[type=submit]")
    result = page.locator("#bind-result")
    await result.locator("time").wait_for(timeout=15_000)
    assert (await result.inner_text()).startswith(f"{pump} is bound to {patient} from ")
    pump_from, words = await shown_time(result.locator("time"))
    assert words == local_time(pump_from, TEAM_ZONE)
    bindings = await fetch(
        ward.dsn,
        "SELECT patient_id, valid_from, valid_to FROM device_bindings WHERE device_id = $1",
        pump,
    )
    assert [tuple(r) for r in bindings] == [(patient, pump_from, None)]

    # Bound a second time from now: refused in words, nothing written.
    await page.click("form#bind button[type=submit]")
    await page.wait_for_selector("#bind-error:not(:empty)", timeout=15_000)
    refused = await page.locator("#bind-error").inner_text()
    assert refused.startswith(f"Not done: The device is bound to {patient} from ")
    assert f"{local_time(pump_from, TEAM_ZONE)} to open-ended" in refused
    await page.screenshot(path=str(ARTIFACTS / "dashboard-device-bound.png"), full_page=True)
    still = await fetch(ward.dsn, "SELECT 1 FROM device_bindings WHERE device_id = $1", pump)
    assert len(still) == 1

    # The patient's page lists both, bound from those instants, in the team's zone.
    await page.goto(f"{ward.base_url}/patients/{patient}")
    for device, since in ((thermometer, bound_at), (pump, pump_from)):
        cell = page.locator(f"#devices tr[data-device='{device}'] td.from time")
        at, words = await shown_time(cell)
        assert at == since and words == local_time(since, TEAM_ZONE)


async def test_charge_nurse_swaps_a_pump_mid_infusion(ward: Ward, page: Any) -> None:
    patient = f"P-swap-{ward.run}"
    old, new = f"pump-a-{ward.run}", f"pump-b-{ward.run}"
    await ward.enrol(patient)
    await ward.register(old, "pump", patient)
    await ward.register(new, "pump")

    await page.goto(f"{ward.base_url}/patients/{patient}")
    assert await page.locator("form#swap select[name=old_device_id]").input_value() == old
    await page.fill("form#swap input[name=new_device_id]", new)
    await page.click("form#swap button[type=submit]")
    # The page reloads and says what happened; the table shows the swap.
    flash = page.locator("#flash")
    await page.wait_for_selector("#flash:not(:empty)", timeout=15_000)
    said = await flash.inner_text()
    assert said.startswith("Swapped at ") and said.endswith(
        f"{old} is no longer bound to {patient}; {new} is, from then on."
    )
    assert f"({TEAM_ZONE})" in said
    await page.screenshot(path=str(ARTIFACTS / "dashboard-swap.png"), full_page=True)

    rows = await fetch(
        ward.dsn,
        "SELECT device_id, valid_from, valid_to FROM device_bindings WHERE patient_id = $1 "
        "ORDER BY valid_from, device_id",
        patient,
    )
    (old_row, new_row) = [tuple(r) for r in rows]
    assert old_row[0] == old and new_row[0] == new
    swapped_at = old_row[2]
    assert swapped_at is not None and new_row[1] == swapped_at and new_row[2] is None
    assert local_time(swapped_at, TEAM_ZONE) in said
    until, words = await shown_time(page.locator(f"#devices tr[data-device='{old}'] td.until time"))
    assert until == swapped_at and words.endswith(f"({TEAM_ZONE})")
    assert (
        await page.locator(f"#devices tr[data-device='{new}']").get_attribute("data-current")
        == "yes"
    )
    assert (
        await page.locator(f"#devices tr[data-device='{old}']").get_attribute("data-current")
        == "no"
    )

    # Swapping the pump that is no longer on: refused in words, the bindings unchanged. (The
    # form offers only devices bound now; a stale page still has the old one.)
    await page.evaluate(
        "([old]) => { const o = document.createElement('option'); o.value = old; o.text = old;"
        " const s = document.querySelector('form#swap select'); s.add(o); s.value = old; }",
        [old],
    )
    await page.fill("form#swap input[name=new_device_id]", new)
    await page.click("form#swap button[type=submit]")
    await page.wait_for_selector("#swap-error:not(:empty)", timeout=15_000)
    assert await page.locator("#swap-error").inner_text() == (
        "Not done: The old device is not bound to this patient at that time."
    )
    again = await fetch(
        ward.dsn,
        "SELECT device_id, valid_from, valid_to FROM device_bindings WHERE patient_id = $1 "
        "ORDER BY valid_from, device_id",
        patient,
    )
    assert [tuple(r) for r in again] == [old_row, new_row]


async def test_every_page_shows_times_in_the_teams_zone_with_the_zone_named(
    ward: Ward, page: Any
) -> None:
    """The patient page, the roster and the alert list and timeline: every time is a <time>
    whose words are its instant in the team's zone, named (the browser is elsewhere)."""
    patient, pump = f"P-zone-{ward.run}", f"pump-zone-{ward.run}"
    await ward.enrol(patient)
    await ward.register(pump, "pump", patient)
    reported = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    conn = await asyncpg.connect(ward.dsn)
    try:
        await conn.execute(
            "INSERT INTO pump_status (device_time, ingest_time, patient_id, device_id, "
            "message_id, seq, state, rate_ml_h, volume_remaining_ml) "
            "VALUES ($1, $1, $2, $3, $4, 1, 'running', 10, 25)",
            reported,
            patient,
            pump,
            uuid.uuid4(),
        )
        alert = await insert_alert(conn, patient, pump, reported, 39.0)
    finally:
        await conn.close()
    empty_at = reported + timedelta(hours=2.5)

    async def all_named(where: str) -> int:
        times = page.locator(f"{where} time")
        count = await times.count()
        for i in range(count):
            at, words = await shown_time(times.nth(i))
            named = (local_time(at, TEAM_ZONE), local_time(at, TEAM_ZONE, seconds=True))
            assert words in named, (where, words)
        return count

    await page.goto(f"{ward.base_url}/patients/{patient}")
    assert await page.locator("#bag-empty time").get_attribute("datetime") == empty_at.isoformat()
    assert await all_named("main") >= 4
    await page.screenshot(path=str(ARTIFACTS / "dashboard-patient-zone.png"), full_page=True)

    await page.goto(f"{ward.base_url}/roster")
    row = page.locator(f"tr[data-patient='{patient}']")
    await row.wait_for(timeout=15_000)
    at, words = await shown_time(row.locator("td.bag time"))
    assert at == empty_at and words == local_time(empty_at, TEAM_ZONE)
    await eventually(
        lambda: page.locator("#asof time").count(), timeout_s=15, what="the roster's as-of time"
    )
    assert await all_named("#asof") == 1
    await page.screenshot(path=str(ARTIFACTS / "dashboard-roster-zone.png"), full_page=True)

    await page.goto(f"{ward.base_url}/")
    alert_row = page.locator(f"tr[data-dedup-key='{alert}']")
    await alert_row.wait_for(timeout=15_000)
    at, words = await shown_time(alert_row.locator("td.opened time"))
    assert at == reported and words == local_time(reported, TEAM_ZONE)

    await page.goto(f"{ward.base_url}/alerts/{quote(alert, safe='')}")
    await page.wait_for_selector("#timeline")
    assert await all_named("#timeline") >= 1
    # Each step at the time it was recorded; the alert's own device time named in its words.
    raised = page.locator("#timeline tr[data-kind='alert_start']")
    assert f"(device time {local_time(reported, TEAM_ZONE)})" in await raised.inner_text()
    await page.screenshot(path=str(ARTIFACTS / "dashboard-timeline-zone.png"), full_page=True)


async def test_the_forms_are_only_for_roles_that_may_manage_patients(ward: Ward) -> None:
    """A clinician sees no link to them, and the pages answer 403."""
    username = f"clinician-{ward.run}"
    await add_user(ward.dsn, f"uc-{ward.run}", username, "Clinician", Role.CLINICIAN, [ward.team])
    async with httpx.AsyncClient(base_url=ward.base_url, timeout=30) as client:
        login = await client.post("/auth/token", data={"username": username, "password": PASSWORD})
        assert login.status_code == 200
        roster = await client.get("/roster")
        assert roster.status_code == 200 and 'href="/roster"' in roster.text
        assert 'href="/enrol"' not in roster.text and 'href="/devices"' not in roster.text
        assert (await client.get("/enrol")).status_code == 403
        assert (await client.get("/devices")).status_code == 403


async def test_charge_nurse_discharges_a_child_after_confirming(ward: Ward, page: Any) -> None:
    """Declining the confirmation changes nothing; confirming discharges: the devices are
    unbound at that time, the child leaves the roster, and the roster says what was done."""
    patient, pump = f"P-out-{ward.run}", f"pump-out-{ward.run}"
    await ward.enrol(patient)
    await ward.register(pump, "pump", patient)
    await page.goto(f"{ward.base_url}/patients/{patient}")
    await page.fill("form#discharge input[name=reason]", "course completed")
    asked: list[str] = []

    async def decline(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.accept()

    # A time still to come: confirmed, refused by the API in words, nothing written.
    tomorrow = datetime.now(ZoneInfo(TEAM_ZONE)) + timedelta(days=1)
    await page.fill("form#discharge input[name=at]", f"{tomorrow:%Y-%m-%dT%H:%M}")
    page.once("dialog", accept)
    await page.click("form#discharge button[type=submit]")
    await page.wait_for_selector("#discharge-error:not(:empty)", timeout=15_000)
    assert asked == [
        f"Discharge {patient} ({tomorrow:%d %b %H:%M} ({TEAM_ZONE})), reason: course completed?"
        "\n\nTheir devices are unbound and nothing is paged for them any more."
    ]
    assert await page.locator("#discharge-error").inner_text() == (
        "Time: The time is in the future; record it when it happens."
    )
    await page.fill("form#discharge input[name=at]", "")

    asked.clear()
    page.once("dialog", decline)
    await page.click("form#discharge button[type=submit]")
    await eventually(lambda: bool(asked), timeout_s=15, what="the confirmation to be asked")
    assert asked[0].startswith(f"Discharge {patient} (now), reason: course completed?")
    state = await fetch(
        ward.dsn,
        "SELECT p.discharged_at, b.valid_to FROM patients p JOIN device_bindings b "
        "USING (patient_id) WHERE patient_id = $1",
        patient,
    )
    assert [tuple(r) for r in state] == [(None, None)]

    page.once("dialog", accept)
    await page.click("form#discharge button[type=submit]")
    await page.wait_for_url(f"{ward.base_url}/roster", timeout=15_000)
    flash = await page.locator("#flash").inner_text()
    assert flash.startswith(f"{patient} was discharged at ")
    assert flash.endswith(f"(course completed). Devices unbound: {pump}; open alerts closed: 0.")
    await page.locator("#roster tr").first.wait_for(timeout=15_000)
    assert await page.locator(f"tr[data-patient='{patient}']").count() == 0
    await page.screenshot(path=str(ARTIFACTS / "dashboard-discharged.png"), full_page=True)

    rows = await fetch(
        ward.dsn,
        "SELECT p.discharged_at, p.discharge_reason, b.valid_to FROM patients p "
        "JOIN device_bindings b USING (patient_id) WHERE patient_id = $1",
        patient,
    )
    ((discharged_at, reason, unbound_at),) = [tuple(r) for r in rows]
    assert reason == "course completed" and discharged_at is not None
    assert unbound_at == discharged_at
    assert local_time(discharged_at, TEAM_ZONE) in flash

    # The child's page stays readable, says so, and offers no more changes.
    await page.goto(f"{ward.base_url}/patients/{patient}")
    banner = page.locator("#discharged")
    at, words = await shown_time(banner.locator("time"))
    assert at == discharged_at and words == local_time(discharged_at, TEAM_ZONE)
    assert "(course completed) by " in await banner.inner_text()
    assert await page.locator("form#discharge, form#swap").count() == 0


async def test_the_roster_shows_who_is_on_call_now_and_next(ward: Ward, page: Any) -> None:
    for person, name in (("ana", "Ana"), ("ben", "Ben")):
        answer = await ward.call(
            "PUT",
            f"/api/care-teams/{ward.team}/people/{person}-{ward.run}",
            {
                "name": name,
                "contact_methods": [{"channel": "email", "address": f"{person}@x.test"}],
            },
        )
        assert answer.status_code < 300, answer.text
    today = datetime.now(ZoneInfo(TEAM_ZONE)).date()
    answer = await ward.call(
        "PUT",
        f"/api/care-teams/{ward.team}/schedules/nights-{ward.run}",
        {
            "name": "Nights",
            "timezone": TEAM_ZONE,
            "start_date": (today - timedelta(days=2)).isoformat(),
            "handoff_time": "08:00",
            "shift_days": 1,
            "participants": [f"ana-{ward.run}", f"ben-{ward.run}"],
        },
    )
    assert answer.status_code < 300, answer.text
    expected = (await ward.call("GET", f"/api/care-teams/{ward.team}/on-call")).json()
    (shift,) = expected["schedules"]

    await page.goto(f"{ward.base_url}/roster")
    card = page.locator(f"#oncall .card[data-team='{ward.team}']")
    await card.locator(".shift").wait_for(timeout=15_000)
    text = await card.inner_text()
    assert shift["person_name"] in text and f"then {shift['next_person_name']}" in text
    at, words = await shown_time(card.locator("time"))
    assert at == datetime.fromisoformat(shift["until"]) and words == local_time(at, TEAM_ZONE)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-roster-on-call.png"), full_page=True)
