"""Property-based run of the OpenAPI schema against the live API: no server errors, and no
endpoint that answers as if authenticated when the credentials are left out."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import hypothesis
import pytest
import schemathesis
import uvicorn
from schemathesis.checks import (
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from services.api.app import server_options
from services.api.bootstrap import create_app
from services.api.settings import ApiSettings
from tests.api.conftest import PASSWORD, RecordingAlertActions, build_world, free_port
from tests.polling import eventually_sync

pytestmark = pytest.mark.stack


class ThreadedServer:
    """The API in its own thread and event loop, because schemathesis calls it synchronously."""

    def __init__(self, port: int) -> None:
        settings = ApiSettings(port=port)
        app = create_app(settings, alert_actions=RecordingAlertActions())
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
                **server_options(settings),
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()

        def started() -> bool:
            if not self.thread.is_alive():
                raise RuntimeError("API server did not start")
            return bool(self.server.started)

        eventually_sync(started, timeout_s=20, what="the API server to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass(frozen=True)
class LiveApi:
    base: str
    token: str  # a clinician's
    manager_token: str  # a charge nurse's of team_a
    team_a: str


@pytest.fixture(scope="module")
def live_api(stack_env: dict[str, str]) -> Iterator[LiveApi]:
    """Base URL of a live API, a clinician's and a charge nurse's bearer tokens."""
    import httpx

    port = free_port()
    with ThreadedServer(port):
        base = f"http://127.0.0.1:{port}"
        world = asyncio.run(
            build_world(stack_env["VIGIL_PG_DSN"], base, RecordingAlertActions(), None)
        )

        def token(label: str) -> str:
            return str(
                httpx.post(
                    f"{base}/auth/token",
                    data={"username": world.users[label], "password": PASSWORD},
                ).json()["access_token"]
            )

        yield LiveApi(base, token("clinician_a"), token("nurse_a"), world.team_a)


def test_api_has_no_server_errors_and_no_ignored_auth(live_api: LiveApi) -> None:
    """Every operation, with generated inputs and a valid token: never a 5xx, and removing or
    corrupting the credentials never still gets a successful answer."""
    base, token = live_api.base, live_api.token
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # The event stream never ends by design; the dashboard test covers it in a browser.
    operations = [op for op in operations if op.path != "/api/alerts/stream"]
    assert len(operations) >= 9
    failures: list[str] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=base,
                headers={"Authorization": f"Bearer {token}"},
                checks=[
                    not_a_server_error,
                    ignored_auth,
                    status_code_conformance,
                    response_schema_conformance,
                ],
                timeout=10,
            )

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as error:  # every operation runs; all failures shown
            failures.append(f"{operation.method.upper()} {operation.path}: {error}"[:1500])
    assert not failures, "\n\n".join(failures)


def test_a_managers_changes_to_their_own_team_have_no_server_errors(live_api: LiveApi) -> None:
    """The care team's paging routes (on-call, escalation) with generated inputs, as a charge
    nurse of the team they name, so that writes reach validation and the database rather than
    stopping at 403 or 404: never a 5xx, every answer as documented."""
    base = live_api.base
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [
        op
        for op in (result.ok() for result in schema.get_all_operations())
        if op.path.startswith("/api/care-teams/{care_team_id}")
        and set(op.definition.raw.get("tags", ())) & {"on-call", "escalation"}
    ]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            case.path_parameters = {**(case.path_parameters or {}), "care_team_id": live_api.team_a}
            case.call_and_validate(
                base_url=base,
                headers={"Authorization": f"Bearer {live_api.manager_token}"},
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
                timeout=10,
            )

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as error:  # every operation runs; all failures shown
            failures.append(f"{operation.method.upper()} {operation.path}: {error}"[:1500])
    assert not failures, "\n\n".join(failures)


def test_user_management_as_a_charge_nurse_has_no_server_errors(live_api: LiveApi) -> None:
    """The users' routes with generated inputs, as a charge nurse, the care teams of a new
    login or a change being the nurse's own team, so that writes reach the use cases and the
    database rather than stopping at 403 or 404: never a 5xx, every answer as documented."""
    base = live_api.base
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [
        op
        for op in (result.ok() for result in schema.get_all_operations())
        if "users" in op.definition.raw.get("tags", ())
    ]
    assert len(operations) == 6
    failures: list[str] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=15,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def exercise(case: schemathesis.Case) -> None:
            if isinstance(case.body, dict) and "care_teams" in case.body:
                case.body = {**case.body, "care_teams": [live_api.team_a]}
            case.call_and_validate(
                base_url=base,
                headers={"Authorization": f"Bearer {live_api.manager_token}"},
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
                timeout=10,
            )

        try:
            exercise()
        except (Exception, BaseExceptionGroup) as error:  # every operation runs; all failures shown
            failures.append(f"{operation.method.upper()} {operation.path}: {error}"[:1500])
    assert not failures, "\n\n".join(failures)
