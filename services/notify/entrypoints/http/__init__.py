"""Notify's HTTP API as FastAPI routers, one module per resource group; ``ROUTERS`` in the order
their routes are served (and listed in the OpenAPI document). ``services/notify/api.py`` wires
them into an app."""

from fastapi import APIRouter

from services.notify.entrypoints.http.ack_links import router as ack_links_router
from services.notify.entrypoints.http.alerts import router as alerts_router
from services.notify.entrypoints.http.early_cycle import router as early_cycle_router
from services.notify.entrypoints.http.quiet_hours import router as quiet_hours_router
from services.notify.entrypoints.http.registry import router as registry_router
from services.notify.entrypoints.http.twilio import router as twilio_router

ROUTERS: tuple[APIRouter, ...] = (
    registry_router,
    quiet_hours_router,
    early_cycle_router,
    alerts_router,
    ack_links_router,
    twilio_router,
)
