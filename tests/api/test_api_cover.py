"""Regional cover through the care-team API over real HTTP and PostgreSQL, on a clock the test
moves: an agreement under two sign-offs (one manager of each team), then team A's users see and
act on team B's monitored patients only during the agreed hours (before, during, after the
window, and after revocation), nothing else of team B, every read audited with the agreement."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
import uvicorn

from services.api.adapters.credentials import hash_password
from services.api.adapters.repository import ApiRepository
from services.api.app import server_options
from services.api.bootstrap import create_app
from services.api.domain.access import Role
from services.api.settings import ApiSettings
from services.ingest.adapters.registry_admin import (
    upsert_care_team,
    upsert_device,
    upsert_patient,
)
from services.notify.domain.escalation import page_until_acknowledged, snapshot_to_json
from tests.api.conftest import (
    PASSWORD,
    RecordingAlertActions,
    RecordingAudit,
    World,
    bearer,
    build_world,
    free_port,
    insert_alert,
    until_serving,
)

pytestmark = pytest.mark.stack

PARIS = ZoneInfo("Europe/Paris")
# A policy as notify freezes it onto an escalation.
FROZEN = json.dumps(snapshot_to_json(page_until_acknowledged("test", "oncall@test.test")))


class MovableClock:
    """The API's clock: the real time until the test sets one (tokens are issued at the real
    time, so they are valid whatever moment the test moves the API to)."""

    def __init__(self) -> None:
        self.at: datetime | None = None

    def __call__(self) -> datetime:
        return self.at or datetime.now(UTC)


@dataclass
class CoverWorld:
    world: World
    clock: MovableClock
    night: date  # a local date (Paris) two days ahead: its night is in the future
    discharged_b: str
    discharged_alert: str
    dsn: str

    def paris(self, day_offset: int, hour: int) -> datetime:
        day = self.night + timedelta(days=day_offset)
        return datetime(day.year, day.month, day.day, hour, tzinfo=PARIS)

    async def tokens(self, *labels: str) -> dict[str, dict[str, Any]]:
        self.clock.at = None
        return {label: bearer(await self.world.token(label)) for label in labels}


@pytest.fixture(scope="module")
async def cover_world(stack_env: dict[str, str]) -> AsyncIterator[CoverWorld]:
    port = free_port()
    clock = MovableClock()
    actions = RecordingAlertActions()
    audit = RecordingAudit()
    settings = ApiSettings(port=port, stream_poll_s=0.2)
    app = create_app(settings, clock=clock, alert_actions=actions, audit=audit)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            **server_options(settings),
        )
    )
    task = asyncio.create_task(server.serve())
    await until_serving(server, task)
    dsn = stack_env["VIGIL_PG_DSN"]
    try:
        world = await build_world(dsn, f"http://127.0.0.1:{port}", actions, audit)
        discharged = f"PB-gone-{world.run}"
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await upsert_patient(conn, discharged, world.team_b, 18.0)
                await upsert_device(conn, f"thermo-{discharged}", "thermometer")
                discharged_alert = await insert_alert(
                    conn,
                    discharged,
                    f"thermo-{discharged}",
                    datetime.now(UTC) - timedelta(hours=1),
                    38.5,
                )
                await conn.execute(
                    "UPDATE patients SET infusion_ended_at = now(), discharged_at = now(), "
                    "discharge_reason = 'done', discharged_by = 'x' WHERE patient_id = $1",
                    discharged,
                )
            repository = ApiRepository(pool)
            for label, role in (
                ("nurse_b", Role.CHARGE_NURSE),
                ("auditor_b", Role.AUDITOR),
                ("admin_b", Role.ADMIN),
            ):
                await repository.create_user(
                    f"{label}-{world.run}",
                    f"{label}-{world.run}",
                    label,
                    hash_password(PASSWORD),
                    role,
                    [world.team_b],
                )
                world.users[label] = f"{label}-{world.run}"
        finally:
            await pool.close()
        night = datetime.now(PARIS).date() + timedelta(days=2)
        yield CoverWorld(world, clock, night, discharged, discharged_alert, dsn)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


NIGHTS = {"timezone": "Europe/Paris", "days": [0, 1, 2, 3, 4, 5, 6], "starts": "20:00"}


async def _sees_b(client: httpx.AsyncClient, cw: CoverWorld, headers: dict[str, Any]) -> bool:
    """Whether the caller sees team B's patient, consistently on every patient route."""
    w = cw.world
    listing = (await client.get("/api/patients", params={"limit": 500}, headers=headers)).json()
    listed = w.patient_b in {p["patient_id"] for p in listing["items"]}
    answers = {
        (await client.get(f"/api/patients/{w.patient_b}{path}", headers=headers)).status_code
        for path in ("", "/readings", "/pump", "/temperature-hourly")
    }
    alert = await client.get(f"/api/alerts/{quote(w.alert_b, safe='')}", headers=headers)
    alerts = (await client.get("/api/alerts", params={"limit": 500}, headers=headers)).json()
    alert_listed = w.alert_b in {a["dedup_key"] for a in alerts["items"]}
    roster = (await client.get("/api/roster", headers=headers)).json()
    on_roster = w.patient_b in {row["patient_id"] for row in roster["patients"]}
    seen = {listed, answers == {200}, alert.status_code == 200, alert_listed, on_roster}
    assert len(seen) == 1, (listed, answers, alert.status_code, alert_listed, on_roster)
    if not listed:
        assert answers == {404} and alert.status_code == 404
    return listed


