"""Wiring of the care-team API: the database pool, the audit trail, the FHIR application and the
HTTP routes. No logic: what is decided lives in ``domain``, the SQL in ``adapters``, the routes in
``entrypoints/http``; ``app`` (the ``vigil api`` command) starts from here.

``create_app`` takes its collaborators as arguments so tests can pass their own clock; the
defaults are the real adapters. ``broker_accounts`` and ``broker_endpoint``: the broker's device
accounts and where devices connect, for device registration; when none are given, the dynamic
security plugin's when the settings name its administration account (``VIGIL_API_BROKER_*``),
else none and registration answers 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.api.adapters.audit import AuditTrail, CoverAudit
from services.api.adapters.caregiver_guidance import PostgresGuidanceStore
from services.api.adapters.caregivers import PostgresContactStore
from services.api.adapters.cover import PostgresCoverStore
from services.api.adapters.credentials import hash_password
from services.api.adapters.discharge import PostgresDischargeStore
from services.api.adapters.dynsec import from_settings as dynsec_from_settings
from services.api.adapters.enrolment import PostgresRegistryStore
from services.api.adapters.fhir import FhirRepository
from services.api.adapters.repository import ApiRepository
from services.api.adapters.roster import RosterQueries
from services.api.adapters.thresholds import PostgresProposalStore
from services.api.adapters.users import PostgresUserStore
from services.api.domain.throttle import LoginThrottles
from services.api.entrypoints.http import (
    alerts,
    auth,
    caregivers,
    cover,
    dashboard,
    discharge,
    enrolment,
    escalation_policy,
    fhir,
    oncall,
    outages,
    patients,
    protocols,
    roster,
    users,
)
from services.api.service_layer.caregiver_guidance import GuidanceChanges
from services.api.service_layer.caregivers import CaregiverContacts
from services.api.service_layer.cover import CoverAgreements
from services.api.service_layer.discharge import DischargeService
from services.api.service_layer.enrolment import BrokerAccounts, BrokerEndpoint, EnrolmentService
from services.api.service_layer.fhir_export import ExportJobs
from services.api.service_layer.thresholds import ThresholdChanges, check_overrides
from services.api.service_layer.users import UserService
from services.api.settings import ApiSettings
from vigil.runtime import utcnow


def create_app(
    settings: ApiSettings,
    *,
    clock: Callable[[], datetime] = utcnow,
    alert_actions: Any = None,
    audit: Any = None,
    broker_accounts: BrokerAccounts | None = None,
    broker_endpoint: BrokerEndpoint | None = None,
) -> FastAPI:
    if broker_accounts is None and (dynsec := dynsec_from_settings(settings)) is not None:
        broker_accounts, broker_endpoint = dynsec[0], broker_endpoint or dynsec[1]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            settings.pg.dsn,
            min_size=settings.pg.pool_min_size,
            max_size=max(settings.pg.pool_max_size, 4),
        )
        app.state.repository = ApiRepository(pool)
        app.state.roster = RosterQueries(pool)
        # Entries written while the caller acts under regional cover name the agreement.
        app.state.audit = CoverAudit(audit if audit is not None else AuditTrail(pool))
        app.state.threshold_proposals = PostgresProposalStore(pool)
        app.state.threshold_changes = ThresholdChanges(
            app.state.threshold_proposals, app.state.audit, clock, check_overrides
        )
        app.state.caregiver_store = PostgresContactStore(pool)
        app.state.caregivers = CaregiverContacts(app.state.caregiver_store, app.state.audit, clock)
        app.state.guidance_store = PostgresGuidanceStore(pool)
        app.state.guidance_changes = GuidanceChanges(
            app.state.guidance_store, app.state.audit, clock
        )
        app.state.cover_store = PostgresCoverStore(pool)
        app.state.cover_agreements = CoverAgreements(app.state.cover_store, app.state.audit, clock)
        from services.notify.public import (
            AlertActions,
            AlertTimelines,
            PatientEscalations,
            PipelineOutages,
            TeamRegistry,
        )

        app.state.alert_timelines = AlertTimelines(pool)
        app.state.team_registry = TeamRegistry(pool, clock)
        app.state.pipeline_outages = PipelineOutages(pool)
        if alert_actions is None:
            app.state.alert_actions = AlertActions(pool)
        # Without broker accounts, device registration and credential changes answer 503.
        app.state.enrolment = EnrolmentService(
            PostgresRegistryStore(pool),
            app.state.audit,
            clock,
            broker=broker_accounts,
            endpoint=broker_endpoint,
        )
        app.state.users = UserService(PostgresUserStore(pool), hash_password, clock)
        app.state.discharge = DischargeService(
            PostgresDischargeStore(pool), app.state.audit, clock, PatientEscalations(pool)
        )
        # The FHIR application is mounted, so its lifespan does not run: it gets the same
        # settings, clock, repository (for the caller's identity) and audit trail here.
        fhir_app.state.repository = app.state.repository
        fhir_app.state.audit = app.state.audit
        fhir_app.state.fhir_repository = FhirRepository(pool)
        fhir_app.state.fhir_exports = ExportJobs(fhir_app.state.fhir_repository, clock)
        try:
            yield
        finally:
            await fhir_app.state.fhir_exports.close()
            await pool.close()

    fhir_app = fhir.create_fhir_app()
    app = FastAPI(
        title="Vigil care-team API",
        version="1",
        description="Patients, alerts and acknowledgements of the caller's care teams.",
        lifespan=lifespan,
    )

    @app.exception_handler(asyncpg.exceptions.DataError)
    async def invalid_input(request: Request, error: asyncpg.exceptions.DataError) -> JSONResponse:
        # Input the database cannot even represent (a NUL byte, an out-of-range number) is the
        # caller's error, not the server's; answered in the shape of every other 422.
        detail = [{"loc": ["request"], "msg": "invalid input", "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)

    app.state.settings = settings
    app.state.clock = clock
    app.state.alert_actions = alert_actions
    app.state.login_throttles = LoginThrottles(settings.login_max_failures, settings.login_window_s)
    app.include_router(auth.router)
    app.include_router(patients.router)
    app.include_router(roster.router)
    app.include_router(alerts.router)
    app.include_router(protocols.router)
    app.include_router(enrolment.router)
    app.include_router(oncall.router)
    app.include_router(escalation_policy.router)
    app.include_router(outages.router)
    app.include_router(caregivers.router)
    app.include_router(discharge.router)
    app.include_router(cover.router)
    app.include_router(users.router)
    app.include_router(dashboard.router)
    fhir_app.state.settings = settings
    fhir_app.state.clock = clock
    app.mount("/fhir", fhir_app)
    return app
