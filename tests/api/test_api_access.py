"""The care-team API's authentication and object-level authorization, over real HTTP."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import PASSWORD, World, bearer

pytestmark = pytest.mark.stack


def api_paths(world: World) -> list[tuple[str, str]]:
    """Every operation in the OpenAPI schema except login, with team A's ids in the path."""
    schema = create_app(ApiSettings()).openapi()
    fill = {
        "patient_id": world.patient_a,
        "dedup_key": quote(world.alert_a, safe=""),
        "care_team_id": world.team_a,
        "device_id": f"thermo-{world.patient_a}",
        "proposal_id": "00000000-0000-4000-8000-000000000000",
        "person_id": f"nobody-{world.run}",
        "schedule_id": f"nothing-{world.run}",
        "contact_id": "00000000-0000-4000-8000-000000000001",
        "agreement_id": "00000000-0000-4000-8000-000000000002",
        "organisation_id": f"org-{world.run}",
        "version": "1",
        "alarm": "occlusion_downstream",
        "language": "en",
        "username": f"nobody-{world.run}",
    }
    return [
        (method.upper(), path.format(**fill))
        for path, operations in schema["paths"].items()
        if path not in ("/auth/token", "/auth/logout")
        for method in operations
    ]


async def test_every_endpoint_refuses_a_request_without_a_token(api_world: World) -> None:
    """No /api endpoint answers anything but 401 to an anonymous caller."""
    paths = api_paths(api_world)
    assert len(paths) >= 9  # the list really enumerates the API, not nothing
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        for method, path in paths:
            response = await client.request(method, path)
            assert response.status_code == 401, (method, path, response.status_code)


async def test_a_forged_token_is_refused(api_world: World) -> None:
    """A token signed with another secret is no token."""
    from datetime import UTC, datetime, timedelta

    from services.api.adapters.credentials import issue_token
    from services.api.domain.access import Principal, Role

    forged = issue_token(
        Principal(f"clinician_a-{api_world.run}", "x", Role.ADMIN, frozenset()),
        "some-other-secret-of-at-least-32-bytes",
        datetime.now(UTC),
        timedelta(minutes=5),
    )
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        r = await client.get("/api/patients", headers=bearer(forged))
    assert r.status_code == 401


async def test_clinician_sees_only_their_teams_patients(api_world: World) -> None:
    """A clinician of team A lists A's patient and not B's; B's patient answers 404 everywhere."""
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        listing = (await client.get("/api/patients", params={"limit": 500})).json()
        ids = {p["patient_id"] for p in listing["items"]}
        assert api_world.patient_a in ids and api_world.patient_b not in ids
        for path in ("", "/readings", "/pump"):
            own = await client.get(f"/api/patients/{api_world.patient_a}{path}")
            other = await client.get(f"/api/patients/{api_world.patient_b}{path}")
            assert own.status_code == 200, path
            assert other.status_code == 404, path
        other_alert = await client.get(f"/api/alerts/{quote(api_world.alert_b, safe='')}")
        assert other_alert.status_code == 404
        ack_other = await client.post(f"/api/alerts/{quote(api_world.alert_b, safe='')}/ack")
        assert ack_other.status_code == 404
        alerts = (await client.get("/api/alerts", params={"limit": 500})).json()["items"]
        keys = {a["dedup_key"] for a in alerts}
        assert api_world.alert_a in keys and api_world.alert_b not in keys


async def test_read_only_role_cannot_acknowledge(api_world: World) -> None:
    """An auditor reads team A's alert but acknowledging it is 403, and nothing is acknowledged."""
    token = await api_world.token("auditor_a")
    path = f"/api/alerts/{quote(api_world.alert_a, safe='')}"
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        assert (await client.get(path)).status_code == 200
        r = await client.post(f"{path}/ack")
    assert r.status_code == 403
    assert not [c for c in api_world.actions.calls if c[1] == api_world.alert_a]