async def test_cover_needs_both_teams_and_scopes_access_to_the_window(
    cover_world: CoverWorld,
) -> None:
    cw = cover_world
    w = cw.world
    h = await cw.tokens("nurse_a", "nurse2_a", "nurse_b", "clinician_a", "clinician_b")
    terms = {
        **NIGHTS,
        "ends": "08:00",
        "covering_team_id": w.team_a,
        "covered_team_id": w.team_b,
        "reason": "night cover",
    }
    async with httpx.AsyncClient(base_url=w.base_url) as client:
        # A clinician may not propose; a team that is neither side's is not the caller's.
        assert (
            await client.post("/api/cover-agreements", json=terms, headers=h["clinician_a"])
        ).status_code == 403
        bad_zone = await client.post(
            "/api/cover-agreements", json={**terms, "timezone": "Nowhere/X"}, headers=h["nurse_a"]
        )
        assert bad_zone.status_code == 422
        proposed = await client.post("/api/cover-agreements", json=terms, headers=h["nurse_a"])
        assert proposed.status_code == 202, proposed.text
        body = proposed.json()
        assert body["status"] == "pending" and body["proposed_side"] == w.team_a
        agreement = body["agreement_id"]
        approve = f"/api/cover-agreements/{agreement}/versions/1/approve"

        cw.clock.at = cw.paris(0, 2)  # 02:00, inside the hours, but nothing signed off yet
        assert not await _sees_b(client, cw, h["clinician_a"])
        # Not the proposer, and not a manager of the same side: the other team signs off.
        assert (await client.post(approve, headers=h["nurse_a"])).status_code == 403
        assert (await client.post(approve, headers=h["nurse2_a"])).status_code == 403
        assert (await client.post(approve, headers=h["clinician_b"])).status_code == 403
        approved = await client.post(approve, headers=h["nurse_b"])
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "approved"
        assert approved.json()["decided_by"] == w.users["nurse_b"]
        assert (await client.post(approve, headers=h["nurse_b"])).status_code == 409

        # During the window: team A's clinician sees and acts on team B's patient...
        assert await _sees_b(client, cw, h["clinician_a"])
        ack = await client.post(
            f"/api/alerts/{quote(w.alert_b, safe='')}/ack", headers=h["clinician_a"]
        )
        assert ack.status_code == 200
        assert ("ack", w.alert_b, w.users["clinician_a"]) in w.actions.calls
        now = (await client.get("/api/cover", headers=h["clinician_a"])).json()
        assert [(c["covered_team_id"], c["agreement_id"], c["version"]) for c in now] == [
            (w.team_b, agreement, 1)
        ]
        assert datetime.fromisoformat(now[0]["until"]) == cw.paris(0, 8)
        # ...and nothing else of team B: its team, paging, protocol, a patient's caregivers
        # and overrides, and a discharged patient.
        for path in (
            f"/api/care-teams/{w.team_b}",
            f"/api/care-teams/{w.team_b}/protocol",
            f"/api/patients/{w.patient_b}/caregivers",
            f"/api/patients/{w.patient_b}/overrides",
            f"/api/patients/{cw.discharged_b}",
        ):
            answer = await client.get(path, headers=h["clinician_a"])
            assert answer.status_code == 404, (path, answer.status_code)
        # Nor a discharged patient of team B or their alerts in the lists.
        listed_b = await client.get(
            "/api/patients", params={"limit": 500}, headers=h["clinician_a"]
        )
        listed_ids = {p["patient_id"] for p in listed_b.json()["items"]}
        assert w.patient_b in listed_ids and cw.discharged_b not in listed_ids
        alerts_b = await client.get("/api/alerts", params={"limit": 500}, headers=h["clinician_a"])
        keys_b = {a["dedup_key"] for a in alerts_b.json()["items"]}
        assert w.alert_b in keys_b and cw.discharged_alert not in keys_b
        # Team B's own users still list their discharged patient and its alert.
        own_b = await client.get("/api/alerts", params={"limit": 500}, headers=h["clinician_b"])
        assert cw.discharged_alert in {a["dedup_key"] for a in own_b.json()["items"]}
        # Cover is one way: team B's clinician sees nothing of team A.
        own_a = await client.get(f"/api/patients/{w.patient_a}", headers=h["clinician_b"])
        assert own_a.status_code == 404
        sign_off = [e for e in w.audit.entries if e[2] == f"cover_agreement:{agreement}"]
        # Team A's own patient is read as before, with no cover named.
        w.audit.entries.clear()
        assert (
            await client.get(f"/api/patients/{w.patient_a}", headers=h["clinician_a"])
        ).status_code == 200
        assert (
            await client.get(f"/api/patients/{w.patient_b}/readings", headers=h["clinician_a"])
        ).status_code == 200
        own, covered = w.audit.entries[-2], w.audit.entries[-1]
        assert own[1] == "patient.read" and "cover" not in own[3]
        assert covered[:3] == (
            w.users["clinician_a"],
            "patient.readings",
            f"patient:{w.patient_b}",
        )
        assert covered[3]["cover"] == [
            {"covered_team": w.team_b, "agreement": agreement, "version": 1}
        ]

        # Before the window (19:59 the evening before) and after it (08:00): refused.
        cw.clock.at = cw.paris(-1, 19) + timedelta(minutes=59)
        assert not await _sees_b(client, cw, h["clinician_a"])
        cw.clock.at = cw.paris(0, 8)
        assert not await _sees_b(client, cw, h["clinician_a"])
        assert (
            await client.post(
                f"/api/alerts/{quote(w.alert_b, safe='')}/ack", headers=h["clinician_a"]
            )
        ).status_code == 404
        assert (await client.get("/api/cover", headers=h["clinician_a"])).json() == []
        # The next night (20:00) it is back.
        cw.clock.at = cw.paris(0, 20)
        assert await _sees_b(client, cw, h["clinician_a"])

        # A change is a new version, in force only when signed off; meanwhile the old one acts.
        changed = await client.put(
            f"/api/cover-agreements/{agreement}",
            json={**terms, "starts": "22:00"},
            headers=h["nurse_b"],
        )
        assert changed.status_code == 202 and changed.json()["version"] == 2
        cw.clock.at = cw.paris(0, 21)
        assert await _sees_b(client, cw, h["clinician_a"])
        second = await client.post(
            f"/api/cover-agreements/{agreement}/versions/2/approve", headers=h["nurse2_a"]
        )
        assert second.status_code == 200, second.text
        assert not await _sees_b(client, cw, h["clinician_a"])  # 21:00 is no longer covered
        cw.clock.at = cw.paris(0, 23)
        assert await _sees_b(client, cw, h["clinician_a"])

        # Revoked by one side at once, mid-window: access ends there.
        revoked = await client.post(
            f"/api/cover-agreements/{agreement}/revoke",
            json={"reason": "partner hired night staff"},
            headers=h["nurse_b"],
        )
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        assert not await _sees_b(client, cw, h["clinician_a"])
        again = await client.post(
            f"/api/cover-agreements/{agreement}/revoke", json={}, headers=h["nurse_a"]
        )
        assert again.status_code == 409
        listed = (await client.get("/api/cover-agreements", headers=h["clinician_b"])).json()
        mine = [a for a in listed if a["agreement_id"] == agreement]
        assert [v["version"] for v in mine[0]["versions"]] == [1, 2, 3]
        assert mine[0]["in_force"]["revoked"] is True
    signed = [(e[0], e[1], e[3]["version"]) for e in w.audit.entries if e[1].startswith("cover.")]
    assert (w.users["nurse2_a"], "cover.approved", 2) in signed
    assert (w.users["nurse_b"], "cover.revoked", 3) in signed
    assert sign_off[0][:2] == (w.users["nurse_a"], "cover.proposed")
    assert sign_off[1][:2] == (w.users["nurse_b"], "cover.approved")
    assert sign_off[1][3]["proposed_by"] == w.users["nurse_a"]


