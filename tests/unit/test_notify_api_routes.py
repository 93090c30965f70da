"""notify's HTTP routers over an in-memory repository and escalation service: the API's own logic
(bearer token, status codes, bodies, what is written and audited) without PostgreSQL. The same
routes against PostgreSQL are exercised by tests/integration/test_notify_escalation.py."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from uuid import UUID

import httpx
import pytest

from schemas.notify import CareTeamIn, EscalationPolicyIn, OverrideIn, PersonIn, ScheduleIn
from services.notify.adapters.twilio import twilio_signature
from services.notify.api import create_app
from services.notify.domain.ack_token import AckClaim, InvalidAckToken
from services.notify.domain.schedule import Rotation
from services.notify.service_layer.api_ports import EarlyCycleRecord, QuietHoursRecord
from services.notify.service_layer.escalation import AckOutcome, AckResult
from services.notify.settings import NotifySettings
from vigil.audit.actions import AuditAction

TOKEN = "t" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# 2025-01-15 12:00 UTC: 13:00 in Berlin, outside 22:00-07:00 quiet hours.
NOW = datetime(2025, 1, 15, 12, 0, tzinfo=UTC)


@dataclass
class Tables:
    """What the fake repository holds; copied whole to roll a failed transaction back."""

    care_teams: dict[str, CareTeamIn] = field(default_factory=dict)
    people: dict[str, PersonIn] = field(default_factory=dict)
    schedules: dict[str, ScheduleIn] = field(default_factory=dict)
    overrides: list[tuple[UUID, str, OverrideIn]] = field(default_factory=list)
    policies: dict[str, EscalationPolicyIn] = field(default_factory=dict)
    quiet_hours: dict[str, QuietHoursRecord] = field(default_factory=dict)
    early_cycle: dict[str, EarlyCycleRecord] = field(default_factory=dict)
    # care team -> due_at of its pending quiet-hours digest
    digests: dict[str, datetime] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)


class FakeSettingsChanges:
    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    async def care_team_exists(self, care_team_id: str) -> bool:
        return care_team_id in self.tables.care_teams

    async def quiet_hours_for_update(self, care_team_id: str) -> dict[str, str] | None:
        quiet = self.tables.quiet_hours.get(care_team_id)
        if quiet is None:
            return None
        return {
            "timezone": quiet.timezone,
            "start": quiet.start.isoformat(),
            "end": quiet.end.isoformat(),
        }

    async def save_quiet_hours(
        self, care_team_id: str, *, timezone: str, start: time, end: time, at: datetime, by: str
    ) -> None:
        self.tables.quiet_hours[care_team_id] = QuietHoursRecord(timezone, start, end, at, by)

    async def delete_quiet_hours(self, care_team_id: str) -> None:
        del self.tables.quiet_hours[care_team_id]

    async def bring_digests_forward(self, care_team_id: str, due_at: datetime) -> None:
        if care_team_id in self.tables.digests:
            self.tables.digests[care_team_id] = min(self.tables.digests[care_team_id], due_at)

    async def early_cycle_for_update(self, care_team_id: str) -> dict[str, Any] | None:
        record = self.tables.early_cycle.get(care_team_id)
        if record is None:
            return None
        return {"ack_wait_s": record.ack_wait_s, "extra_targets": list(record.extra_targets)}

    async def save_early_cycle(
        self, care_team_id: str, setting: dict[str, Any], *, at: datetime, by: str
    ) -> None:
        self.tables.early_cycle[care_team_id] = EarlyCycleRecord(
            setting["ack_wait_s"], tuple(setting["extra_targets"]), at, by
        )

    async def delete_early_cycle(self, care_team_id: str) -> None:
        del self.tables.early_cycle[care_team_id]

    async def audit(
        self, actor: str, action: str, subject: str, details: dict[str, Any], *, at: datetime
    ) -> None:
        self.tables.audit.append(
            {"actor": actor, "action": action, "subject": subject, "details": details, "at": at}
        )


class FakeRepository:
    """``ApiRepository`` in memory."""

    def __init__(self) -> None:
        self.tables = Tables()
        self.rotations: dict[str, Rotation] = {}
        self.escalations: dict[str, UUID] = {}
        self.timelines: dict[str, dict[str, Any]] = {}
        self.outage_rows: list[dict[str, Any]] = []
        self.outage_queries: list[tuple[datetime | None, int]] = []

    @asynccontextmanager
    async def settings_changes(self) -> AsyncIterator[FakeSettingsChanges]:
        working = copy.deepcopy(self.tables)
        yield FakeSettingsChanges(working)
        self.tables = working  # committed only when the block did not raise

    async def put_care_team(self, team: CareTeamIn) -> None:
        self.tables.care_teams[team.care_team_id] = team

    async def put_person(self, person: PersonIn) -> None:
        self.tables.people[person.person_id] = person

    async def person(self, person_id: str) -> dict[str, Any] | None:
        person = self.tables.people.get(person_id)
        if person is None:
            return None
        return {
            "person_id": person.person_id,
            "name": person.name,
            "care_team_id": person.care_team_id,
            "contact_methods": [
                {"channel": m.channel, "address": m.address} for m in person.contact_methods
            ],
        }

    async def put_schedule(self, schedule: ScheduleIn) -> None:
        self.tables.schedules[schedule.schedule_id] = schedule

    async def add_override(self, override_id: UUID, schedule_id: str, override: OverrideIn) -> None:
        self.tables.overrides.append((override_id, schedule_id, override))

    async def rotation(self, schedule_id: str) -> Rotation | None:
        return self.rotations.get(schedule_id)

    async def put_policy(self, care_team_id: str, policy: EscalationPolicyIn) -> None:
        self.tables.policies[care_team_id] = policy

    async def quiet_hours(self, care_team_id: str) -> QuietHoursRecord | None:
        return self.tables.quiet_hours.get(care_team_id)

    async def early_cycle(self, care_team_id: str) -> EarlyCycleRecord | None:
        return self.tables.early_cycle.get(care_team_id)

    async def outages(self, *, since: datetime | None, limit: int) -> list[dict[str, Any]]:
        self.outage_queries.append((since, limit))
        return self.outage_rows[:limit]

    async def timeline(self, dedup_key: str) -> dict[str, Any] | None:
        return self.timelines.get(dedup_key)

    async def escalation_id_for(self, dedup_key: str) -> UUID | None:
        return self.escalations.get(dedup_key)


class FakeEscalations:
    """``EscalationCommands`` in memory: records every call, answers what a test sets."""

    def __init__(self) -> None:
        self.clock = NOW
        self.ack_outcome = AckOutcome.ACKNOWLEDGED
        self.valid_tokens: dict[str, UUID] = {}
        self.acknowledged: list[tuple[UUID, str, str]] = []
        self.snoozed: list[tuple[UUID, datetime, str]] = []
        self.sms: list[tuple[str, str]] = []
        self.statuses: list[tuple[str, str, str | None]] = []

    def now(self) -> datetime:
        return self.clock

    async def acknowledge(
        self, escalation_id: UUID, *, by: str, via: str, whole_bundle: bool = False
    ) -> AckResult:
        self.acknowledged.append((escalation_id, by, via))
        detail = "person:earlier" if self.ack_outcome is AckOutcome.ALREADY else None
        return AckResult(self.ack_outcome, escalation_id, detail)

    async def snooze(self, escalation_id: UUID, *, until: datetime, by: str) -> bool:
        self.snoozed.append((escalation_id, until, by))
        return True

    def check_token(self, token: str) -> AckClaim:
        if token not in self.valid_tokens:
            raise InvalidAckToken("forged")
        return AckClaim(self.valid_tokens[token], "email:a@example.org", NOW + timedelta(hours=1))

    async def acknowledge_token(self, token: str) -> AckResult:
        if token not in self.valid_tokens:
            return AckResult(AckOutcome.REFUSED, detail="forged")
        return AckResult(AckOutcome.ACKNOWLEDGED, self.valid_tokens.pop(token))

    async def acknowledge_sms(self, *, sender: str, body: str) -> AckResult:
        self.sms.append((sender, body))
        if body.strip() != "1":
            return AckResult(AckOutcome.REFUSED, detail="reply 1 to acknowledge")
        return AckResult(AckOutcome.ACKNOWLEDGED, uuid.uuid4())

    async def sms_status(self, *, message_sid: str, status: str, error_code: str | None) -> bool:
        self.statuses.append((message_sid, status, error_code))
        return True


@dataclass
class Api:
    client: httpx.AsyncClient
    repository: FakeRepository
    service: FakeEscalations


@asynccontextmanager
async def _api(**settings: Any) -> AsyncIterator[Api]:
    repository, service = FakeRepository(), FakeEscalations()
    app = create_app(NotifySettings(**settings), service=service, repository=repository)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://notify.test") as client:
        yield Api(client, repository, service)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with _api(api_token=TOKEN) as api:
        yield api


async def _team(api: Api, team: str = "CT-1", timezone: str = "Europe/Berlin") -> None:
    body = {"care_team_id": team, "name": "Ward 4", "oncall_email": "a@x.org", "timezone": timezone}
    response = await api.client.put(f"/care-teams/{team}", json=body, headers=AUTH)
    assert response.status_code == 204


# -- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
async def test_management_route_without_the_bearer_token_is_refused_and_writes_nothing(
    api: Api, headers: dict[str, str]
) -> None:
    """No token, a wrong one or one without ``Bearer``: 401, and the care team is not stored;
    the same request with the token is stored (the positive control)."""
    body = {"care_team_id": "CT-1", "name": "Ward 4", "oncall_email": "a@x.org"}
    refused = await api.client.put("/care-teams/CT-1", json=body, headers=headers)
    assert refused.status_code == 401
    assert refused.json() == {"detail": "bearer token required"}
    assert api.repository.tables.care_teams == {}
    assert (await api.client.put("/care-teams/CT-1", json=body, headers=AUTH)).status_code == 204
    assert api.repository.tables.care_teams["CT-1"].name == "Ward 4"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/people/p1"),
        ("get", "/schedules/s1/oncall"),
        ("get", "/care-teams/CT-1/quiet-hours"),
        ("get", "/care-teams/CT-1/early-cycle-escalation"),
        ("get", "/pipeline-outages"),
        ("get", "/alerts/k1/timeline"),
        ("post", "/alerts/k1/acknowledge"),
        ("post", "/alerts/k1/snooze"),
        ("delete", "/care-teams/CT-1/quiet-hours?by=x"),
    ],
)
async def test_every_management_route_asks_for_the_token(api: Api, method: str, path: str) -> None:
    """The token is checked before anything else (the body is not even validated)."""
    assert (await api.client.request(method, path)).status_code == 401


async def test_without_a_configured_token_management_routes_are_open() -> None:
    """Development without ``VIGIL_NOTIFY_API_TOKEN``: no header needed."""
    async with _api(api_token=None) as api:
        assert (await api.client.get("/people/nobody")).status_code == 404


async def test_ack_links_and_twilio_webhooks_need_no_bearer_token(api: Api) -> None:
    """The signed link and Twilio's signature are their credentials, not the bearer token."""
    api.service.valid_tokens["tok"] = uuid.uuid4()
    assert (await api.client.get("/ack/tok")).status_code == 200
    assert (await api.client.post("/twilio/status", data={"MessageSid": "SM1"})).status_code == 204