async def test_clinician_acknowledges_but_may_not_resolve(api_world: World) -> None:
    """A clinician's acknowledgement reaches notify; resolving is the charge nurse's."""
    token = await api_world.token("clinician_a")
    path = f"/api/alerts/{quote(api_world.alert_a, safe='')}"
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        assert (await client.post(f"{path}/ack")).status_code == 200
        assert (await client.post(f"{path}/resolve")).status_code == 403
    assert ("ack", api_world.alert_a, api_world.users["clinician_a"]) in api_world.actions.calls
    nurse = await api_world.token("nurse_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(nurse)) as client:
        assert (await client.post(f"{path}/resolve")).status_code == 200


async def test_cookie_writes_need_the_csrf_header(api_world: World) -> None:
    """With the dashboard cookie, a POST without X-Requested-By is refused (CSRF defence)."""
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        login = await client.post(
            "/auth/token", data={"username": api_world.users["clinician_a"], "password": PASSWORD}
        )
        assert login.status_code == 200 and "vigil_session" in client.cookies
        path = f"/api/alerts/{quote(api_world.alert_a, safe='')}/ack"
        assert (await client.post(path)).status_code == 403
        ok = await client.post(path, headers={"X-Requested-By": "vigil-dashboard"})
        assert ok.status_code == 200


async def test_login_is_throttled_after_repeated_failures(api_world: World) -> None:
    """Five wrong passwords for one user from one place, then even the right one waits there:
    429 with Retry-After."""
    username = api_world.users["lockout_b"]
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        for _ in range(5):
            r = await client.post("/auth/token", data={"username": username, "password": "nope"})
            assert r.status_code == 401
        r = await client.post("/auth/token", data={"username": username, "password": PASSWORD})
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1


async def test_patient_reads_are_audited(api_world: World) -> None:
    """Reading a patient's readings writes who read which patient to the audit trail."""
    token = await api_world.token("nurse_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        assert (
            await client.get(f"/api/patients/{api_world.patient_a}/readings")
        ).status_code == 200
    assert (f"nurse_a-{api_world.run}", "patient.readings", f"patient:{api_world.patient_a}") in [
        entry[:3] for entry in api_world.audit.entries
    ]


async def test_lists_are_paginated(api_world: World) -> None:
    """limit and offset page through alerts; total counts them all."""
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        first = (await client.get("/api/alerts", params={"limit": 1})).json()
        assert len(first["items"]) == 1 and first["total"] >= 1 and first["limit"] == 1
        bad = await client.get("/api/alerts", params={"limit": 0})
    assert bad.status_code == 422


async def test_threshold_change_needs_two_sign_offs_and_is_versioned_and_scoped(
    api_world: World,
) -> None:
    """A charge nurse proposes a change to team A's fever threshold; it takes effect only when a
    second charge nurse approves it: a new version signed off by the approver, audited with old
    and new values and the proposer. The proposer cannot approve their own; a clinician may
    not propose; team B's protocol is not team A's business; an incoherent or unknown threshold
    is refused before anything is written."""
    team = api_world.team_a
    nurse = bearer(await api_world.token("nurse_a"))
    nurse2 = bearer(await api_world.token("nurse2_a"))
    clinician = bearer(await api_world.token("clinician_a"))
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        path = f"/api/care-teams/{team}/protocol"

        async def change(overrides: dict[str, float], by: dict[str, str]) -> dict[str, object]:
            proposed = await client.put(path, json={"overrides": overrides}, headers=nurse)
            assert proposed.status_code == 202, proposed.text
            assert proposed.json()["status"] == "pending"
            proposal_id = proposed.json()["proposal_id"]
            approved = await client.post(
                f"/api/threshold-proposals/{proposal_id}/approve", headers=by
            )
            assert approved.status_code == 200, approved.text
            return dict(approved.json())

        # Proposed, not yet in effect; the proposer cannot approve it.
        proposed = await client.put(
            path,
            json={"overrides": {"fever_single_c": 38.0, "fever_sustained_c": 38.0}},
            headers=nurse,
        )
        assert proposed.status_code == 202, proposed.text
        proposal_id = proposed.json()["proposal_id"]
        assert (await client.get(path, headers=clinician)).json() == []
        pending = await client.get("/api/threshold-proposals", headers=clinician)
        assert proposal_id in [p["proposal_id"] for p in pending.json()]
        own = await client.post(f"/api/threshold-proposals/{proposal_id}/approve", headers=nurse)
        assert own.status_code == 403
        assert (await client.get(path, headers=clinician)).json() == []
        first = await client.post(f"/api/threshold-proposals/{proposal_id}/approve", headers=nurse2)
        assert first.status_code == 200, first.text
        assert first.json()["version"] == 1 and first.json()["status"] == "approved"
        versions = (await client.get(path, headers=clinician)).json()
        assert [v["version"] for v in versions] == [1]
        assert versions[0]["signed_off_by"] == api_world.users["nurse2_a"]
        again = await client.post(f"/api/threshold-proposals/{proposal_id}/approve", headers=nurse2)
        assert again.status_code == 409

        second = await change({"fever_single_c": 38.5}, nurse2)
        assert second["version"] == 2
        versions = (await client.get(path, headers=clinician)).json()
        assert [v["version"] for v in versions] == [1, 2]
        assert (
            await client.put(path, json={"overrides": {}}, headers=clinician)
        ).status_code == 403
        other = f"/api/care-teams/{api_world.team_b}/protocol"
        assert (await client.get(other, headers=nurse)).status_code == 404
        assert (await client.put(other, json={"overrides": {}}, headers=nurse)).status_code == 404
        bad = await client.put(path, json={"overrides": {"fever_single_c": 37.0}}, headers=nurse)
        assert bad.status_code == 422
        unknown = await client.put(path, json={"overrides": {"fever_c": 1}}, headers=nurse)
        assert unknown.status_code == 422
        # 44.0 °C would switch fever paging off for the whole team (above 43.0 °C a reading
        # is a sensor fault): refused; 43.0 °C is the edge that is still allowed (checked on
        # the model in tests/unit/test_rules_sensor_fault.py).
        unreachable = await client.put(
            path,
            json={"overrides": {"fever_single_c": 44.0, "fever_critical_c": 44.5}},
            headers=nurse,
        )
        assert unreachable.status_code == 422 and "can never page" in unreachable.text
        assert len((await client.get(path, headers=nurse)).json()) == 2

        # A rejected proposal changes nothing.
        proposed = await client.put(
            path, json={"overrides": {"fever_single_c": 39.0}}, headers=nurse
        )
        rejected = await client.post(
            f"/api/threshold-proposals/{proposed.json()['proposal_id']}/reject", headers=nurse2
        )
        assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
        assert len((await client.get(path, headers=nurse)).json()) == 2

        override = await client.put(
            f"/api/patients/{api_world.patient_a}/overrides",
            json={"overrides": {"fever_single_c": 38.1}, "reason": "oral thermometer"},
            headers=nurse,
        )
        assert override.status_code == 202 and override.json()["reason"] == "oral thermometer"
        approved = await client.post(
            f"/api/threshold-proposals/{override.json()['proposal_id']}/approve", headers=nurse2
        )
        assert approved.status_code == 200
        overrides = (
            await client.get(f"/api/patients/{api_world.patient_a}/overrides", headers=nurse)
        ).json()
        assert overrides[-1]["reason"] == "oral thermometer"
        other_patient = await client.put(
            f"/api/patients/{api_world.patient_b}/overrides",
            json={"overrides": {}},
            headers=nurse,
        )
        assert other_patient.status_code == 404
        # Team B's clinician sees none of team A's proposals.
        b = bearer(await api_world.token("clinician_b"))
        listed = await client.get("/api/threshold-proposals?status=approved", headers=b)
        assert listed.status_code == 200 and all(
            p["care_team_id"] == api_world.team_b for p in listed.json()
        )
    changes = [e for e in api_world.audit.entries if e[1] == "thresholds.changed"]
    assert changes[1][3]["old"] == {"fever_single_c": 38.0, "fever_sustained_c": 38.0}
    assert changes[1][3]["new"] == {"fever_single_c": 38.5}
    assert changes[1][3]["proposed_by"] == api_world.users["nurse_a"]
    assert changes[1][0] == f"nurse2_a-{api_world.run}"


async def test_out_of_range_paging_is_a_client_error(api_world: World) -> None:
    """Input the database cannot represent (found by the schemathesis run) is 422, not 500."""
    token = await api_world.token("clinician_a")
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=bearer(token)) as client:
        for path in ("/api/alerts", "/api/patients"):
            r = await client.get(path, params={"offset": 2**111})
            assert r.status_code == 422, (path, r.status_code)
        # A NUL byte (also a schemathesis finding) cannot reach PostgreSQL as text: 422, in
        # the documented validation shape (a list of {loc, msg, type}).
        r = await client.get("/api/alerts", params={"patient_id": "\x00x"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["msg"] == "invalid input"
        login = await client.post("/auth/token", data={"username": "\x00x", "password": "p"})
        assert login.status_code == 422 and isinstance(login.json()["detail"], list)


async def test_patient_page_renders_plot_clocks_and_devices(api_world: World) -> None:
    """The dashboard's patient view renders for a team member (temperature plot with threshold
    lines, devices with last-seen) and is a 404 for another team's clinician."""
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        await client.post(
            "/auth/token", data={"username": api_world.users["clinician_a"], "password": PASSWORD}
        )
        page = await client.get(f"/patients/{api_world.patient_a}")
        assert page.status_code == 200
        html = page.text
        # Two plots (24 hours, whole course), each with the single and sustained lines.
        assert 'id="temperature-plot"' in html and html.count('class="threshold"') == 4
        nurse = bearer(await api_world.token("nurse_a"))
        override = await client.put(
            f"/api/patients/{api_world.patient_a}/overrides",
            json={"overrides": {"fever_single_c": 38.6}},
            headers=nurse,
        )
        assert override.status_code == 202
        approved = await client.post(
            f"/api/threshold-proposals/{override.json()['proposal_id']}/approve",
            headers=bearer(await api_world.token("nurse2_a")),
        )
        assert approved.status_code == 200
        # The lines follow the patient's newest override, not fixed defaults.
        html = (await client.get(f"/patients/{api_world.patient_a}")).text
        assert "single 38.6 °C" in html
        assert f"thermo-{api_world.patient_a}" in html
        assert (await client.get(f"/patients/{api_world.patient_b}")).status_code == 404