async def test_the_covered_team_reads_the_morning_summary(cover_world: CoverWorld) -> None:
    """The night's episode of team B's patient, paged to team A and acknowledged there, is in
    team B's morning summary; team A may not read team B's summary."""
    from services.rules.domain.identity import alert_id_for

    cw = cover_world
    w = cw.world
    h = await cw.tokens("nurse_a", "nurse_b", "clinician_a", "clinician_b")
    terms = {
        **NIGHTS,
        "ends": "08:00",
        "covering_team_id": w.team_a,
        "covered_team_id": w.team_b,
    }
    night_start = cw.paris(3, 20)
    two = cw.paris(4, 2)
    async with httpx.AsyncClient(base_url=w.base_url) as client:
        proposed = await client.post("/api/cover-agreements", json=terms, headers=h["nurse_b"])
        agreement = proposed.json()["agreement_id"]
        approved = await client.post(
            f"/api/cover-agreements/{agreement}/versions/1/approve", headers=h["nurse_a"]
        )
        assert approved.status_code == 200, approved.text
        pool = await asyncpg.create_pool(cw.dsn, min_size=1, max_size=1)
        try:
            escalation = await pool.fetchval(
                """
                INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                    care_team_id, snapshot, status, acknowledged_by, acknowledged_at, opened_at)
                VALUES (gen_random_uuid(), $1, $2, $3, $4, $8::jsonb, 'acknowledged', $5, $6, $7)
                RETURNING escalation_id
                """,
                w.alert_b,
                alert_id_for(w.alert_b, "start"),
                w.patient_b,
                w.team_a,
                w.users["clinician_a"],
                two + timedelta(minutes=5),
                two,
                FROZEN,
            )
            await pool.executemany(
                "INSERT INTO escalation_events (escalation_id, at, kind) VALUES ($1, $2, $3)",
                [
                    (escalation, two, "paged"),
                    (escalation, two + timedelta(minutes=5), "acknowledged"),
                ],
            )
        finally:
            await pool.close()
        path = f"/api/care-teams/{w.team_b}/cover-summary"
        morning = cw.paris(4, 9).isoformat()
        summary = await client.get(path, params={"at": morning}, headers=h["clinician_b"])
        assert summary.status_code == 200, summary.text
        body = summary.json()
        assert datetime.fromisoformat(body["window"]["starts"]) == night_start
        assert datetime.fromisoformat(body["window"]["ends"]) == cw.paris(4, 8)
        assert body["window"]["covering_team_id"] == w.team_a
        (patient,) = body["patients"]
        assert patient["patient_id"] == w.patient_b and patient["handed_back"] == 1
        (episode,) = patient["alerts"]
        assert episode["dedup_key"] == w.alert_b and episode["paged_team_id"] == w.team_a
        assert episode["acknowledged_by"] == w.users["clinician_a"]
        assert episode["open_at_handback"] is True  # acknowledged, never resolved
        assert [d["kind"] for d in episode["done"]] == ["paged", "acknowledged"]
        # The night before had nothing.
        earlier = await client.get(
            path, params={"at": cw.paris(3, 9).isoformat()}, headers=h["clinician_b"]
        )
        assert earlier.json()["patients"] == []
        refused = await client.get(path, params={"at": morning}, headers=h["clinician_a"])
        assert refused.status_code == 404


