"""In a real browser: regional cover on the roster. A covering clinician sees the partner team's
patient among their rows, with the partner's centre and team and its 24-hour number, and a card
saying until when they cover; the partner's nurse sees what happened during the last night of
cover. The partner's zone is a fixed-offset one in which the test's moment is about 02:00, so
the agreement (00:00-06:00) is in force without moving a clock. Debian's Chromium driven by
Playwright; screenshots in ``test-artifacts/``."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import quote
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import (
    bind_device,
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.rules.domain.identity import alert_id_for
from tests.api.conftest import insert_alert
from tests.api.test_api_cover import FROZEN
from tests.e2e.conftest import free_port
from tests.e2e.test_regional_cover import zone_at
from tests.support.dashboard import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, add_user, log_in, served

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
async def api_base_url(stack_env: dict[str, str]) -> AsyncIterator[str]:
    settings = ApiSettings(port=free_port(), stream_poll_s=0.3)
    async with served(create_app(settings), settings) as base_url:
        yield base_url


async def test_the_roster_shows_whose_patients_are_covered_and_the_night_that_was(
    stack_env: dict[str, str], api_base_url: str
) -> None:
    from playwright.async_api import async_playwright

    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    if now.minute >= 55:
        now += timedelta(minutes=10)
    zone = zone_at(2, now)
    regional, partner, patient = f"regional-{run}", f"partner-{run}", f"P-cover-{run}"
    last_night = now.astimezone(ZoneInfo(zone)).replace(
        hour=0, minute=0, second=0, microsecond=0
    ) - timedelta(days=1)
    agreement = uuid.uuid4()
    conn = await asyncpg.connect(dsn)
    try:
        for team, centre, tz in (
            (regional, "Regional children's hospital", "UTC"),
            (partner, "Valley general", zone),
        ):
            await conn.execute(
                "INSERT INTO organisations (organisation_id, name) VALUES ($1, $2)",
                f"org-{team}",
                f"{centre} {run}",
            )
            await upsert_care_team(conn, team, f"Oncology {team}", f"oncall@{team}.test")
            await conn.execute(
                "UPDATE care_teams SET timezone = $2, organisation_id = $3 WHERE care_team_id = $1",
                team,
                tz,
                f"org-{team}",
            )
        await conn.execute(
            "INSERT INTO caregiver_team_settings (care_team_id, unit_phone, updated_by, "
            "updated_at) VALUES ($1, '+33 4 00 00 00 00', 'admin', now())",
            partner,
        )
        await upsert_patient(conn, patient, partner, 17.0)
        await upsert_device(conn, f"thermo-{patient}", "thermometer")
        await bind_device(conn, f"thermo-{patient}", patient, now - timedelta(days=3))
        await conn.execute(
            """
            INSERT INTO cover_agreements (agreement_id, version, covering_team_id,
                covered_team_id, timezone, days, starts, ends, proposed_by, proposed_side,
                proposed_at, decision, decided_by, decided_at)
            VALUES ($1, 1, $2, $3, $4, '{0,1,2,3,4,5,6}', '00:00', '06:00', 'nurse-r', $2,
                    $5, 'approved', 'nurse-p', $5)
            """,
            agreement,
            regional,
            partner,
            zone,
            now - timedelta(days=3),
        )
        # Last night's fever, paged to the region and acknowledged there, never resolved.
        opened = last_night + timedelta(hours=2)
        key = await insert_alert(conn, patient, f"thermo-{patient}", opened, 38.8)
        escalation_id = uuid.uuid4()
        await conn.execute(
            """
            INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                care_team_id, snapshot, status, acknowledged_by, acknowledged_at, opened_at)
            VALUES ($1, $2, $3, $4, $5, $9::jsonb, 'acknowledged', $6, $7, $8)
            """,
            escalation_id,
            key,
            alert_id_for(key, "start"),
            patient,
            regional,
            f"clinician-r-{run}",
            opened + timedelta(minutes=6),
            opened,
            FROZEN,
        )
        # Its timeline as notify writes it: paged under cover, handed back in the morning.
        window_ends = last_night + timedelta(hours=6)
        await conn.executemany(
            "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
            "VALUES ($1, $2, $3, $4::jsonb)",
            [
                (
                    escalation_id,
                    opened,
                    "paged_under_cover",
                    json.dumps(
                        {
                            "care_team_id": regional,
                            "covered_team_id": partner,
                            "agreement_id": str(agreement),
                            "agreement_version": 1,
                            "window_ends": window_ends.isoformat(),
                        }
                    ),
                ),
                (
                    escalation_id,
                    window_ends,
                    "handed_back",
                    json.dumps(
                        {
                            "from_team": regional,
                            "to_team": partner,
                            "repaged": False,
                            "acknowledged_by": f"clinician-r-{run}",
                        }
                    ),
                ),
            ],
        )
    finally:
        await conn.close()
    await add_user(dsn, f"cr-{run}", f"clinician-r-{run}", "Regional", Role.CLINICIAN, [regional])
    await add_user(dsn, f"np-{run}", f"nurse-p-{run}", "Partner", Role.CHARGE_NURSE, [partner])
    await add_user(dsn, f"nr-{run}", f"nurse-r-{run}", "Regional", Role.CHARGE_NURSE, [regional])

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            covering = await browser.new_page(viewport={"width": 1200, "height": 800})
            await log_in(covering, api_base_url, f"clinician-r-{run}")
            await covering.goto(f"{api_base_url}/roster")
            row = covering.locator(f"tr[data-patient='{patient}']")
            await row.wait_for(timeout=15_000)
            team_cell = covering.locator(f"tr[data-patient='{patient}'] .team")
            await covering.wait_for_selector(
                f"tr[data-patient='{patient}'] .badge.covering", timeout=15_000
            )
            text = await team_cell.inner_text()
            assert f"Oncology {partner}" in text and f"Valley general {run}" in text, text
            assert "+33 4 00 00 00 00" in text
            card = covering.locator(f".cover-now[data-covered-team='{partner}']")
            assert f"Valley general {run}" in await card.inner_text()
            until = await card.locator("time").get_attribute("datetime")
            assert until is not None
            assert datetime.fromisoformat(until) == last_night + timedelta(days=1, hours=6)
            await covering.screenshot(path=str(ARTIFACTS / "roster-covering.png"), full_page=True)
            # The row's links open the covered patient's page and alert's page; the covering
            # team's charge nurse is not offered the discharge, which is not theirs.
            opened_alert = await covering.goto(f"{api_base_url}/alerts/{quote(key, safe='')}")
            assert opened_alert is not None and opened_alert.status == 200
            # The timeline words regional cover's entries: whom, for whom, under which version
            # and until when (in the covered team's zone); and the hand-back.
            under = await covering.locator("tr[data-kind='paged_under_cover']").inner_text()
            assert (
                f"Paged Oncology {regional} under cover for Oncology {partner} (agreement v1) "
                f"until {window_ends.astimezone(ZoneInfo(zone)):%d} " in under
            ), under
            assert f"06:00 ({zone})" in under, under
            back = await covering.locator("tr[data-kind='handed_back']").inner_text()
            assert (
                f"Handed back to Oncology {partner}: acknowledged overnight, stays with "
                f"clinician-r-{run} (Oncology {regional})" in back
            ), back
            await covering.screenshot(path=str(ARTIFACTS / "alert-covered.png"), full_page=True)
            nurse = await browser.new_page(viewport={"width": 1200, "height": 800})
            await log_in(nurse, api_base_url, f"nurse-r-{run}")
            opened_page = await nurse.goto(f"{api_base_url}/patients/{patient}")
            assert opened_page is not None and opened_page.status == 200
            assert patient in await nurse.locator("h1").inner_text()
            assert await nurse.locator("#discharge").count() == 0

            home = await browser.new_page(viewport={"width": 1200, "height": 800})
            await log_in(home, api_base_url, f"nurse-p-{run}")
            await home.goto(f"{api_base_url}/roster")
            # The home nurse's own row names the team and its centre, with no covering badge.
            own = home.locator(f"tr[data-patient='{patient}'] .team")
            await own.wait_for(timeout=15_000)
            own_text = await own.inner_text()
            assert f"Oncology {partner} · Valley general {run}" in own_text, own_text
            assert await home.locator(f"tr[data-patient='{patient}'] .badge.covering").count() == 0
            summary = home.locator(f".overnight[data-team='{partner}']")
            await summary.wait_for(timeout=15_000)
            told = await summary.inner_text()
            assert f"Regional children's hospital {run}" in told, told
            assert patient in told and f"acknowledged by clinician-r-{run}" in told
            assert "still open at hand-back" in told
            assert "paged under cover" in told and "paged_under_cover" not in told, told
            assert await home.locator(".cover-now").count() == 0
            await home.screenshot(path=str(ARTIFACTS / "roster-overnight.png"), full_page=True)
        finally:
            await browser.close()


async def test_the_overnight_card_of_a_window_cut_short_ends_at_the_revocation(
    stack_env: dict[str, str], api_base_url: str
) -> None:
    """Tonight's cover (00:00-06:00 in the partner's zone, where it is now about 02:00) was
    revoked twenty minutes ago, after a fever paged to the region: the partner's nurse's card
    shows the window from 00:00 to the revocation, marked revoked, who revoked it, of which
    team and why, and the episode, at once (not after 06:00)."""
    from playwright.async_api import async_playwright

    dsn = stack_env["VIGIL_PG_DSN"]
    run = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    if now.minute >= 55:
        now += timedelta(minutes=10)
    zone = zone_at(2, now)
    regional, partner, patient = f"regional-{run}", f"partner-{run}", f"P-cut-{run}"
    tonight = now.astimezone(ZoneInfo(zone)).replace(hour=0, minute=0, second=0, microsecond=0)
    revoked_at = now - timedelta(minutes=20)
    opened = revoked_at - timedelta(minutes=30)
    agreement = uuid.uuid4()
    conn = await asyncpg.connect(dsn)
    try:
        for team, tz in ((regional, "UTC"), (partner, zone)):
            await upsert_care_team(conn, team, f"Oncology {team}", f"oncall@{team}.test")
            await conn.execute(
                "UPDATE care_teams SET timezone = $2 WHERE care_team_id = $1", team, tz
            )
        await upsert_patient(conn, patient, partner, 17.0)
        await upsert_device(conn, f"thermo-{patient}", "thermometer")
        await bind_device(conn, f"thermo-{patient}", patient, now - timedelta(days=3))
        # Version 1 signed off three days ago; the revocation (version 2) twenty minutes ago.
        for version, revoked, reason, decided_by, decided_at in (
            (1, False, None, f"nurse-r-{run}", now - timedelta(days=3)),
            (2, True, "Partner staffed tonight", f"nurse-p-{run}", revoked_at),
        ):
            await conn.execute(
                """
                INSERT INTO cover_agreements (agreement_id, version, covering_team_id,
                    covered_team_id, timezone, days, starts, ends, revoked, reason,
                    proposed_by, proposed_side, proposed_at, decision, decided_by, decided_at)
                VALUES ($1, $2, $3, $4, $5, '{0,1,2,3,4,5,6}', '00:00', '06:00', $6, $7,
                        $8, $4, $9, 'approved', $8, $9)
                """,
                agreement,
                version,
                regional,
                partner,
                zone,
                revoked,
                reason,
                decided_by,
                decided_at,
            )
        key = await insert_alert(conn, patient, f"thermo-{patient}", opened, 38.9)
        escalation_id = uuid.uuid4()
        await conn.execute(
            """
            INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                care_team_id, snapshot, status, opened_at)
            VALUES ($1, $2, $3, $4, $5, $7::jsonb, 'open', $6)
            """,
            escalation_id,
            key,
            alert_id_for(key, "start"),
            patient,
            partner,
            opened,
            FROZEN,
        )
        await conn.executemany(
            "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
            "VALUES ($1, $2, $3, $4::jsonb)",
            [
                (
                    escalation_id,
                    opened,
                    "paged_under_cover",
                    json.dumps({"care_team_id": regional, "covered_team_id": partner}),
                ),
                (
                    escalation_id,
                    revoked_at,
                    "handed_back",
                    json.dumps({"from_team": regional, "to_team": partner, "repaged": True}),
                ),
            ],
        )
    finally:
        await conn.close()
    await add_user(dsn, f"np-{run}", f"nurse-p-{run}", "Partner", Role.CHARGE_NURSE, [partner])

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            home = await browser.new_page(viewport={"width": 1200, "height": 800})
            await log_in(home, api_base_url, f"nurse-p-{run}")
            await home.goto(f"{api_base_url}/roster")
            card = home.locator(f".overnight[data-team='{partner}']")
            await card.wait_for(timeout=15_000)
            told = await card.inner_text()
            assert "(revoked)" in told, told
            line = await card.locator(".revoked").inner_text()
            assert f"by nurse-p-{run} of Oncology {partner}, cutting the window short" in line
            assert line.endswith(": Partner staffed tonight."), line
            window = card.locator(".muted time")
            assert datetime.fromisoformat(str(await window.nth(0).get_attribute("datetime"))) == (
                tonight
            )
            assert datetime.fromisoformat(str(await window.nth(1).get_attribute("datetime"))) == (
                revoked_at
            )
            assert patient in told and "still open at hand-back" in told, told
            assert "paged under cover" in told, told
            await home.screenshot(
                path=str(ARTIFACTS / "roster-overnight-revoked.png"), full_page=True
            )
        finally:
            await browser.close()