# -- acknowledge, snooze, timeline ------------------------------------------------------------


async def test_acknowledge_acknowledges_the_alerts_escalation_via_the_api(api: Api) -> None:
    """The dedup key is resolved to its escalation, acknowledged by the caller, ``via="api"``."""
    escalation = uuid.uuid4()
    api.repository.escalations["fever:P-1"] = escalation
    response = await api.client.post(
        "/alerts/fever:P-1/acknowledge", json={"by": "person:nurse-1"}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json() == {
        "outcome": "acknowledged",
        "escalation_id": str(escalation),
        "detail": None,
    }
    assert api.service.acknowledged == [(escalation, "person:nurse-1", "api")]


async def test_acknowledge_an_acknowledged_alert_says_by_whom(api: Api) -> None:
    escalation = uuid.uuid4()
    api.repository.escalations["k"] = escalation
    api.service.ack_outcome = AckOutcome.ALREADY
    response = await api.client.post("/alerts/k/acknowledge", json={"by": "person:n"}, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["outcome"] == "already_acknowledged"
    assert response.json()["detail"] == "person:earlier"


async def test_acknowledge_an_alert_without_escalation_is_404_and_acknowledges_nothing(
    api: Api,
) -> None:
    """Unknown dedup key: 404 before the service is asked; a known one is acknowledged (the
    positive control)."""
    response = await api.client.post(
        "/alerts/nope/acknowledge", json={"by": "person:n"}, headers=AUTH
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "no escalation for this alert"}
    assert api.service.acknowledged == []
    api.repository.escalations["k"] = uuid.uuid4()
    assert (
        await api.client.post("/alerts/k/acknowledge", json={"by": "p"}, headers=AUTH)
    ).status_code == 200
    assert len(api.service.acknowledged) == 1


async def test_acknowledge_the_service_cannot_find_is_404(api: Api) -> None:
    api.repository.escalations["k"] = uuid.uuid4()
    api.service.ack_outcome = AckOutcome.NOT_FOUND
    response = await api.client.post("/alerts/k/acknowledge", json={"by": "person:n"}, headers=AUTH)
    assert response.status_code == 404


async def test_acknowledge_without_who_is_422(api: Api) -> None:
    api.repository.escalations["k"] = uuid.uuid4()
    assert (
        await api.client.post("/alerts/k/acknowledge", json={}, headers=AUTH)
    ).status_code == 422
    assert api.service.acknowledged == []


async def test_snooze_lasts_its_minutes_on_the_service_clock(api: Api) -> None:
    escalation = uuid.uuid4()
    api.repository.escalations["k"] = escalation
    response = await api.client.post(
        "/alerts/k/snooze", json={"by": "person:n", "minutes": 15}, headers=AUTH
    )
    assert response.status_code == 204
    assert api.service.snoozed == [(escalation, NOW + timedelta(minutes=15), "person:n")]


async def test_timeline_is_served_as_stored_or_404(api: Api) -> None:
    api.repository.timelines["k"] = {"dedup_key": "k", "events": [{"kind": "paged"}]}
    assert (await api.client.get("/alerts/k/timeline", headers=AUTH)).json() == {
        "dedup_key": "k",
        "events": [{"kind": "paged"}],
    }
    assert (await api.client.get("/alerts/other/timeline", headers=AUTH)).status_code == 404


# -- lists ------------------------------------------------------------------------------------


async def test_pipeline_outages_list_newest_first_with_ids_as_text(api: Api) -> None:
    newer, older = uuid.uuid4(), uuid.uuid4()
    api.repository.outage_rows = [
        {"outage_id": newer, "source": "rules", "started_at": "2025-01-15T11:00:00Z"},
        {"outage_id": older, "source": "ingest", "started_at": "2025-01-14T11:00:00Z"},
    ]
    response = await api.client.get("/pipeline-outages", headers=AUTH)
    assert response.status_code == 200
    assert [row["outage_id"] for row in response.json()] == [str(newer), str(older)]
    assert response.json()[0]["source"] == "rules"
    assert api.repository.outage_queries == [(None, 50)]


async def test_pipeline_outages_limit_is_clamped_and_since_needs_an_offset(api: Api) -> None:
    await api.client.get("/pipeline-outages?limit=10000", headers=AUTH)
    await api.client.get("/pipeline-outages?limit=0", headers=AUTH)
    await api.client.get("/pipeline-outages?since=2025-01-15T10:00:00%2B00:00", headers=AUTH)
    assert api.repository.outage_queries == [
        (None, 500),
        (None, 1),
        (datetime(2025, 1, 15, 10, 0, tzinfo=UTC), 50),
    ]
    naive = await api.client.get("/pipeline-outages?since=2025-01-15T10:00:00", headers=AUTH)
    assert naive.status_code == 422
    assert len(api.repository.outage_queries) == 3


# -- registry ---------------------------------------------------------------------------------


async def test_person_round_trip_and_unknown_person(api: Api) -> None:
    body = {
        "person_id": "p1",
        "name": "Nurse One",
        "care_team_id": "CT-1",
        "contact_methods": [
            {"channel": "sms", "address": "+15550001"},
            {"channel": "email", "address": "n1@x.org"},
        ],
    }
    assert (await api.client.put("/people/p1", json=body, headers=AUTH)).status_code == 204
    assert (await api.client.get("/people/p1", headers=AUTH)).json() == body
    missing = await api.client.get("/people/p2", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no such person"}


async def test_path_and_body_ids_must_agree(api: Api) -> None:
    body = {"care_team_id": "CT-2", "name": "Ward", "oncall_email": "a@x.org"}
    response = await api.client.put("/care-teams/CT-1", json=body, headers=AUTH)
    assert response.status_code == 422
    assert response.json() == {"detail": "id in the path and the body differ"}
    assert api.repository.tables.care_teams == {}


async def test_override_is_stored_under_the_id_it_returns(api: Api) -> None:
    body = {
        "person_id": "p2",
        "starts_at": "2025-01-15T08:00:00+00:00",
        "ends_at": "2025-01-15T20:00:00+00:00",
    }
    response = await api.client.post("/schedules/s1/overrides", json=body, headers=AUTH)
    assert response.status_code == 201
    [(override_id, schedule_id, override)] = api.repository.tables.overrides
    assert response.json() == {"override_id": str(override_id)}
    assert (schedule_id, override.person_id) == ("s1", "p2")


async def test_oncall_names_who_is_on_call_at_the_given_time(api: Api) -> None:
    api.repository.rotations["s1"] = Rotation(
        schedule_id="s1",
        timezone="UTC",
        start_date=date(2025, 1, 1),
        handoff_time=time(8, 0),
        shift_days=1,
        participants=("p1", "p2"),
    )
    response = await api.client.get(
        "/schedules/s1/oncall?at=2025-01-02T09:00:00%2B00:00", headers=AUTH
    )
    assert response.status_code == 200
    assert response.json()["person_id"] == "p2"
    assert (
        await api.client.get("/schedules/s1/oncall?at=2025-01-02T09:00:00", headers=AUTH)
    ).json() == {"detail": "at must carry a UTC offset"}
    assert (await api.client.get("/schedules/s9/oncall", headers=AUTH)).status_code == 404


# -- quiet hours and early-cycle override: written and audited together --------------------------


QUIET = {"timezone": "Europe/Berlin", "start": "22:00", "end": "07:00", "changed_by": "person:lead"}


async def test_quiet_hours_of_an_unknown_team_are_404_and_not_audited(api: Api) -> None:
    """No write, no audit entry; the same request for a registered team is both (control)."""
    response = await api.client.put("/care-teams/CT-9/quiet-hours", json=QUIET, headers=AUTH)
    assert response.status_code == 404
    assert response.json() == {"detail": "no such care team"}
    assert api.repository.tables.quiet_hours == {}
    assert api.repository.tables.audit == []
    await _team(api, "CT-9")
    assert (
        await api.client.put("/care-teams/CT-9/quiet-hours", json=QUIET, headers=AUTH)
    ).status_code == 204
    assert len(api.repository.tables.audit) == 1


async def test_quiet_hours_set_then_changed_are_audited_with_before_and_after(api: Api) -> None:
    await _team(api)
    path = "/care-teams/CT-1/quiet-hours"
    assert (await api.client.put(path, json=QUIET, headers=AUTH)).status_code == 204
    later = {**QUIET, "start": "23:00", "changed_by": "person:other"}
    api.service.clock = NOW + timedelta(minutes=5)
    assert (await api.client.put(path, json=later, headers=AUTH)).status_code == 204
    first, second = api.repository.tables.audit
    assert first == {
        "actor": "person:lead",
        "action": AuditAction.QUIET_HOURS_CHANGED,
        "subject": "care_team:CT-1",
        "details": {
            "before": None,
            "after": {"timezone": "Europe/Berlin", "start": "22:00:00", "end": "07:00:00"},
        },
        "at": NOW,
    }
    assert second["details"]["before"] == first["details"]["after"]
    assert second["details"]["after"]["start"] == "23:00:00"
    assert second["at"] == NOW + timedelta(minutes=5)
    assert (await api.client.get(path, headers=AUTH)).json() == {
        "care_team_id": "CT-1",
        "timezone": "Europe/Berlin",
        "start": "23:00:00",
        "end": "07:00:00",
        "updated_at": "2025-01-15T12:05:00Z",
        "updated_by": "person:other",
    }


async def test_quiet_hours_bring_a_pending_digest_forward_never_back(api: Api) -> None:
    """Outside the new quiet hours the digest is due now; a digest due sooner stays sooner."""
    await _team(api)
    await _team(api, "CT-2")
    api.repository.tables.digests = {
        "CT-1": NOW + timedelta(hours=10),
        "CT-2": NOW - timedelta(minutes=1),
    }
    await api.client.put("/care-teams/CT-1/quiet-hours", json=QUIET, headers=AUTH)
    await api.client.put("/care-teams/CT-2/quiet-hours", json=QUIET, headers=AUTH)
    assert api.repository.tables.digests == {"CT-1": NOW, "CT-2": NOW - timedelta(minutes=1)}


async def test_quiet_hours_in_force_hold_the_digest_to_their_end(api: Api) -> None:
    """At 23:00 Berlin time, quiet hours 22:00-07:00 move a digest due at 09:00 to 07:00."""
    await _team(api)
    api.service.clock = datetime(2025, 1, 15, 22, 0, tzinfo=UTC)  # 23:00 CET
    api.repository.tables.digests = {"CT-1": datetime(2025, 1, 16, 8, 0, tzinfo=UTC)}
    await api.client.put("/care-teams/CT-1/quiet-hours", json=QUIET, headers=AUTH)
    assert api.repository.tables.digests == {"CT-1": datetime(2025, 1, 16, 6, 0, tzinfo=UTC)}


async def test_quiet_hours_removed_are_audited_and_release_the_digest_now(api: Api) -> None:
    await _team(api)
    path = "/care-teams/CT-1/quiet-hours"
    assert (
        await api.client.delete(path, params={"by": "person:lead"}, headers=AUTH)
    ).status_code == 404
    await api.client.put(path, json=QUIET, headers=AUTH)
    api.repository.tables.digests = {"CT-1": NOW + timedelta(hours=3)}
    api.service.clock = NOW + timedelta(minutes=1)
    assert (await api.client.delete(path, params={"by": " "}, headers=AUTH)).status_code == 422
    assert (
        await api.client.delete(path, params={"by": "person:lead"}, headers=AUTH)
    ).status_code == 204
    assert api.repository.tables.quiet_hours == {}
    assert api.repository.tables.digests == {"CT-1": NOW + timedelta(minutes=1)}
    removal = api.repository.tables.audit[-1]
    assert removal["details"] == {
        "before": {"timezone": "Europe/Berlin", "start": "22:00:00", "end": "07:00:00"},
        "after": None,
    }
    assert (removal["actor"], removal["at"]) == ("person:lead", NOW + timedelta(minutes=1))
    assert len(api.repository.tables.audit) == 2
    assert (await api.client.get(path, headers=AUTH)).status_code == 404


async def test_quiet_hours_with_an_unknown_zone_or_no_window_are_422(api: Api) -> None:
    await _team(api)
    path = "/care-teams/CT-1/quiet-hours"
    for body in ({**QUIET, "timezone": "Mars/Olympus"}, {**QUIET, "end": "22:00"}):
        assert (await api.client.put(path, json=body, headers=AUTH)).status_code == 422
    assert api.repository.tables.audit == []


async def test_early_cycle_override_round_trip_in_minutes_stored_in_seconds(api: Api) -> None:
    await _team(api)
    path = "/care-teams/CT-1/early-cycle-escalation"
    body = {
        "ack_wait_minutes": 2.5,
        "extra_targets": [{"kind": "person", "ref": "oncologist"}],
        "changed_by": "person:lead",
    }
    assert (await api.client.put(path, json=body, headers=AUTH)).status_code == 204
    assert api.repository.tables.early_cycle["CT-1"].ack_wait_s == 150
    assert (await api.client.get(path, headers=AUTH)).json() == {
        "care_team_id": "CT-1",
        "ack_wait_minutes": 2.5,
        "extra_targets": [{"kind": "person", "ref": "oncologist"}],
        "updated_at": "2025-01-15T12:00:00Z",
        "updated_by": "person:lead",
    }
    [entry] = api.repository.tables.audit
    assert entry["action"] == AuditAction.EARLY_CYCLE_ESCALATION_CHANGED
    assert entry["details"] == {
        "before": None,
        "after": {"ack_wait_s": 150, "extra_targets": [{"kind": "person", "ref": "oncologist"}]},
    }


async def test_early_cycle_override_removed_is_audited_and_then_absent(api: Api) -> None:
    await _team(api)
    path = "/care-teams/CT-1/early-cycle-escalation"
    assert (
        await api.client.put(
            "/care-teams/CT-9/early-cycle-escalation",
            json={"ack_wait_minutes": 1, "changed_by": "p"},
            headers=AUTH,
        )
    ).status_code == 404
    assert (
        await api.client.delete(path, params={"by": "person:lead"}, headers=AUTH)
    ).status_code == 404
    await api.client.put(path, json={"ack_wait_minutes": 1, "changed_by": "p"}, headers=AUTH)
    assert (
        await api.client.delete(path, params={"by": "person:lead"}, headers=AUTH)
    ).status_code == 204
    assert api.repository.tables.audit[-1]["details"] == {
        "before": {"ack_wait_s": 60, "extra_targets": []},
        "after": None,
    }
    assert len(api.repository.tables.audit) == 2
    missing = await api.client.get(path, headers=AUTH)
    assert missing.status_code == 404
    assert missing.json() == {
        "detail": "no early-cycle escalation: early-cycle fevers page the usual chain"
    }


# -- acknowledgement links and Twilio ---------------------------------------------------------


async def test_ack_link_get_only_shows_a_button_and_post_acknowledges_once(api: Api) -> None:
    """A mail scanner's GET acknowledges nothing; the POST does, a second POST is refused."""
    api.service.valid_tokens["tok"] = uuid.uuid4()
    page = await api.client.get("/ack/tok")
    assert page.status_code == 200
    assert '<form method="post" action="/ack/tok">' in page.text
    assert "tok" in api.service.valid_tokens
    done = await api.client.post("/ack/tok")
    assert (done.status_code, "Acknowledged. Escalation stopped." in done.text) == (200, True)
    again = await api.client.post("/ack/tok")
    assert again.status_code == 410
    assert "Not acknowledged: forged." in again.text


async def test_ack_link_with_a_bad_token_is_410_and_escapes_it(api: Api) -> None:
    page = await api.client.get("/ack/<b>")
    assert page.status_code == 410
    assert "This link cannot be used: forged." in page.text


async def test_twilio_webhooks_are_refused_without_twilios_signature() -> None:
    """With an auth token set, an unsigned or wrongly signed form is 403 and reaches nothing;
    Twilio's own signature of the public URL and the form is accepted (the control)."""
    async with _api(twilio_auth_token="a" * 32, public_base_url="https://vigil.example") as api:
        form = {"From": "+15550001", "Body": "1"}
        assert (await api.client.post("/twilio/sms", data=form)).status_code == 403
        bad = {"X-Twilio-Signature": "nope"}
        assert (await api.client.post("/twilio/sms", data=form, headers=bad)).status_code == 403
        assert api.service.sms == []
        signed = {
            "X-Twilio-Signature": twilio_signature(
                "a" * 32, "https://vigil.example/twilio/sms", form
            )
        }
        reply = await api.client.post("/twilio/sms", data=form, headers=signed)
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/xml")
        assert "<Message>Acknowledged. Escalation stopped.</Message>" in reply.text
        assert api.service.sms == [("+15550001", "1")]


async def test_sms_status_callback_is_passed_on(api: Api) -> None:
    form = {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30003"}
    assert (await api.client.post("/twilio/status", data=form)).status_code == 204
    assert api.service.statuses == [("SM1", "undelivered", "30003")]


# -- the OpenAPI document ---------------------------------------------------------------------


async def test_openapi_operations_keep_their_ids_and_order(api: Api) -> None:
    """Clients are generated from the operation ids: moving a route between routers must not
    rename or reorder them."""
    document = (await api.client.get("/openapi.json")).json()
    operations = [
        (path, method, operation["operationId"])
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    ]
    assert [op for _, _, op in operations] == [
        "put_care_team_care_teams__care_team_id__put",
        "put_person_people__person_id__put",
        "get_person_people__person_id__get",
        "put_schedule_schedules__schedule_id__put",
        "post_override_schedules__schedule_id__overrides_post",
        "get_oncall_schedules__schedule_id__oncall_get",
        "put_policy_care_teams__care_team_id__escalation_policy_put",
        "put_quiet_hours_care_teams__care_team_id__quiet_hours_put",
        "get_quiet_hours_care_teams__care_team_id__quiet_hours_get",
        "delete_quiet_hours_care_teams__care_team_id__quiet_hours_delete",
        "put_early_cycle_care_teams__care_team_id__early_cycle_escalation_put",
        "get_early_cycle_care_teams__care_team_id__early_cycle_escalation_get",
        "delete_early_cycle_care_teams__care_team_id__early_cycle_escalation_delete",
        "get_pipeline_outages_pipeline_outages_get",
        "get_timeline_alerts__dedup_key__timeline_get",
        "acknowledge_alerts__dedup_key__acknowledge_post",
        "snooze_alerts__dedup_key__snooze_post",
        "ack_page_ack__token__get",
        "ack_link_ack__token__post",
        "sms_reply_twilio_sms_post",
        "sms_status_twilio_status_post",
    ]