async def test_a_revocation_mid_window_ends_the_summary_at_the_revocation_at_once(
    cover_world: CoverWorld,
) -> None:
    """A team D covers a team C at night (both new: no other test's cover changes). A 02:00
    fever of C's patient is paged to team D and acknowledged there; at 03:00 C's charge nurse
    revokes the agreement. From that moment
    C's summary is the window from 20:00 to 03:00, naming the revocation (when, by whom of which
    team, why), with the 02:00 episode and not the 04:00 alert (the window's own end would have
    held it); a second before the revocation, and before it was recorded, the night before is
    the latest (the controls)."""
    from services.notify.public import night_alerts
    from services.rules.domain.identity import alert_id_for

    cw = cover_world
    w = cw.world
    team_c, team_d, patient_c = f"team-c-{w.run}", f"team-d-{w.run}", f"PC-{w.run}"
    device = f"thermo-{patient_c}"
    night_start, two, cut_at, four = cw.paris(6, 20), cw.paris(7, 2), cw.paris(7, 3), cw.paris(7, 4)
    pool = await asyncpg.create_pool(cw.dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            for team in (team_c, team_d):
                await upsert_care_team(conn, team, f"Oncology {team}", f"oncall@{team}.test")
            await upsert_patient(conn, patient_c, team_c, 19.5)
            await upsert_device(conn, device, "thermometer")
            alert_two = await insert_alert(conn, patient_c, device, two, 38.8)
            alert_four = await insert_alert(conn, patient_c, device, four, 39.1)
        repository = ApiRepository(pool)
        for label, role, team in (
            ("nurse_c", Role.CHARGE_NURSE, team_c),
            ("clinician_c", Role.CLINICIAN, team_c),
            ("nurse_d", Role.CHARGE_NURSE, team_d),
        ):
            username = f"{label}-{w.run}"
            await repository.create_user(
                username, username, label, hash_password(PASSWORD), role, [team]
            )
            w.users[label] = username
        h = await cw.tokens("nurse_d", "nurse_c", "clinician_c")
        terms = {**NIGHTS, "ends": "08:00", "covering_team_id": team_d, "covered_team_id": team_c}
        async with httpx.AsyncClient(base_url=w.base_url) as client:
            proposed = await client.post("/api/cover-agreements", json=terms, headers=h["nurse_c"])
            assert proposed.status_code == 202, proposed.text
            agreement = proposed.json()["agreement_id"]
            approved = await client.post(
                f"/api/cover-agreements/{agreement}/versions/1/approve", headers=h["nurse_d"]
            )
            assert approved.status_code == 200, approved.text
            # The 02:00 episode, paged to team D under cover and acknowledged there, handed
            # back at the revocation; the 04:00 alert, after it, paged C's own on-call.
            rows = [
                (alert_two, two, team_d, w.users["nurse_d"]),
                (alert_four, four, team_c, w.users["nurse_c"]),
            ]
            escalations = []
            for dedup_key, opened, filed, acknowledger in rows:
                escalations.append(
                    await pool.fetchval(
                        """
                        INSERT INTO escalations (escalation_id, dedup_key, alert_id, patient_id,
                            care_team_id, snapshot, status, acknowledged_by, acknowledged_at,
                            opened_at)
                        VALUES (gen_random_uuid(), $1, $2, $3, $4, $8::jsonb, 'acknowledged',
                                $5, $6, $7)
                        RETURNING escalation_id
                        """,
                        dedup_key,
                        alert_id_for(dedup_key, "start"),
                        patient_c,
                        filed,
                        acknowledger,
                        opened + timedelta(minutes=10),
                        opened,
                        FROZEN,
                    )
                )
            await pool.executemany(
                "INSERT INTO escalation_events (escalation_id, at, kind, detail) "
                "VALUES ($1, $2, $3, $4::jsonb)",
                [
                    (
                        escalations[0],
                        two,
                        "paged_under_cover",
                        json.dumps({"care_team_id": team_d}),
                    ),
                    (escalations[0], two + timedelta(minutes=10), "acknowledged", "{}"),
                    (escalations[0], cut_at, "handed_back", json.dumps({"repaged": False})),
                    (escalations[1], four, "paged", "{}"),
                ],
            )
            # Control: the window's own end would have held both alerts.
            whole = await night_alerts(pool, team_c, night_start, cw.paris(7, 8))
            assert {a.dedup_key for a in whole} == {alert_two, alert_four}

            path = f"/api/care-teams/{team_c}/cover-summary"

            async def summary(at: datetime | None = None) -> dict[str, Any]:
                params = {} if at is None else {"at": at.isoformat()}
                answer = await client.get(path, params=params, headers=h["clinician_c"])
                assert answer.status_code == 200, answer.text
                body: dict[str, Any] = answer.json()
                return body

            # Before the revocation is recorded, 03:00 is mid-window: the night before is the
            # latest ended, quiet, and nothing was revoked.
            cw.clock.at = cut_at
            before = await summary()
            assert before["window"]["agreement_id"] == agreement
            assert datetime.fromisoformat(before["window"]["starts"]) == cw.paris(5, 20)
            assert datetime.fromisoformat(before["window"]["ends"]) == cw.paris(6, 8)
            assert before["window"]["revocation"] is None and before["patients"] == []

            revoked = await client.post(
                f"/api/cover-agreements/{agreement}/revoke",
                json={"reason": "night nurse found"},
                headers=h["nurse_c"],
            )
            assert revoked.status_code == 200, revoked.text
            # At once (the API's clock still at the revocation), and after the window's own
            # end: the window from 20:00 to the revocation, which it names.
            for at in (None, cw.paris(7, 9)):
                body = await summary(at)
                window = body["window"]
                assert window["agreement_id"] == agreement and window["version"] == 1
                assert window["covering_team_id"] == team_d
                assert datetime.fromisoformat(window["starts"]) == night_start
                assert datetime.fromisoformat(window["ends"]) == cut_at
                revocation = window["revocation"]
                assert datetime.fromisoformat(revocation.pop("at")) == cut_at
                assert revocation == {
                    "by": w.users["nurse_c"],
                    "care_team_id": team_c,
                    "care_team_name": f"Oncology {team_c}",
                    "reason": "night nurse found",
                }
                (patient,) = body["patients"]
                assert patient["patient_id"] == patient_c and patient["handed_back"] == 1
                (episode,) = patient["alerts"]  # not the 04:00 alert, after the revocation
                assert episode["dedup_key"] == alert_two and episode["paged_team_id"] == team_d
                assert episode["acknowledged_by"] == w.users["nurse_d"]
                assert episode["open_at_handback"] is True
                assert [d["kind"] for d in episode["done"]] == [
                    "paged_under_cover",
                    "acknowledged",
                ]
            # A second before the revocation it was not in force yet: the night before.
            earlier = await summary(cut_at - timedelta(seconds=1))
            assert datetime.fromisoformat(earlier["window"]["ends"]) == cw.paris(6, 8)
            assert earlier["window"]["revocation"] is None
    finally:
        cw.clock.at = None
        await pool.close()


async def test_an_admin_puts_a_team_in_a_centre_which_the_covering_team_then_sees(
    cover_world: CoverWorld,
) -> None:
    """A centre is created and team B put in it by team B's admin (not a charge nurse, not for
    another team, not in an unknown centre); during the night the covering clinician's cover
    names it. Runs after the morning-summary test, whose agreement is in force."""
    cw = cover_world
    w = cw.world
    h = await cw.tokens("admin_b", "nurse_b", "clinician_a")
    centre = f"org-{w.run}"
    async with httpx.AsyncClient(base_url=w.base_url) as client:
        put = await client.put(
            f"/api/organisations/{centre}", json={"name": "Valley general"}, headers=h["nurse_b"]
        )
        assert put.status_code == 403
        put = await client.put(
            f"/api/organisations/{centre}", json={"name": "Valley general"}, headers=h["admin_b"]
        )
        assert put.status_code == 200, put.text
        path = f"/api/care-teams/{w.team_b}/organisation"
        unknown = await client.put(path, json={"organisation_id": "nowhere"}, headers=h["admin_b"])
        assert unknown.status_code == 422
        other = await client.put(
            f"/api/care-teams/{w.team_a}/organisation",
            json={"organisation_id": centre},
            headers=h["admin_b"],
        )
        assert other.status_code == 404
        placed = await client.put(path, json={"organisation_id": centre}, headers=h["admin_b"])
        assert placed.status_code == 200, placed.text
        cw.clock.at = cw.paris(5, 2)
        now = (await client.get("/api/cover", headers=h["clinician_a"])).json()
        assert [(c["covered_team_id"], c["covered_centre"]) for c in now] == [
            (w.team_b, "Valley general")
        ]
    actions = {e[1] for e in w.audit.entries if e[0] == w.users["admin_b"]}
    assert {"organisation.saved", "care_team.organisation_changed"} <= actions


async def test_each_caller_lists_the_centres_of_their_teams_and_of_those_they_cover_now(
    cover_world: CoverWorld,
) -> None:
    """GET /api/organisations: the admin every centre; anyone else the centres of their own
    teams, and of the teams they cover only while they cover them; cover is one way. Runs after
    the admin's test, which put team B in its centre, with the agreement (A covers B at night)
    in force."""
    cw = cover_world
    w = cw.world
    hill, stray, valley = f"org-hill-{w.run}", f"org-stray-{w.run}", f"org-{w.run}"
    h = await cw.tokens("admin_b", "nurse_b", "auditor_b", "clinician_a", "nurse_a")
    async with httpx.AsyncClient(base_url=w.base_url) as client:
        for centre, name in ((hill, "Hill hospital"), (stray, "Elsewhere")):
            put = await client.put(
                f"/api/organisations/{centre}", json={"name": name}, headers=h["admin_b"]
            )
            assert put.status_code == 200, put.text
        pool = await asyncpg.connect(cw.dsn)
        try:  # team A's own admin would do this; the world has none
            await pool.execute(
                "UPDATE care_teams SET organisation_id = $2 WHERE care_team_id = $1", w.team_a, hill
            )
        finally:
            await pool.close()

        async def seen(label: str, at: datetime) -> list[tuple[str, str]]:
            cw.clock.at = at
            answer = await client.get("/api/organisations", headers=h[label])
            assert answer.status_code == 200, answer.text
            return [
                (o["organisation_id"], o["name"])
                for o in answer.json()
                if o["organisation_id"] in (hill, stray, valley)
            ]

        day, night = cw.paris(5, 12), cw.paris(5, 2)
        # The admin: every centre, by name, one in which no team is among them.
        assert await seen("admin_b", day) == [
            (stray, "Elsewhere"),
            (hill, "Hill hospital"),
            (valley, "Valley general"),
        ]
        # Team B's users: their own team's centre, day and night; never the covering team's.
        for label in ("nurse_b", "auditor_b"):
            assert await seen(label, day) == [(valley, "Valley general")]
            assert await seen(label, night) == [(valley, "Valley general")]
        # Team A's users: their own; team B's only during the window.
        for label in ("clinician_a", "nurse_a"):
            assert await seen(label, day) == [(hill, "Hill hospital")]
            assert await seen(label, night) == [
                (hill, "Hill hospital"),
                (valley, "Valley general"),
            ]
        unsigned = await client.get("/api/organisations")
        assert unsigned.status_code == 401
    cw.clock.at = None


def test_the_centres_list_is_in_the_openapi_document() -> None:
    schema = create_app(ApiSettings()).openapi()
    operation = schema["paths"]["/api/organisations"]["get"]
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["type"] == "array"
    assert answer["items"]["$ref"].endswith("/OrganisationView")
    assert {"401", "403"} <= set(operation["responses"])
