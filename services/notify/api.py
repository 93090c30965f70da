"""The notify HTTP API, wired: acknowledgements by signed link and by SMS, a caregiver's SMS
reply, delivery receipts.

Wiring only. The routes are the routers of ``entrypoints/http`` (the signed acknowledgement
links, Twilio's signed webhooks); escalation decisions are made by the ``EscalationService`` it
is given (``service_layer/api_ports.py``'s ``EscalationCommands``). ``create_app(settings)``
builds the app; ``main`` serves it alone (``vigil notify-api``); notify serves it in-process
when ``VIGIL_NOTIFY_API_ENABLED`` is set.
"""

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.notify.adapters.postgres.caregivers import PostgresCaregiverDirectory
from services.notify.bootstrap import build_escalation, open_pool
from services.notify.entrypoints.http import ROUTERS
from services.notify.service_layer.api_ports import EscalationCommands
from services.notify.service_layer.caregiver_calls import CaregiverCalls
from services.notify.settings import NotifySettings
from vigil.runtime import utcnow


def create_app(
    settings: NotifySettings,
    *,
    service: EscalationCommands | None = None,
    pool: Any = None,
) -> FastAPI:
    """The API over ``service`` and ``pool`` (the escalation service over the pool when not
    given); what is not given is built at start-up and closed at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned: list[Any] = []
        opened = pool
        if opened is None:
            opened = await open_pool(settings)
            owned.append(opened)
        if app.state.service is None:
            app.state.service, closers = build_escalation(settings, opened)
            owned.extend(closers)
        # A caregiver's SMS reply asks for a call (docs/caregivers.md); on the service's clock,
        # so a test's clock moves it too.
        service_ = app.state.service
        app.state.caregiver_calls = CaregiverCalls(
            PostgresCaregiverDirectory(opened), service_, getattr(service_, "now", utcnow)
        )
        try:
            yield
        finally:
            for resource in reversed(owned):
                closer = getattr(resource, "aclose", None) or resource.close
                await closer()

    app = FastAPI(title="Vigil notify", version="1", lifespan=lifespan)
    app.state.notify_settings = settings
    app.state.service = service
    app.state.caregiver_calls = None
    for router in ROUTERS:
        app.include_router(router)
    return app


def main(argv: list[str] | None = None) -> int:
    """``vigil notify-api``: serve the API alone (the notify service keeps paging)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="vigil-notify-api")
    parser.add_argument("--host", help="overrides VIGIL_NOTIFY_API_HOST")
    parser.add_argument("--port", type=int, help="overrides VIGIL_NOTIFY_API_PORT")
    args = parser.parse_args(argv)
    settings = NotifySettings()
    uvicorn.run(
        create_app(settings),
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        log_level=settings.log_level.lower(),
    )
    return 0
